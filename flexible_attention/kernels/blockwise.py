"""Memory-efficient attention in pure JAX: online softmax over tiles.

The forward pass walks query tiles; for each it walks key tiles, keeping a
running maximum, normaliser and output accumulator (Milakov & Gimelshein,
2018; Rabe & Staats, 2021; Dao et al., 2022). The backward pass is written by
hand (`jax.custom_vjp`) and recomputes the probabilities of each tile from the
saved log-sum-exp, so the only residuals are q, k, v, the output and the
float32 log-sum-exp: memory stays O(S), never O(Sq * Sk).

Tiles that the structured mask makes fully invisible (causal, window,
segments, kv lengths: `Visibility.maybe_visible`) are skipped with `lax.cond`
in both passes. Sequences of any length work: tiles are padded inside, with
padded key slots invisible.

Glossary of shapes:
- B: batch size.
- Sq, Sk: query and key sequence lengths; bq, bk: tile sizes.
- H, Hkv: query and key/value heads; G = H // Hkv (grouped-query attention
  never repeats K/V: queries are laid out as `[B, S, Hkv, G, D]`).
- D, Dv: query/key and value head sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from flexible_attention.core import dropout as dropout_lib
from flexible_attention.core import masks
from flexible_attention.core import merge
from flexible_attention.core import mods as mods_lib
from flexible_attention.core import reference
from flexible_attention.core.inputs import AttentionInputs
from flexible_attention.core.types import BlockSizes
from flexible_attention.core.types import KernelOutput

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Static settings of the blockwise passes (hashable)."""

  sm_scale: float
  softcap: float | None
  precision: object
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int


def tile_config(block_sizes: BlockSizes, *, sm_scale: float,
                softcap: float | None, precision) -> TileConfig:
  """The passes' settings from `fa.BlockSizes` (defaults where unset):
  `block_q`/`block_k` tile the forward pass, `block_q_dkv`/`block_k_dkv`
  the backward (default: the forward's)."""
  block_q = block_sizes.block_q or DEFAULT_BLOCK_Q
  block_k = block_sizes.block_k or DEFAULT_BLOCK_K
  return TileConfig(
      sm_scale=float(sm_scale), softcap=softcap, precision=precision,
      block_q=block_q, block_k=block_k,
      block_q_bwd=block_sizes.block_q_dkv or block_q,
      block_k_bwd=block_sizes.block_k_dkv or block_k)


def _tile_size(block: int, length: int) -> tuple[int, int]:
  """Tile size and number of tiles for a sequence (one tile if it fits)."""
  size = min(block, length)
  return size, math.ceil(length / size)


def _pad_seq(x, length: int):
  """Pads axis 1 of `x` to `length` with zeros."""
  pad = length - x.shape[1]
  if pad == 0:
    return x
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


class _Padded:
  """The call's arrays padded to whole tiles, in the grouped layout."""

  def __init__(self, q, k, v, bias, vis, bq, nq, bk, nk):
    batch, self.q_len, num_heads, head_dim = q.shape
    self.kv_len = k.shape[1]
    self.num_kv_heads = k.shape[2]
    self.groups = num_heads // self.num_kv_heads
    self.bq, self.nq, self.bk, self.nk = bq, nq, bk, nk
    q_pad, kv_pad = bq * nq - self.q_len, bk * nk - self.kv_len
    self.q = reference.group_query(_pad_seq(q, bq * nq), self.num_kv_heads)
    self.k = _pad_seq(k, bk * nk)
    self.v = _pad_seq(v, bk * nk)
    self.bias = masks.pad_broadcastable(bias, q_pad, kv_pad, 0.0)
    self.vis = vis.pad(q_pad, kv_pad)

  def q_rows(self, x, i, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, i * self.bq, self.bq, axis=axis)

  def kv_rows(self, x, j, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, j * self.bk, self.bk, axis=axis)

  def tile(self, i, j):
    """`(visibility, grouped bias)` of tile (i, j)."""
    qs, ks = i * self.bq, j * self.bk
    bias = masks.slice_broadcastable(self.bias, qs, self.bq, ks, self.bk)
    return (self.vis.slice(qs, self.bq, ks, self.bk),
            masks.group_heads(bias, self.num_kv_heads))

  def visible(self, vis, mods):
    """Grouped visibility `[B, Hkv|1, G|1, bq, bk]` of a tile's record,
    and-ed with the call's `mask_mod` (if any)."""
    visible = masks.group_heads(vis.dense(), self.num_kv_heads)
    if mods is not None and mods.mask_mod is not None:
      visible = visible & mods.visible_grouped(
          vis.q_positions.shape[0], self.num_kv_heads, self.groups,
          vis.q_positions, vis.kv_positions)
    return visible

  def keep(self, dropout, vis):
    return dropout_lib.keep_grouped(dropout, vis.q_positions,
                                    vis.kv_positions, self.num_kv_heads,
                                    self.groups)


