"""Score and mask modifications inside flash's Triton kernels.

A user's `score_mod` / `mask_mod` (`core/mods.py`'s contract: pure JAX
functions on broadcast arrays) cannot be traced into a Pallas Triton kernel
as they are: they index `mod_args` (`slopes[head]`, `table[bucket, head]`,
`prefix_lengths[batch]`, `doc_ids[batch, q_pos]`), which JAX spells as a
`gather` on a value, and Triton lowers no `gather`. So the kernels take
each `mod_args` leaf whole as an extra input (a ref, padded to powers of
two) and evaluate the mod through a small jaxpr evaluator:

- `jax.make_jaxpr` of the mod on the tile's shapes (`score [1, 1, bq, bk]`,
  `batch`, `head [1, 1, 1, 1]`, `q_pos [1, 1, bq, 1]`, `kv_pos [1, 1, 1,
  bk]`; transposed tiles swap the last two axes: an elementwise mod
  computes the same values);
- its equations are bound as they are, except a POINT gather (slice sizes
  1, every operand dimension collapsed) whose operand is a `mod_args` leaf
  (possibly after `convert_element_type`), which becomes a gather LOAD from
  the leaf's ref, `ref[idx_0, idx_1, ...]` with index arrays (clamped to
  the leaf's shape, as XLA's gather clamps); the index vector JAX builds
  with `concatenate` is taken apart, never built; nested `jit` /
  `custom_jvp` calls are inlined;
- anything else Triton cannot lower is refused before any kernel is traced
  (`kernel_mods`), naming the primitive and the mechanisms that take any
  mod.

Backward: the mod is elementwise, so forward-mode derivatives give what the
kernels need without transposes (no reductions inside the mod): `d mod /
d score` per element (`TileMods.score_grads`), and per gathered float value
`d mod / d value`, which the dK/dV kernel multiplies by the logits'
cotangent and scatter-adds into a per-program partial of the leaf
(`TileMods.add_partials`); `sum_partials` sums the programs' partials in
XLA. Only leaves of at most H elements (`[H]` or smaller) get gradients
this way; a larger float leaf that needs one (one the call differentiates:
`interface._flash_fwd` reads it off the `custom_vjp`'s symbolic zeros) is
refused (`check_grads`).

Glossary of shapes:
- B: batch size; H, Hkv: query and key/value heads.
- bq, bk: the tile's query and key sizes.
- n: a `mod_args` leaf's element count; np: n padded to a power of two.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from flexible_attention.kernels.flash.structure import next_power_of_2

MOD_MECHANISMS = "vanilla, blockwise, ring, ulysses"
CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
          "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "remat2",
          "checkpoint")
# Elementwise primitives Triton lowers, if Pallas' table cannot be read.
_FALLBACK = frozenset((
    "abs add and atan2 broadcast_in_dim ceil clamp convert_element_type cos "
    "div eq exp exp2 floor ge gt integer_pow le log log1p logistic lt max "
    "min mul ne neg not or pow rem reshape rsqrt select_n sign sin sqrt "
    "square squeeze sub tanh xor shift_left shift_right_arithmetic "
    "shift_right_logical stop_gradient").split())


def _triton_primitives() -> frozenset[str]:
  """The primitives Pallas' Triton lowering has a rule for."""
  try:
    from jax._src.pallas.triton import lowering  # pylint: disable=g-import-not-at-top
    return frozenset(p.name for p in lowering.triton_lowering_rules)
  except (ImportError, AttributeError):
    return _FALLBACK


TRITON_PRIMITIVES = _triton_primitives()


@dataclasses.dataclass(frozen=True)
class KernelMods:
  """The static part of a call's mods, as the Triton kernels read them.

  Attributes:
    score_mod, mask_mod: the user's functions (or None).
    treedef: the pytree structure of `mod_args`.
    shapes, dtypes: each leaf's shape and dtype name.
    grads: per leaf, whether the backward computes its gradient in-kernel
      (a float leaf of at most `max_grad_size` elements, with a score_mod;
      the backward narrows it to the leaves the call differentiates,
      `interface._flash_bwd`).
    too_large: the float leaves (indices) a gradient cannot reach here.
    max_grad_size: the call's H (`Mods.num_heads`: all heads, also inside
      a head-sharded `shard_map`), the most elements of a leaf whose
      gradient the kernels compute.
  """

  score_mod: Callable | None
  mask_mod: Callable | None
  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]
  grads: tuple[bool, ...]
  too_large: tuple[int, ...]
  max_grad_size: int

  def name(self, leaf: int) -> str:
    return f"mod_arg{leaf}"


