"""The flash kernels' entry points: prepare a call, run it, differentiate it.

`flash_attention` is the pure, differentiable function the `flash`
mechanism calls: `prepare` pads the call to whole tiles, chooses its
launches (`launch.choose_launch`) and builds its structure tables
(`structure`); a `jax.custom_vjp` runs the forward and the backward kernels
of the chosen backends, with q, k, v, the output and the float32
log-sum-exp as the only residuals. `forward_pass` and `backward_pass` are
the kernels without the `custom_vjp`, for callers that combine blocks
themselves (the ring's block kernel).

Glossary of shapes:
- B: batch size.
- Sq, Sk: query and key lengths; Sqp, Skp: padded to whole tiles.
- H, Hkv: query and key/value heads.
- D, Dv: query/key and value head sizes; Dp, Dvp: padded.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
from jax import custom_derivatives
from jax import lax
import jax.numpy as jnp

from flexible_attention.core import dropout as dropout_lib
from flexible_attention.core import masks
from flexible_attention.core import merge
from flexible_attention.core.inputs import AttentionInputs
from flexible_attention.core.types import BlockSizes
from flexible_attention.core.types import KernelOutput
from flexible_attention.kernels.flash import launch as launch_lib
from flexible_attention.kernels.flash import mod_lowering
from flexible_attention.kernels.flash import mod_tables
from flexible_attention.kernels.flash import mosaic_bwd
from flexible_attention.kernels.flash import mosaic_common
from flexible_attention.kernels.flash import mosaic_dq
from flexible_attention.kernels.flash import mosaic_fwd
from flexible_attention.kernels.flash import mosaic_mod_split
from flexible_attention.kernels.flash import mosaic_mods
from flexible_attention.kernels.flash import structure
from flexible_attention.kernels.flash import triton_bwd
from flexible_attention.kernels.flash import triton_fwd
from flexible_attention.kernels.flash.structure import LOG2E
from flexible_attention.kernels.flash.structure import MAX_HEAD_DIM
from flexible_attention.kernels.flash.structure import Static

# With DELTA_BARRIER the backward's `delta` is computed by a fusion of its
# own before anything consumes it (`lax.optimization_barrier`). Where the
# Mosaic kernels' row statistics are `[lse, delta]` alone (the split Mosaic
# backward, the fused one in float32), an H100 trace shows a concatenate
# fusion of 231-238 us beside them (B = 1, S = 16k, H = 16, D = 128),
# where the fixed point's call, whose scales read delta too, has delta's
# reduction alone at 48 us: XLA fusing the reduction over D into the
# stack's concatenate, each output element summing its row, would explain
# it (a CPU compilation fuses it so). Off until timed on a GPU
# (benchmarks/flash_notes.md).
DELTA_BARRIER = False


def _mod_rows(st: Static, q, mods):
  """The Mosaic kernels' rows of the mods' program values (`mosaic_mods.
  program_rows`, with a split score_mod's terms: `mosaic_mod_split`; `(None,
  None)` without mods)."""
  if st.mods is None:
    return (None, None)
  rows = mosaic_mods.program_rows(st.mods, mods, q.shape[0], q.shape[2])
  return mosaic_mod_split.split_rows(st.mods, st.causal, mods, rows,
                                    q.shape[0], q.shape[2])


def _mosaic_operands(st: Static, q, aux, bounds: str):
  """The Mosaic kernels' bounds and stacked structure vectors."""
  return (aux[bounds],) + mosaic_common.stacked_vectors(st, aux, q.shape[0],
                                                        q.shape[1])


def _with_mods(st: Static, aux, mods):
  """`aux` with the mods' kernel operands (`mod_lowering.operands`)."""
  if st.mods is None:
    return aux
  return {**aux, **mod_lowering.operands(st.mods, mods)}


def _forward(st: Static, q, k, v, bias, aux, out_dtype=None, sinks=None,
             mods=None):
  """`out [B, Sqp, H, Dvp]` (out_dtype, default q's) and natural-log
  `lse [B, H, Sqp]` (float32), by the forward's backend (Triton with
  `sinks [H]`; `mods`, a `core.mods.Mods`, on either backend:
  `launch.choose_launch`)."""
  if st.launch.fwd_backend == "mosaic":
    launch_lib.check_result_dtype("out_dtype", out_dtype, st.launch, "fwd",
                                  q.dtype)
    return mosaic_fwd.forward(st, q, k, v,
                              *_mosaic_operands(st, q, aux, "bounds_fwd"),
                              mod_rows=_mod_rows(st, q, mods),
                              seed=aux.get("seed"), sinks=sinks)
  return triton_fwd.forward(st, q, k, v, bias, _with_mods(st, aux, mods),
                            out_dtype, sinks)


def _sum_to(x, shape):
  """Sums `x` over the axes where `shape` broadcasts (has size 1)."""
  axes = tuple(a for a, (n, m) in enumerate(zip(x.shape, shape))
               if m == 1 and n != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _backward(st: Static, q, k, v, bias, aux, out, lse, dout, dlse,
              grad_dtype=None, mods=None):
  """Gradients of q, k, v (in grad_dtype, default their own) and bias (all
  padded), and those of `mod_args` (float32, like `mods.args`, None at
  integer leaves: `mod_lowering.sum_partials`' format), from the dK/dV
  kernel of either backend; None without a score_mod."""
  aux = _with_mods(st, aux, mods)
  # delta = rowsum(dO * O) - dlse: d(loss)/d(logits) = p * (dp - delta).
  # One fused multiply-and-reduce over dO and O.
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32),
                  axis=-1).transpose(0, 2, 1)
  if dlse is not None:
    delta = delta - jnp.where(jnp.isneginf(lse), 0.0, dlse)
  if DELTA_BARRIER:
    delta = lax.optimization_barrier(delta)
  lse2 = jnp.where(jnp.isneginf(lse), 0.0, lse * LOG2E)  # Empty rows: p = 0.
  dout = dout.astype(q.dtype)
  # The dK/dV kernel; with `atomic_dq` (either backend) it also adds dQ into
  # a float32 buffer, else dQ is its own kernel's (`dq_backend`). Either
  # gives the gradients of mod_args: Triton's per-program partials of the
  # small float leaves, Mosaic's of the program values its score_mod reads.
  if st.launch.dkv_backend == "mosaic":
    launch_lib.check_result_dtype("grad_dtype", grad_dtype, st.launch, "dkv",
                                  k.dtype)
    dk, dv, dq, dslots = mosaic_bwd.dkdv(
        st, q, k, v, dout, lse2, delta,
        *_mosaic_operands(st, q, aux, "bounds_dkv"),
        mod_rows=_mod_rows(st, q, mods), seed=aux.get("seed"))
    dargs = (mosaic_mods.args_grads(st.mods, mods, dslots)
             if st.score_mod else None)
  else:
    dk, dv, *dq, parts = triton_bwd.dkdv(st, q, k, v, bias, aux, dout, lse2,
                                         delta, grad_dtype)
    dq = dq[0] if dq else None
    dargs = (mod_lowering.sum_partials(st.mods, mods, parts)
             if st.score_mod else None)
  if st.launch.atomic_dq:
    dq = dq.astype(grad_dtype or q.dtype)
  elif st.launch.dq_backend == "mosaic":
    launch_lib.check_result_dtype("grad_dtype", grad_dtype, st.launch, "dq",
                                  q.dtype)
    dq = mosaic_dq.dq(st, q, k, v, dout, lse2, delta,
                      *_mosaic_operands(st, q, aux, "bounds_dq"),
                      mod_rows=_mod_rows(st, q, mods), seed=aux.get("seed"))
  else:
    dq = triton_bwd.dq(st, q, k, v, bias, aux, dout, lse2, delta,
                       write_ds=False, grad_dtype=grad_dtype)
  dbias = None
  if bias is not None:
    ds = triton_bwd.dq(st, q, k, v, bias, aux, dout, lse2, delta,
                       write_ds=True)
    dbias = _sum_to(ds, bias.shape).astype(bias.dtype)
  return dq, dk, dv, dbias, dargs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, bias, aux, sinks, mods):
  return _forward(st, q, k, v, bias, aux, sinks=sinks, mods=mods)


def _flash_fwd(st, q, k, v, bias, aux, sinks, mods):
  # With symbolic zeros every input leaf comes as a `CustomVJPPrimal`,
  # which says whether it is differentiated: a `mod_args` leaf too large
  # for the kernels' gradient (`mod_lowering.check_grads`) is refused only
  # then (a frozen T5 table is served), and the backward computes the
  # gradients of the differentiated leaves only (ALiBi's slopes are most
  # often constants: their sums are then skipped).
  perturbed = ([p.perturbed for p in jax.tree.leaves(mods.args)]
               if mods is not None else [])
  q, k, v, bias, aux, sinks, mods = jax.tree.map(
      lambda p: p.value, (q, k, v, bias, aux, sinks, mods))
  out, lse = _forward(st, q, k, v, bias, aux, sinks=sinks, mods=mods)
  # Static flags (pytree structure, not values): `()` to refuse, and per
  # leaf `()` where differentiated.
  refuse = (() if st.mods is not None and any(
      perturbed[i] for i in st.mods.too_large) else None)
  wanted = tuple(() if p else None for p in perturbed)
  return (out, lse), (q, k, v, bias, aux, sinks, mods, out, lse, refuse,
                      wanted)


def _flash_bwd(st, residuals, cotangents):
  q, k, v, bias, aux, sinks, mods, out, lse, refuse, wanted = residuals
  dout, dlse = (jnp.zeros(x.shape, x.dtype)
                if isinstance(ct, custom_derivatives.SymbolicZero) else ct
                for ct, x in zip(cotangents, (out, lse)))
  if refuse is not None:
    mod_lowering.check_grads(st.mods)
  if st.mods is not None:  # In-kernel gradients of the wanted leaves only.
    st = dataclasses.replace(st, mods=dataclasses.replace(
        st.mods, grads=tuple(g and w is not None
                             for g, w in zip(st.mods.grads, wanted))))
  # The lse counts the sinks, so the kernels' p = exp(s - lse) and their
  # dq, dk, dv are unchanged; dsinks in XLA (`merge.sink_gradient`).
  dq, dk, dv, dbias, dargs = _backward(st, q, k, v, bias, aux, out, lse,
                                       dout, dlse, mods=mods)
  dsinks = None if sinks is None else merge.sink_gradient(
      sinks, out, lse, dout, dlse)
  dmods = None if mods is None else mods.cotangent(dargs)
  return dq, dk, dv, dbias, None, dsinks, dmods


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)


class Prepared(NamedTuple):
  """A call made ready for the kernels: padded operands and static settings.

  Attributes:
    static: the call's static description (launches, features, dtype...).
    q: `[B, Sqp, H, Dp]`.
    k: `[B, Skp, Hkv, Dp]`.
    v: `[B, Skp, Hkv, Dvp]`.
    bias: `[B|1, H|1, Sqp|1, Skp|1]` or None.
    aux: the structure vectors (`[B, Sqp]` / `[B, Skp]` int32), dense mask,
      dropout seed and the tile-skipping bounds of each kernel.
    q_len, kv_len, head_dim, value_dim: Sq, Sk, D, Dv before padding.
    mods: the call's `core.mods.Mods` (the `mod_args` the kernels read), or
      None.
  """

  static: Static
  q: Any
  k: Any
  v: Any
  bias: Any
  aux: dict[str, Any]
  q_len: int
  kv_len: int
  head_dim: int
  value_dim: int
  mods: Any = None


def prepare(inputs: AttentionInputs,
            dropout: dropout_lib.Dropout | None = None, *,
            sm_scale: float, softcap: float | None = None, precision=None,
            block_sizes: BlockSizes | None = None,
            launch: launch_lib.LaunchConfig | None = None,
            interpret: bool = False,
            float32_results: bool = False) -> Prepared:
  """Pads a call to whole tiles and builds its structure tables (XLA).

  Arguments as `flash_attention`'s, and `float32_results`: the caller will
  ask `forward_pass` and `backward_pass` for a float32 output and
  gradients (`out_dtype`, `grad_dtype`), which the Mosaic GPU kernels
  cannot write (they are then not chosen, and an error when `launch` asks
  for them). The result feeds `forward_pass` and `backward_pass`, the
  kernels without the `custom_vjp` (for callers that combine blocks
  themselves, like the ring's block kernel).
  """
  q, k, v, bias = inputs.query, inputs.key, inputs.value, inputs.bias
  vis = inputs.visibility
  dims = inputs.dims
  q_len, kv_len = dims.q_len, dims.kv_len
  if not sm_scale > 0:  # The kernels scale row maxima (`triton_common.scores`).
    raise ValueError(f"flash: sm_scale must be positive, got {sm_scale!r}.")
  if max(dims.head_dim, dims.value_dim) > MAX_HEAD_DIM:
    raise ValueError(f"flash: head sizes must be at most {MAX_HEAD_DIM}, got "
                     f"D = {dims.head_dim}, Dv = {dims.value_dim}.")
  d_pad, dv_pad = structure.pad_dim(dims.head_dim), structure.pad_dim(
      dims.value_dim)
  kernel_mods = mod_lowering.kernel_mods(inputs.mods)
  launch = launch_lib.choose_launch(
      dtype=q.dtype, head_dim=d_pad, value_dim=dv_pad, q_len=q_len,
      kv_len=kv_len, causal=vis.causal, bias=bias is not None,
      mask=vis.mask is not None,
      precision=precision, interpret=interpret, block_sizes=block_sizes,
      launch=launch, float32_results=float32_results,
      mods=kernel_mods, groups=dims.groups,
      bias_dtype=None if bias is None else bias.dtype)
  q_mult = max(launch.fwd.block_q, launch.dkv.block_q, launch.dq.block_q)
  k_mult = max(launch.fwd.block_k, launch.dkv.block_k, launch.dq.block_k)
  q_pad = structure.round_up(q_len, q_mult)
  kv_pad = structure.round_up(kv_len, k_mult)

  def pad4(x, seq, dim):
    return structure.pad_axis(structure.pad_axis(x, 1, seq), 3, dim)

  qp, kp, vp = pad4(q, q_pad, d_pad), pad4(k, kv_pad, d_pad), pad4(
      v, kv_pad, dv_pad)
  if bias is not None:
    bias = masks.pad_broadcastable(bias, q_pad - q_len, kv_pad - kv_len, 0.0)

  aux = structure.structure_vectors(inputs, dropout, q_pad, kv_pad)
  if precision is not None and not isinstance(precision, lax.Precision):
    precision = lax.Precision(precision)
  st = Static(
      sm_scale=float(sm_scale),
      softcap=None if softcap is None else float(softcap),
      precision=precision, causal=vis.causal, window=vis.window,
      segments=vis.has_segments, mask=vis.mask is not None,
      dropout_rate=None if dropout is None else float(dropout.rate),
      groups=dims.groups, launch=launch, interpret=bool(interpret),
      mods=kernel_mods, position_bound=None if kernel_mods is None else
      mod_tables.position_bound(vis))
  mod_tiles = mod_tables.derive(
      st.mods, inputs.mods, vis, num_heads=dims.num_heads, q_pad=q_pad,
      kv_pad=kv_pad, blocks=structure.kernel_blocks(st))
  aux.update(structure.tile_bounds(st, aux, mod_tiles))
  return Prepared(st, qp, kp, vp, bias, aux, q_len, kv_len, dims.head_dim,
                  dims.value_dim, inputs.mods)


def _pad_rows(call: Prepared, x, axis: int, value=0.0):
  """Pads the query axis of an `[.., Sq, ..]` array to the tiles."""
  return structure.pad_axis(x, axis, call.q.shape[1], value=value)


def forward_pass(call: Prepared, out_dtype=None) -> KernelOutput:
  """The forward kernel alone (not differentiable).

  The call's mods, if any, are applied (`call.mods`); its sinks are not
  (a caller merges them once over all its blocks: `merge.merge_sinks`).

  Returns:
    `KernelOutput(out [B, Sq, H, Dv] in out_dtype (default: q's), lse [B, H,
    Sq] float32, None)`; rows that see no key have out 0 and lse -inf.
  """
  out, lse = _forward(call.static, call.q, call.k, call.v, call.bias,
                      call.aux, out_dtype, mods=call.mods)
  return KernelOutput(out[:, :call.q_len, :, :call.value_dim],
                      lse[:, :, :call.q_len], None)


def backward_pass(call: Prepared, out, lse, dout, dlse=None,
                  grad_dtype=None):
  """The backward kernels alone, given the output and log-sum-exp of the
  rows (which may span more keys than this call's: a ring passes those of
  all its blocks, and gets this block's share of dq back).

  Args:
    call: from `prepare`.
    out: `[B, Sq, H, Dv]`, the rows' attention output.
    lse: `[B, H, Sq]` float32, their natural log-sum-exp (-inf if empty).
    dout: `[B, Sq, H, Dv]`, the output's cotangent.
    dlse: `[B, H, Sq]`, the log-sum-exp's cotangent, or None.
    grad_dtype: dtype of the gradients (default: the inputs').

  Returns:
    `(dq [B, Sq, H, D], dk [B, Sk, Hkv, D], dv [B, Sk, Hkv, Dv], dbias,
    dargs)`, with dbias None unless the call has a bias, and dargs, with a
    score_mod, this call's share of the gradient of every float `mod_args`
    leaf (float32, like `call.mods.args`, None at integer leaves), else
    None.

  Raises:
    NotImplementedError: with a score_mod, a float `mod_args` leaf has more
      than H elements (`mod_lowering.check_grads`): its gradient is not
      computed inside the kernels, and this function computes them all.
  """
  if call.static.score_mod:
    mod_lowering.check_grads(call.static.mods)
  pad_q = lambda x: structure.pad_axis(_pad_rows(call, x, 1), 3,
                                       call.v.shape[3])
  out, dout = pad_q(out), pad_q(dout)
  lse = _pad_rows(call, lse, 2, value=-jnp.inf)
  if dlse is not None:
    dlse = _pad_rows(call, dlse, 2)
  dq, dk, dv, dbias, dargs = _backward(call.static, call.q, call.k, call.v,
                                       call.bias, call.aux, out, lse, dout,
                                       dlse, grad_dtype, mods=call.mods)
  if dbias is not None:
    dbias = dbias[..., :call.q_len if dbias.shape[-2] > 1 else 1,
                  :call.kv_len if dbias.shape[-1] > 1 else 1]
  return (dq[:, :call.q_len, :, :call.head_dim],
          dk[:, :call.kv_len, :, :call.head_dim],
          dv[:, :call.kv_len, :, :call.value_dim], dbias, dargs)


def flash_attention(inputs: AttentionInputs,
                    dropout: dropout_lib.Dropout | None = None, *,
                    sm_scale: float, softcap: float | None = None,
                    precision=None, block_sizes: BlockSizes | None = None,
                    launch: launch_lib.LaunchConfig | None = None,
                    interpret: bool = False) -> KernelOutput:
  """Fused attention (Pallas: Triton, and Mosaic GPU on Hopper): a pure,
  differentiable function.

  Args:
    inputs: the canonical record: `query [B, Sq, H, D]`, `key [B, Sk, Hkv,
      D]`, `value [B, Sk, Hkv, Dv]`, optional `bias [B|1, H|1, Sq|1, Sk|1]`
      and the `Visibility` (any of causal, window, segments, kv lengths,
      positions, dense mask), and `sinks [H]` or None (either forward
      folds them into each row's normalisation), and the `Mods`. A
      `mask_mod` that reads no `mod_args`, with the static default
      positions, skips the tiles it hides like the structured mask does
      (`mod_tables`); any other is evaluated on every tile, skipping none.
    dropout: a `Dropout` (the library's hash), or `None`.
    sm_scale: the softmax scale (positive).
    softcap: logits soft cap, or `None`.
    precision: matmul precision inside the kernels (`None`: Triton's default,
      TF32 for float32 inputs; `HIGHEST`: exact float32).
    block_sizes: `fa.BlockSizes` (fields `block_q`, `block_k`,
      `block_q_dkv`, `block_k_dkv`, `block_q_dq`, `block_k_dq`; powers of
      two >= 16) over the defaults for the head size.
    launch: a full `LaunchConfig` (tiles, warps, stages, `atomic_dq`) in
      place of the defaults; an error together with tiles in `block_sizes`.
    interpret: run the kernels in Pallas' interpreter (any backend).

  Returns:
    `KernelOutput(out [B, Sq, H, Dv], lse [B, H, Sq] float32, None)`; both
    are differentiable with respect to q, k, v, bias and sinks.
  """
  call = prepare(inputs, dropout, sm_scale=sm_scale, softcap=softcap,
                 precision=precision, block_sizes=block_sizes, launch=launch,
                 interpret=interpret)
  out, lse = _flash(call.static, call.q, call.k, call.v, call.bias, call.aux,
                    inputs.sinks, inputs.mods)
  out = out[:, :call.q_len, :, :call.value_dim]
  lse = lse[:, :, :call.q_len]
  return KernelOutput(out, lse, None)