def forward_pass(cfg: TileConfig, q, k, v, bias, vis, dropout,
                 out_dtype=None, sinks=None, mods=None):
  """Returns `out [B, Sq, H, Dv]` (`out_dtype`, default q.dtype) and
  `lse [B, H, Sq]` (float32; float64 for float64 inputs); `sinks [H]`
  (or None) enter each row's final normalisation and its lse; `mods` (a
  `core.mods.Mods` or None) modify each tile's logits and visibility."""
  out_dtype = q.dtype if out_dtype is None else out_dtype
  acc_dtype = reference.accumulation_dtype(q.dtype)
  batch, q_len, num_heads, _ = q.shape
  value_dim = v.shape[-1]
  bq, nq = _tile_size(cfg.block_q, q_len)
  bk, nk = _tile_size(cfg.block_k, k.shape[1])
  t = _Padded(q, k, v, bias, vis, bq, nq, bk, nk)
  hkv, groups = t.num_kv_heads, t.groups

  def q_tile(i, buffers):
    out_buf, lse_buf = buffers
    q_i = t.q_rows(t.q, i)  # [B, bq, Hkv, G, D]

    def kv_tile(j, carry):
      vis_ij, bias_ij = t.tile(i, j)

      def attend(carry):
        acc, m, l = carry
        s, _ = reference.logits(q_i, t.kv_rows(t.k, j), bias_ij,
                                sm_scale=cfg.sm_scale, softcap=cfg.softcap,
                                precision=cfg.precision,
                                softmax_dtype=jnp.float32)
        if mods is not None:
          s = mods.score_grouped(s, vis_ij.q_positions, vis_ij.kv_positions)
        visible = t.visible(vis_ij, mods)
        s = jnp.where(visible, s, reference.MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # [B, Hkv, G, bq]
        correction = jnp.exp(m - m_new)
        p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
        l = l * correction + jnp.sum(p, axis=-1)
        if dropout is not None:
          p = jnp.where(t.keep(dropout, vis_ij), p / (1.0 - dropout.rate), 0.)
        pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype),
                        t.kv_rows(t.v, j), precision=cfg.precision,
                        preferred_element_type=acc_dtype)
        return acc * correction[..., None] + pv, m_new, l

      return jax.lax.cond(vis_ij.maybe_visible(), attend, lambda c: c, carry)

    stats_shape = (batch, hkv, groups, bq)
    init = (jnp.zeros(stats_shape + (value_dim,), acc_dtype),
            jnp.full(stats_shape, reference.MASK_VALUE, acc_dtype),
            jnp.zeros(stats_shape, acc_dtype))
    acc, m, l = jax.lax.fori_loop(0, nk, kv_tile, init)
    if sinks is not None:  # One more key: logit sinks[h], value 0.
      sink = sinks.astype(acc_dtype).reshape(1, hkv, groups, 1)
      m_new = jnp.maximum(m, sink)
      correction = jnp.exp(m - m_new)
      acc, l = acc * correction[..., None], l * correction + jnp.exp(
          sink - m_new)
      m = m_new
    nonempty = l > 0
    out_i = acc / jnp.where(nonempty, l, 1.0)[..., None]
    lse_i = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)),
                      -jnp.inf)
    out_i = jnp.moveaxis(out_i, 3, 1).astype(out_dtype)  # [B, bq, Hkv, G, Dv]
    out_buf = jax.lax.dynamic_update_slice_in_dim(out_buf, out_i, i * bq, 1)
    lse_buf = jax.lax.dynamic_update_slice_in_dim(lse_buf, lse_i, i * bq, 3)
    return out_buf, lse_buf

  buffers = (jnp.zeros((batch, nq * bq, hkv, groups, value_dim), out_dtype),
             jnp.zeros((batch, hkv, groups, nq * bq), acc_dtype))
  out, lse = jax.lax.fori_loop(0, nq, q_tile, buffers)
  out = out[:, :q_len].reshape(batch, q_len, num_heads, value_dim)
  lse = lse[..., :q_len].reshape(batch, num_heads, q_len)
  return out, lse