def kernel_mods(mods) -> KernelMods | None:
  """`mods` (`core.mods.Mods` or None) checked for the Triton kernels.

  Raises:
    NotImplementedError: a mod uses a primitive Triton cannot lower, or
      reads a `mod_args` leaf other than by point indexing.
  """
  if mods is None:
    return None
  leaves, treedef = jax.tree.flatten(mods.args)
  floats = [jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves]
  small = [int(np.prod(x.shape)) <= mods.num_heads for x in leaves]
  has_score = mods.score_mod is not None
  km = KernelMods(
      mods.score_mod, mods.mask_mod, treedef,
      tuple(tuple(x.shape) for x in leaves),
      tuple(jnp.dtype(x.dtype).name for x in leaves),
      tuple(has_score and f and s for f, s in zip(floats, small)),
      tuple(i for i, (f, s) in enumerate(zip(floats, small))
            if has_score and f and not s),
      mods.num_heads)
  tile = (1, 1, 16, 16)
  for kind in ("score_mod", "mask_mod"):
    if getattr(km, kind) is not None:
      jaxpr = make_jaxpr(km, kind, tile).jaxpr
      first = 5 if kind == "score_mod" else 4
      _check_jaxpr(kind, jaxpr, set(range(first, len(jaxpr.invars))))
  return km


def check_grads(km: KernelMods):
  """Refuses the gradient of float `mod_args` leaves over H elements."""
  if km is not None and km.too_large:
    shapes = ", ".join(f"leaf {i} of shape {list(km.shapes[i])}"
                       for i in km.too_large)
    raise NotImplementedError(
        f"the flash kernels (mechanism 'flash', ring's block_kernel='flash') "
        f"compute the gradients of float mod_args of at most H = "
        f"{km.max_grad_size} elements ([H] or smaller) inside the kernels; "
        f"this call needs the gradient of {shapes}. Mechanisms that compute "
        f"any mod_args gradient: {MOD_MECHANISMS}.")


def make_jaxpr(km: KernelMods, kind: str, tile):
  """The mod's closed jaxpr on a tile of shape `tile` (4-D)."""
  i32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  indices = (i32((1, 1, 1, 1)), i32((1, 1, 1, 1)),
             i32((1, 1, tile[2], 1)), i32((1, 1, 1, tile[3])))
  args = [jax.ShapeDtypeStruct(s, d) for s, d in zip(km.shapes, km.dtypes)]
  if kind == "score_mod":
    fn = lambda s, *rest: km.score_mod(
        s, *rest[:4], *km.treedef.unflatten(rest[4:]))
    return jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(tile, jnp.float32),
                              *indices, *args)
  fn = lambda *rest: km.mask_mod(*rest[:4], *km.treedef.unflatten(rest[4:]))
  return jax.make_jaxpr(fn)(*indices, *args)


def _refuse(kind: str, what: str):
  raise NotImplementedError(
      f"the flash kernels (mechanism 'flash', ring's block_kernel='flash') "
      f"evaluate {kind} inside their Triton kernels, which cannot lower "
      f"{what}; mechanisms that take any {kind}: {MOD_MECHANISMS}.")


def _is_point_gather(params, ndim: int) -> bool:
  dn = params["dimension_numbers"]
  return (all(s == 1 for s in params["slice_sizes"]) and not dn.offset_dims
          and tuple(sorted(dn.collapsed_slice_dims)) == tuple(range(ndim))
          and tuple(sorted(dn.start_index_map)) == tuple(range(ndim))
          and not getattr(dn, "operand_batching_dims", ()))


def sub_jaxpr(eqn):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if sub is not None:
      return getattr(sub, "jaxpr", sub), getattr(sub, "consts", ())
  raise NotImplementedError(f"no sub-jaxpr in {eqn.primitive.name}")


