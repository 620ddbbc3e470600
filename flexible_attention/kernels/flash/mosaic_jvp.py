"""JAX's forward-mode derivatives in equations Mosaic GPU lowers.

The Mosaic backward kernels take a score_mod's derivatives in forward mode
(`mosaic_mods.TileMods.score_grads`, `slot_grads`): `jax.jvp` of the mod's
tile part, traced to a jaxpr and evaluated inside the kernel. JAX's jvp
rules emit a few equations Mosaic GPU does not lower; `lowerable_jvp`
evaluates the same derivative with those rewritten.
"""

from __future__ import annotations

import jax
from jax import lax
import numpy as np

from flexible_attention.kernels.flash.mod_lowering import CALLS
from flexible_attention.kernels.flash.mod_lowering import sub_jaxpr


def lowerable_jvp(fn, primals, tangents):
  """`jax.jvp(fn, primals, tangents)` in equations Mosaic GPU lowers.

  JAX's jvp rules emit two it does not: `add_any`, which sums the tangents
  of an equation with two perturbed operands (`s * tanh(s)`), and
  `integer_pow(y, -2)`, the divisor's tangent of `x / y`; and jax 0.11
  passes a zero tangent's literal through `reshard` (`_folded_scalar`). The jvp is traced
  to a jaxpr (the values `fn` closes over become its constants) and
  evaluated with `add` and `1 / y^n` in their place.
  """
  flat, tree = jax.tree.flatten((primals, tangents))

  def jvp(*flat):
    return jax.jvp(fn, *jax.tree.unflatten(tree, flat))

  closed, shapes = jax.make_jaxpr(jvp, return_shape=True)(*flat)
  return jax.tree.unflatten(jax.tree.structure(shapes), _eval_lowerable(
      closed.jaxpr, closed.consts, flat))


# Equations that pass their one operand through (its dtype or shape aside).
PASS_THROUGH = frozenset(("reshard", "copy", "copy_p", "convert_element_type",
                           "broadcast_in_dim", "reshape", "squeeze"))


def _folded_scalar(eqn, ins):
  """The scalar result of a pass-through equation on a literal (jax 0.11's
  zero tangents: `reshard 0.0`, seen when lowering for CUDA on a CPU host,
  whose mesh is abstract), as a numpy scalar, or None. Mosaic GPU rejects
  such an equation: its rule hands the literal back as the result."""
  aval = eqn.outvars[0].aval if len(eqn.outvars) == 1 else None
  if (eqn.primitive.name not in PASS_THROUGH or len(ins) != 1
      or aval is None or aval.shape != ()
      or not isinstance(ins[0], (np.ndarray, np.generic, bool, int, float))
      or np.size(ins[0]) != 1):
    return None
  return np.asarray(np.asarray(ins[0]).reshape(()), aval.dtype)


def _eval_lowerable(jaxpr, consts, args):
  """`jaxpr` on `args`, nested calls inlined, `lowerable_jvp`'s two
  rewrites applied and pass-through equations on literals folded
  (`_folded_scalar`)."""
  env = {}
  read = lambda v: v.val if hasattr(v, "val") else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    name, ins = eqn.primitive.name, [read(v) for v in eqn.invars]
    folded = _folded_scalar(eqn, ins)
    if folded is not None:
      outs = [folded]
    elif name in CALLS:
      sub, sub_consts = sub_jaxpr(eqn)
      outs = _eval_lowerable(sub, sub_consts, ins)
    elif name == "add_any":
      outs = [lax.add(*ins)]
    elif name == "integer_pow" and eqn.params["y"] < -1:
      one = np.asarray(1, eqn.outvars[0].aval.dtype)
      outs = [lax.div(one, lax.integer_pow(ins[0], -eqn.params["y"]))]
    else:
      outs = eqn.primitive.bind(*ins, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]