def _reduce_to(x, shape):
  """Sums `x` over the axes where `shape` broadcasts (has size 1)."""
  axes = tuple(a for a, (n, m) in enumerate(zip(x.shape, shape))
               if m == 1 and n != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def backward_pass(cfg: TileConfig, q, k, v, bias, vis, dropout, out, lse, dout,
                  dlse, mods=None):
  """Float32 gradients w.r.t. q, k, v, bias and `mods.args` (FlashAttention-2
  style; float64 for float64 inputs): `(dq, dk, dv, dbias, dargs)`, `dbias`
  None without a bias, `dargs` None without a `score_mod` (else like
  `mods.args`, None at integer leaves; from the score_mod's VJP per tile).

  `lse` is the log-sum-exp of the whole row (which may span more keys than
  `k` holds: a ring passes the global one), `out` the whole output.
  """
  batch, q_len, num_heads, head_dim = q.shape
  bq, nq = _tile_size(cfg.block_q_bwd, q_len)
  bk, nk = _tile_size(cfg.block_k_bwd, k.shape[1])
  t = _Padded(q, k, v, bias, vis, bq, nq, bk, nk)
  hkv, groups = t.num_kv_heads, t.groups
  rate = None if dropout is None else dropout.rate
  acc = reference.accumulation_dtype(q.dtype)

  # delta = rowsum(dO * O) - dlse: d(loss)/d(logits) = p * (dp - delta).
  delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(acc), out.astype(acc))
  if dlse is not None:
    delta = delta - dlse
  grouped = lambda x: x.reshape(batch, hkv, groups, -1)  # [B, Hkv, G, S]
  delta = _pad_seq(grouped(delta).swapaxes(1, 3), nq * bq).swapaxes(1, 3)
  lse = jnp.where(jnp.isneginf(lse), 0.0, lse)  # Empty rows: p is 0 anyway.
  lse = _pad_seq(grouped(lse).swapaxes(1, 3), nq * bq).swapaxes(1, 3)
  do = reference.group_query(_pad_seq(dout, nq * bq), hkv)

  score_mod = mods is not None and mods.score_mod is not None

  def kv_tile(j, buffers):
    dq_acc, dk_buf, dv_buf, dbias_acc, dargs_acc = buffers
    k_j, v_j = t.kv_rows(t.k, j), t.kv_rows(t.v, j)

    def q_tile(i, carry):
      vis_ij, bias_ij = t.tile(i, j)

      def grads(carry):
        dk_j, dv_j, dq_acc, dbias_acc, dargs_acc = carry
        q_i, do_i = t.q_rows(t.q, i), t.q_rows(do, i)
        s, dcap = reference.logits(q_i, k_j, bias_ij, sm_scale=cfg.sm_scale,
                                   softcap=cfg.softcap,
                                   precision=cfg.precision,
                                   softmax_dtype=jnp.float32)
        if score_mod:  # s = score_mod(s): its VJP pulls ds back below.
          s, mod_back = mods.score_vjp(s, vis_ij.q_positions,
                                       vis_ij.kv_positions)
        visible = t.visible(vis_ij, mods)
        p = jnp.where(visible, jnp.exp(s - t.q_rows(lse, i, 3)[..., None]),
                      0.0)
        dp = jnp.einsum("bqhgd,bkhd->bhgqk", do_i, v_j,
                        precision=cfg.precision,
                        preferred_element_type=acc)
        p_applied = p
        if dropout is not None:
          keep = t.keep(dropout, vis_ij)
          p_applied = jnp.where(keep, p / (1.0 - rate), 0.0)
          dp = jnp.where(keep, dp / (1.0 - rate), 0.0)
        dv_j += jnp.einsum("bhgqk,bqhgd->bkhd", p_applied.astype(dout.dtype),
                           do_i, precision=cfg.precision,
                           preferred_element_type=acc)
        ds = p * (dp - t.q_rows(delta, i, 3)[..., None])  # d/d(logits)
        if score_mod:  # d/d(the logits before score_mod), d/d(mod_args).
          ds, dargs_ij = mod_back(ds)
          dargs_acc = mods_lib.add_grads(dargs_acc, dargs_ij)
        if dbias_acc is not None:
          full = ds.reshape(batch, num_heads, bq, bk)
          dbias_ij = _reduce_to(full, t.bias.shape)
          start = [0, 0, i * bq if t.bias.shape[2] > 1 else 0,
                   j * bk if t.bias.shape[3] > 1 else 0]
          old = jax.lax.dynamic_slice(dbias_acc, start, dbias_ij.shape)
          dbias_acc = jax.lax.dynamic_update_slice(dbias_acc, old + dbias_ij,
                                                   start)
        if dcap is not None:
          ds = ds * dcap
        ds = (ds * cfg.sm_scale).astype(q.dtype)
        dq_i = jnp.einsum("bhgqk,bkhd->bqhgd", ds, k_j,
                          precision=cfg.precision,
                          preferred_element_type=acc)
        dk_j += jnp.einsum("bhgqk,bqhgd->bkhd", ds, q_i,
                           precision=cfg.precision,
                           preferred_element_type=acc)
        dq_acc = jax.lax.dynamic_update_slice_in_dim(
            dq_acc, t.q_rows(dq_acc, i) + dq_i, i * bq, 1)
        return dk_j, dv_j, dq_acc, dbias_acc, dargs_acc

      return jax.lax.cond(vis_ij.maybe_visible(), grads, lambda c: c, carry)

    init = (jnp.zeros((batch, bk, hkv, head_dim), acc),
            jnp.zeros((batch, bk, hkv, v.shape[-1]), acc),
            dq_acc, dbias_acc, dargs_acc)
    dk_j, dv_j, dq_acc, dbias_acc, dargs_acc = jax.lax.fori_loop(
        0, nq, q_tile, init)
    dk_buf = jax.lax.dynamic_update_slice_in_dim(dk_buf, dk_j, j * bk, 1)
    dv_buf = jax.lax.dynamic_update_slice_in_dim(dv_buf, dv_j, j * bk, 1)
    return dq_acc, dk_buf, dv_buf, dbias_acc, dargs_acc

  buffers = (jnp.zeros(t.q.shape, acc), jnp.zeros(t.k.shape, acc),
             jnp.zeros(t.v.shape, acc),
             None if bias is None else jnp.zeros(t.bias.shape, acc),
             mods.zero_grads(acc) if score_mod else None)
  dq, dk, dv, dbias, dargs = jax.lax.fori_loop(0, nk, kv_tile, buffers)
  dq = dq[:, :q_len].reshape(q.shape)
  dk, dv = dk[:, :k.shape[1]], dv[:, :k.shape[1]]
  if dbias is not None:
    dbias = dbias[:, :, :bias.shape[2], :bias.shape[3]]
  return dq, dk, dv, dbias, dargs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, bias, vis, dropout, sinks, mods):
  return forward_pass(cfg, q, k, v, bias, vis, dropout, sinks=sinks,
                      mods=mods)