def _check_jaxpr(kind: str, jaxpr, arg_positions):
  """Walks `jaxpr`; `arg_positions`: invar positions that are mod_args."""
  args = {v for i, v in enumerate(jaxpr.invars) if i in arg_positions}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    uses = [v for v in eqn.invars if not hasattr(v, "val") and v in args]
    if name == "gather":
      if hasattr(eqn.invars[0], "val") or eqn.invars[0] not in args:
        _refuse(kind, "a gather from a computed array (index mod_args "
                "directly, e.g. slopes[head])")
      if not _is_point_gather(eqn.params, eqn.invars[0].aval.ndim):
        _refuse(kind, "a gather that is not a point gather (take single "
                "elements of mod_args: every axis indexed by an array)")
      if "FILL" in str(eqn.params["mode"]).upper():
        _refuse(kind, "a gather in mode 'fill'")
      continue
    if name in CALLS:
      sub, _ = sub_jaxpr(eqn)
      _check_jaxpr(kind, sub, {i for i, v in enumerate(eqn.invars)
                               if not hasattr(v, "val") and v in args})
      continue
    if uses and name == "convert_element_type":
      args.add(eqn.outvars[0])
      continue
    if any(v.aval.ndim > 0 for v in uses):
      _refuse(kind, f"a mod_args array used whole by {name!r} (only its "
              "single elements, by indexing, or scalar mod_args)")
    if name not in TRITON_PRIMITIVES:
      _refuse(kind, f"the primitive {name!r}")


# --- The in-kernel evaluator -------------------------------------------------


@dataclasses.dataclass
class _Arg:
  """A `mod_args` leaf not loaded yet (its ref; dtype after converts)."""
  leaf: int
  dtype: Any


@dataclasses.dataclass
class _Index:
  """A gather's index vector kept apart: its components, each shaped like
  the indices less their last axis."""
  parts: list


def _components(x, shape):
  if isinstance(x, _Index):
    return x.parts
  return [lax.index_in_dim(x, d, axis=x.ndim - 1, keepdims=False)
          for d in range(x.shape[-1])]