def _attention_fwd(cfg, q, k, v, bias, vis, dropout, sinks, mods):
  out, lse = forward_pass(cfg, q, k, v, bias, vis, dropout, sinks=sinks,
                          mods=mods)
  return (out, lse), (q, k, v, bias, vis, dropout, sinks, mods, out, lse)


def _attention_bwd(cfg, residuals, cotangents):
  q, k, v, bias, vis, dropout, sinks, mods, out, lse = residuals
  dout, dlse = cotangents
  # With sinks, lse counts them, so p = exp(s - lse) and dq, dk, dv are
  # unchanged; the sinks' own gradient needs only out, lse and cotangents.
  dq, dk, dv, dbias, dargs = backward_pass(cfg, q, k, v, bias, vis, dropout,
                                           out, lse, dout, dlse, mods)
  dsinks = None if sinks is None else merge.sink_gradient(
      sinks, out, lse, dout, dlse)
  cast = lambda g, x: None if g is None else g.astype(x.dtype)
  return (cast(dq, q), cast(dk, k), cast(dv, v), cast(dbias, bias), None,
          None, dsinks, None if mods is None else mods.cotangent(dargs))


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(cfg: TileConfig, inputs: AttentionInputs,
                        dropout: dropout_lib.Dropout | None = None
                       ) -> KernelOutput:
  """Tiled attention with O(S) memory (a pure function).

  Args:
    cfg: scale, soft cap, precision and tile sizes (clipped to the sequence
      lengths; the backward tiles default to the forward's).
    inputs: the canonical record: `query [B, Sq, H, D]`, `key [B, Sk, Hkv,
      D]`, `value [B, Sk, Hkv, Dv]`, optional `bias [B|1, H|1, Sq|1, Sk|1]`
      and the `Visibility`; its `sinks [H]`, if any, join each row's
      denominator; its `mods`, if any, modify each tile's logits and
      visibility.
    dropout: a `Dropout`, or `None`.

  Returns:
    `KernelOutput(out [B, Sq, H, Dv], lse [B, H, Sq] float32, None)`. Both
    outputs are differentiable (q, k, v, bias, sinks and `mod_args`).
  """
  out, lse = _attention(cfg, inputs.query, inputs.key, inputs.value,
                        inputs.bias, inputs.visibility, dropout, inputs.sinks,
                        inputs.mods)
  return KernelOutput(out, lse, None)