class _Evaluator:
  """Evaluates a mod's jaxpr in a kernel (see the module docstring)."""

  def __init__(self, km: KernelMods, refs, kind: str):
    self.km, self.refs, self.kind = km, refs, kind
    self.loads = {}  # id(eqn) -> (value, leaf, flat index)
    self.override = None  # id(eqn) -> value, for derivatives.

  def _gather(self, eqn, operand, indices):
    key = id(eqn)
    if self.override is not None and key in self.override:
      return self.override[key]
    if key in self.loads:
      return self.loads[key][0]
    if not isinstance(operand, _Arg):
      _refuse(self.kind, "a gather from a computed array")
    shape = self.km.shapes[operand.leaf]
    parts = _components(indices, shape)
    dims = eqn.params["dimension_numbers"].start_index_map
    index = [None] * len(shape)
    for part, dim in zip(parts, dims):
      index[dim] = jnp.clip(part.astype(jnp.int32), 0, shape[dim] - 1)
    ref = self.refs[self.km.name(operand.leaf)]
    value = ref[tuple(index)]
    if self.km.dtypes[operand.leaf] == "bool":
      value = value != 0
    value = value.astype(operand.dtype)
    flat = 0
    for dim, part in enumerate(index):
      flat = flat + part * int(np.prod(shape[dim + 1:]))
    self.loads[key] = (value, operand.leaf, flat)
    return value

  def _arg_value(self, arg: _Arg):
    """A scalar leaf, loaded (the only whole use `_check_jaxpr` allows)."""
    value = self.refs[self.km.name(arg.leaf)][0]
    if self.km.dtypes[arg.leaf] == "bool":
      value = value != 0
    return value.astype(arg.dtype)

  def run(self, jaxpr, consts, args):
    env = {}
    read = lambda v: v.val if hasattr(v, "val") else env[v]
    for v, x in zip(jaxpr.constvars, consts):
      env[v] = x
    for v, x in zip(jaxpr.invars, args):
      env[v] = x
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      ins = [read(v) for v in eqn.invars]
      if name == "gather":
        outs = [self._gather(eqn, *ins)]
      elif name in CALLS:
        sub, sub_consts = sub_jaxpr(eqn)
        outs = self.run(sub, sub_consts, ins)
      elif name == "convert_element_type" and isinstance(ins[0], _Arg):
        outs = [_Arg(ins[0].leaf, eqn.params["new_dtype"])]
      elif (name == "concatenate" and eqn.params["dimension"] ==
            eqn.outvars[0].aval.ndim - 1 and all(
                v.aval.shape[-1] == 1 for v in eqn.invars)):
        outs = [_Index([p for x in ins for p in _components(x, None)])]
      elif (name == "broadcast_in_dim" and
            eqn.outvars[0].aval.shape == tuple(eqn.invars[0].aval.shape) +
            (1,) and tuple(eqn.params["broadcast_dimensions"]) ==
            tuple(range(eqn.invars[0].aval.ndim))):
        outs = [_Index([ins[0]])]  # A one-component index vector.
      else:
        ins = [self._arg_value(x) if isinstance(x, _Arg) else
               (_materialise(x) if isinstance(x, _Index) else x)
               for x in ins]
        outs = eqn.primitive.bind(*ins, **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
      for v, x in zip(eqn.outvars, outs):
        env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _materialise(index: _Index):
  """An index vector used as an array: its components stacked (the last
  axis)."""
  return jnp.stack(index.parts, axis=-1)


class TileMods:
  """A program's view of the mods: evaluates them on its tiles.

  Args:
    km: the call's `KernelMods`.
    refs: the kernel's refs by name (`mod_arg{i}`, `mod_offsets`).
    batch, head: the program's local batch row and query head (scalars).
    transposed: tiles are `[bk, bq]` (the dK/dV kernel).
  """

  def __init__(self, km: KernelMods, refs, batch, head, transposed: bool):
    self.km, self.refs, self.transposed = km, refs, transposed
    offsets = refs["mod_offsets"]
    full = lambda x: jnp.full((1, 1, 1, 1), x, jnp.int32)
    self.batch = full(batch + offsets[0])
    self.head = full(head + offsets[1])

  def _indices(self, q_pos, kv_pos):
    if self.transposed:
      return (q_pos.reshape(1, 1, 1, q_pos.shape[0]),
              kv_pos.reshape(1, 1, kv_pos.shape[0], 1))
    return (q_pos.reshape(1, 1, q_pos.shape[0], 1),
            kv_pos.reshape(1, 1, 1, kv_pos.shape[0]))

  def _jaxpr(self, kind: str, shape):
    tile = (1, 1) + tuple(shape)
    closed = make_jaxpr(self.km, kind, tile)
    return closed.jaxpr, closed.consts

  def _leaf_args(self):
    return [_Arg(i, jnp.dtype(d)) for i, d in enumerate(self.km.dtypes)]

  def visible(self, q_pos, kv_pos):
    """Bool `[bq, bk]` (`[bk, bq]` transposed): the mask_mod on the tile."""
    qp, kp = self._indices(q_pos, kv_pos)
    shape = (kp.shape[2], qp.shape[3]) if self.transposed else (
        qp.shape[2], kp.shape[3])
    jaxpr, consts = self._jaxpr("mask_mod", shape)
    ev = _Evaluator(self.km, self.refs, "mask_mod")
    (keep,) = ev.run(jaxpr, consts, [self.batch, self.head, qp, kp] +
                     self._leaf_args())
    keep = jnp.broadcast_to(keep.reshape((1,) * (4 - keep.ndim) + keep.shape),
                            (1, 1) + shape)
    return keep.reshape(shape)

  def _score(self, s, q_pos, kv_pos):
    qp, kp = self._indices(q_pos, kv_pos)
    jaxpr, consts = self._jaxpr("score_mod", s.shape)
    ev = _Evaluator(self.km, self.refs, "score_mod")
    run = lambda s4: ev.run(jaxpr, consts, [s4, self.batch, self.head, qp,
                                            kp] + self._leaf_args())[0]
    return ev, run, s.reshape((1, 1) + s.shape)

  def score(self, s, q_pos, kv_pos):
    """The score_mod on a tile's natural-unit logits `s [bq, bk]`."""
    _, run, s4 = self._score(s, q_pos, kv_pos)
    return run(s4).reshape(s.shape)

  def score_grads(self, s, q_pos, kv_pos, args: bool = True):
    """`(s_mod, dmod_ds, terms)`: the modified logits, their elementwise
    derivative in `s` (both like `s`) and, per gathered value of a leaf
    with a gradient, `(leaf, dmod_dvalue like s, flat index [1, 1, a|1,
    c|1])` (forward mode: no transposes in the kernel; no terms unless
    `args`)."""
    ev, run, s4 = self._score(s, q_pos, kv_pos)
    out = run(s4)  # Loads every gathered value once.
    keys = [k for k, (_, leaf, _) in ev.loads.items()
            if args and self.km.grads[leaf]]
    ev.override = {k: v for k, (v, _, _) in ev.loads.items()}

    def f(s4, *values):
      ev.override.update(zip(keys, values))
      return run(s4)

    primals = [s4] + [ev.loads[k][0] for k in keys]
    zeros = [jnp.zeros_like(x) for x in primals]

    def tangent(i):
      ts = list(zeros)
      ts[i] = jnp.ones_like(primals[i])
      return jax.jvp(f, primals, ts)[1].reshape(s.shape)

    terms = [(ev.loads[k][1], tangent(i + 1), ev.loads[k][2])
             for i, k in enumerate(keys)]
    return out.reshape(s.shape), tangent(0), terms


def add_partials(partials: dict, ds, terms):
  """Adds a tile's share of the leaves' gradients: `partials[leaf]` (float32
  `[np]`) += scatter-add of `ds * dmod_dvalue` at the flat indices (`ds
  [a, c]`, the modified logits' cotangent, zero where invisible)."""
  for leaf, dvalue, flat in terms:
    contrib = jnp.where(ds != 0.0, ds * dvalue, 0.0)  # [a, c]
    size = partials[leaf].shape[0]
    if all(n == 1 for n in flat.shape):  # One element per tile (slopes[h]).
      total = jnp.sum(jnp.sum(contrib, axis=1), axis=0)
      ids = lax.broadcasted_iota(jnp.int32, (1, 1, 1, size), 3)
      partials[leaf] = partials[leaf] + jnp.where(
          ids == flat, total, 0.0).reshape(size)
      continue
    flat = jnp.broadcast_to(flat, (1, 1) + contrib.shape).reshape(
        contrib.shape)
    ids = lax.broadcasted_iota(jnp.int32, (size,), 0)
    for e in range(size):
      total = jnp.sum(jnp.sum(jnp.where(flat == e, contrib, 0.0), axis=1),
                      axis=0)
      partials[leaf] = partials[leaf] + jnp.where(ids == e, total, 0.0)
  return partials


# --- XLA side: operands and the partials' sum --------------------------------


def _pad_pow2(x):
  if x.ndim == 0:
    x = x.reshape(1)
  widths = [(0, next_power_of_2(n) - n) for n in x.shape]
  return jnp.pad(x, widths)


def operands(km: KernelMods, mods) -> dict[str, Any]:
  """The kernels' extra inputs: every leaf padded to powers of two (bools
  as int32, scalars as `[1]`) and `mod_offsets` int32 `[2]`."""
  leaves = jax.tree.leaves(mods.args)
  out = {"mod_offsets": jnp.stack([mods.batch_offset,
                                   mods.head_offset]).astype(jnp.int32)}
  for i, x in enumerate(leaves):
    if x.dtype == jnp.bool_:
      x = x.astype(jnp.int32)
    out[km.name(i)] = _pad_pow2(x)
  return out


def partial_sizes(km: KernelMods) -> dict[int, int]:
  """`np` of each leaf with an in-kernel gradient."""
  return {i: next_power_of_2(max(1, int(np.prod(s))))
          for i, (s, g) in enumerate(zip(km.shapes, km.grads)) if g}


def sum_partials(km: KernelMods, mods, partials: dict):
  """`dargs` like `mods.args` (None at integer leaves) from the programs'
  partials `{leaf: [..., np]}` (summed over every leading axis)."""
  leaves = jax.tree.leaves(mods.args)
  grads = []
  for i, x in enumerate(leaves):
    if i in partials:
      p = partials[i].reshape(-1, partials[i].shape[-1]).sum(0)
      grads.append(p[:x.size].reshape(x.shape))
    elif jnp.issubdtype(x.dtype, jnp.inexact):
      grads.append(jnp.zeros(x.shape, jnp.float32))
    else:
      grads.append(None)
  return jax.tree.unflatten(km.treedef, grads)
