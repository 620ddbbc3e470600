"""flash's backward kernels in Pallas, lowered through Triton.

- dK/dV, grid `(Sk / bk, B, Hkv)`: one key tile against the query tiles
  that can see it, for every query head of its group (grouped-query
  attention never repeats K/V: the group's heads are a loop inside the
  program); with `LaunchConfig.atomic_dq` it also adds each tile pair's
  share of dQ into a float32 buffer with atomic adds (one kernel, 5
  matmuls per tile pair, not bitwise reproducible);
- dQ, grid `(Sq / bq, B, H)`: one query tile against its key tiles, heavy
  causal rows first; the same kernel writes `d(loss)/d(logits)` tiles for
  the bias gradient (`write_ds`), a launch of its own that XLA drops when
  nobody needs it.

Both grids start head by head, or a causal call's in groups of heads, tile
by tile (`structure.TileOrder`; the dQ grid's by default,
`structure.GROUPED_CAUSAL_DQ`; the dK/dV grid's opt-in,
`GROUPED_CAUSAL_DKV`).

`delta = rowsum(dO * O)` comes from the caller (`interface.py`). See
`triton_common` for what the Triton kernels share.

Glossary of shapes: as `triton_common`'s.
"""

from __future__ import annotations

import functools

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from flexible_attention.kernels import gpu
from flexible_attention.kernels.flash.mod_lowering import TileMods
from flexible_attention.kernels.flash.mod_lowering import add_partials
from flexible_attention.kernels.flash.mod_lowering import partial_sizes
from flexible_attention.kernels.flash.structure import Static
from flexible_attention.kernels.flash.structure import TileOrder
from flexible_attention.kernels.flash.triton_common import Call
from flexible_attention.kernels.flash.triton_common import add_structure
from flexible_attention.kernels.flash.triton_common import broadcast_block
from flexible_attention.kernels.flash.triton_common import broadcast_index
from flexible_attention.kernels.flash.triton_common import dot
from flexible_attention.kernels.flash.triton_common import exp2
from flexible_attention.kernels.flash.triton_common import keep_mask
from flexible_attention.kernels.flash.triton_common import loops
from flexible_attention.kernels.flash.triton_common import query_grid_call
from flexible_attention.kernels.flash.triton_common import scores
from flexible_attention.kernels.flash.triton_common import tile_of
from flexible_attention.kernels.flash.triton_common import visible


def _dkdv_kernel(*refs, names, st: Static, order: TileOrder):
  r = dict(zip(names, refs))
  launch = st.launch.dkv
  bq, bk = launch.block_q, launch.block_k
  j, b, hkv = order.at(*(pl.program_id(axis) for axis in range(3)))
  k = r["k"][...]  # [bk, Dp]
  v = r["v"][...]  # [bk, Dvp]
  kv_pos = r["kv_pos"][...]
  kv_ok = r["kv_ok"][...]
  kv_seg = r["kv_seg"][...] if st.segments else None
  kv_cols = pl.ds(0, bk)

  def head(g, carry):
    h = hkv * st.groups + g
    tm = TileMods(st.mods, r, b, h, True) if st.mods is not None else None
    bias_head = g if "bias" in r and r["bias"].shape[0] > 1 else 0
    mask_head = g if st.mask and r["mask"].shape[0] > 1 else 0

    def body(i, carry, masked):
      # Transposed tiles ([bk, bq]): every matmul takes loaded operands in
      # the layout it needs, no register tile is transposed.
      dk, dv, parts = carry
      qs = pl.multiple_of(i * bq, bq)
      rows = pl.ds(qs, bq)
      q = r["q"][rows, g, :]  # [bq, Dp]
      do = r["do"][rows, g, :]  # [bq, Dvp]
      lse = r["lse"][g, rows]  # [bq], base 2
      delta = r["delta"][g, rows]
      q_pos = r["q_pos"][rows]
      bias = (tile_of(r["bias"], rows, kv_cols, bias_head).T
              if "bias" in r else None)
      s, scale, dcap = scores(st, q, k, bias, transposed=True)  # [bk, bq]
      if st.score_mod:
        s, dmod, terms = tm.score_grads(s, q_pos, kv_pos)
      p = exp2(s, scale, lse[None, :])
      if masked:
        vis = visible(st, s.shape, q_pos, kv_pos, kv_ok,
                       r["q_seg"][rows] if st.segments else None, kv_seg,
                       tile_of(r["mask"], rows, kv_cols, mask_head).T
                       if st.mask else None, transposed=True, mods=tm)
        p = jnp.where(vis, p, 0.0)
      dp = dot(v, do, st, trans_b=True)  # [bk, bq]
      p_applied = p
      if st.dropout_rate is not None:
        inv = 1.0 / (1.0 - st.dropout_rate)
        keep = keep_mask(st, r["seed"], b, h, q_pos, kv_pos, transposed=True)
        p_applied = jnp.where(keep, p * inv, 0.0)
        dp = jnp.where(keep, dp * inv, 0.0)
      dv = dv + dot(p_applied.astype(do.dtype), do, st)  # [bk, Dvp]
      ds = p * (dp - delta[None, :])
      if st.score_mod:  # Zero where invisible (whatever the mod's slope).
        parts = add_partials(dict(parts), ds, terms)
        ds = jnp.where(ds != 0.0, ds * dmod, 0.0)
      if dcap is not None:
        ds = ds * dcap
      ds = (ds * st.sm_scale).astype(q.dtype)
      dk = dk + dot(ds, q, st)  # [bk, Dp]
      if st.launch.atomic_dq:
        plgpu.atomic_add(r["dq"], (rows, jnp.asarray(g, jnp.int32),
                                   slice(None)),
                         dot(ds, k, st, trans_a=True))  # [bq, Dp]
      return dk, dv, parts

    return loops(r["bounds"], j, body, carry)

  # Per-program partial gradients of the small float mod_args, [np] each.
  parts = {} if st.mods is None else {
      leaf: jnp.zeros((size,), jnp.float32)
      for leaf, size in partial_sizes(st.mods).items()}
  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
          parts)
  if st.groups == 1:
    dk, dv, parts = head(0, init)
  else:
    dk, dv, parts = lax.fori_loop(0, st.groups, head, init)
  r["dk"][...] = dk.astype(r["dk"].dtype)
  r["dv"][...] = dv.astype(r["dv"].dtype)
  for leaf, part in parts.items():
    r[f"dmod{leaf}"][...] = part



def _dq_kernel(*refs, names, st: Static, order: TileOrder, write_ds: bool):
  """dQ, or (`write_ds`) the logits' gradient tiles for the bias."""
  r = dict(zip(names, refs))
  launch = st.launch.dq
  bq, bk = launch.block_q, launch.block_k
  t, b, h = order.at(*(pl.program_id(axis) for axis in range(3)))
  i = order.tiles - 1 - t  # Heavy causal rows first.
  q = r["q"][...]
  do = r["do"][...]
  lse = r["lse"][...]
  delta = r["delta"][...]
  q_pos = r["q_pos"][...]
  q_seg = r["q_seg"][...] if st.segments else None
  q_rows = pl.ds(0, bq)
  tm = TileMods(st.mods, r, b, h, False) if st.mods is not None else None

  def body(j, dq, masked):
    ks = pl.multiple_of(j * bk, bk)
    kv = pl.ds(ks, bk)
    k = r["k"][kv, :]
    v = r["v"][kv, :]
    kv_pos = r["kv_pos"][kv]
    bias = tile_of(r["bias"], q_rows, kv) if "bias" in r else None
    s, scale, dcap = scores(st, q, k, bias)
    if st.score_mod:
      s, dmod, _ = tm.score_grads(s, q_pos, kv_pos, args=False)
    p = exp2(s, scale, lse[:, None])
    if masked:
      vis = visible(st, s.shape, q_pos, kv_pos, r["kv_ok"][kv], q_seg,
                     r["kv_seg"][kv] if st.segments else None,
                     tile_of(r["mask"], q_rows, kv) if st.mask else None,
                     mods=tm)
      p = jnp.where(vis, p, 0.0)
    dp = dot(do, v, st, trans_b=True)
    if st.dropout_rate is not None:
      keep = keep_mask(st, r["seed"], b, h, q_pos, kv_pos)
      dp = jnp.where(keep, dp * (1.0 / (1.0 - st.dropout_rate)), 0.0)
    ds = p * (dp - delta[:, None])
    if st.score_mod:  # Zero where invisible (whatever the mod's slope).
      ds = jnp.where(ds != 0.0, ds * dmod, 0.0)
    if write_ds:
      r["ds"][:, kv] = ds
      return dq
    if dcap is not None:
      ds = ds * dcap
    ds = (ds * st.sm_scale).astype(k.dtype)
    return dq + dot(ds, k, st)

  dq = jnp.zeros(q.shape, jnp.float32)
  if write_ds:
    # Every tile is written (invisible ones with zeros): no skipping.
    dq = lax.fori_loop(0, r["k"].shape[0] // bk,
                       functools.partial(body, masked=True), dq)
  else:
    dq = loops(r["bounds"], i, body, dq)
    r["dq"][...] = dq.astype(r["dq"].dtype)



def dkdv(st: Static, q, k, v, bias, aux, do, lse2, delta, grad_dtype):
  """dK and dV on padded operands.

  Args:
    st: the call's static record.
    q, k, v, bias, aux: as `triton_fwd.forward`'s (`aux` with
      `bounds_dkv`).
    do: `[B, Sqp, H, Dvp]`, the output's cotangent, in q's dtype.
    lse2: float32 `[B, H, Sqp]`, the rows' log-sum-exp in base 2 (0 for
      rows that see no key).
    delta: float32 `[B, H, Sqp]`, `rowsum(dO * O)` less the lse's
      cotangent.
    grad_dtype: the gradients' dtype (default the inputs').

  Returns:
    `(dk [B, Skp, Hkv, Dp], dv [B, Skp, Hkv, Dvp])`, with
    `st.launch.atomic_dq` also `dq [B, Sqp, H, Dp]` float32, and last the
    per-program partial gradients of the small float `mod_args` leaves,
    `{leaf: [B, Hkv, Skp / bk, np]}` float32 (`mod_lowering`; empty
    without a score_mod).
  """
  batch, q_len, _, d_pad = q.shape
  kv_len, num_kv_heads, dv_pad = k.shape[1], k.shape[2], v.shape[-1]
  bk = st.launch.dkv.block_k
  nk = kv_len // bk
  groups = st.groups
  order = TileOrder.choose(batch, num_kv_heads, nk, st.causal,
                           gpu.core_count(), kernel="dkv")
  call = Call(order)
  call.input("q", q, (None, q_len, groups, d_pad),
             lambda j, b, hkv: (b, 0, hkv, 0))
  call.input("k", k, (None, bk, None, d_pad), lambda j, b, hkv: (b, j, hkv, 0))
  call.input("v", v, (None, bk, None, dv_pad), lambda j, b, hkv: (b, j, hkv, 0))
  call.input("do", do, (None, q_len, groups, dv_pad),
             lambda j, b, hkv: (b, 0, hkv, 0))
  call.input("lse", lse2, (None, groups, q_len), lambda j, b, hkv: (b, hkv, 0))
  call.input("delta", delta, (None, groups, q_len),
             lambda j, b, hkv: (b, hkv, 0))
  add_structure(call, aux, st, q_len, bk, lambda j, b, hkv: (b, 0),
                 lambda j, b, hkv: (b, j))
  if bias is not None:
    call.input("bias", bias,
               broadcast_block(bias.shape, groups, q_len, bk, False),
               lambda j, b, hkv: broadcast_index(bias.shape, b, hkv, 0, j))
  if st.mask:
    mask = aux["mask"]
    call.input("mask", mask,
               broadcast_block(mask.shape, groups, q_len, bk, False),
               lambda j, b, hkv: broadcast_index(mask.shape, b, hkv, 0, j))
  call.input("bounds", aux["bounds_dkv"], (None, nk, 4),
             lambda j, b, hkv: (b, 0, 0))
  call.output("dk", k.shape, grad_dtype or k.dtype, (None, bk, None, d_pad),
              lambda j, b, hkv: (b, j, hkv, 0))
  call.output("dv", v.shape, grad_dtype or v.dtype, (None, bk, None, dv_pad),
              lambda j, b, hkv: (b, j, hkv, 0))
  if st.launch.atomic_dq:
    call.accumulator("dq", jnp.zeros(q.shape, jnp.float32),
                     (None, q_len, groups, d_pad),
                     lambda j, b, hkv: (b, 0, hkv, 0))
  sizes = {} if st.mods is None else partial_sizes(st.mods)
  for leaf, size in sizes.items():
    call.output(f"dmod{leaf}", (batch, num_kv_heads, nk, size), jnp.float32,
                (None, None, None, size), lambda j, b, hkv: (b, hkv, j, 0))
  results = call(_dkdv_kernel, order.grid, st.launch.dkv, st.interpret,
                 "flash_dkdv", st=st, order=order)
  count = len(results) - len(sizes)
  return tuple(results[:count]) + (dict(zip(sizes, results[count:])),)



def dq(st: Static, q, k, v, bias, aux, do, lse2, delta, write_ds: bool,
       grad_dtype=None):
  """dQ on padded operands, or (`write_ds`) `d(loss)/d(logits)`.

  Args: as `dkdv`'s (`aux` with `bounds_dq`).

  Returns:
    `dq [B, Sqp, H, Dp]` (grad_dtype, default q's), or with `write_ds` the
    float32 `[B, H, Sqp, Skp]` logits' gradient (every tile written).
  """
  batch, q_len, num_heads, d_pad = q.shape
  kv_len, dv_pad = k.shape[1], v.shape[-1]
  bq = st.launch.dq.block_q
  nq = q_len // bq
  order = TileOrder.choose(batch, num_heads, nq, st.causal, gpu.core_count(),
                           kernel="dq")
  call, qi = query_grid_call(st, q, k, v, bias, aux, bq, "bounds_dq", order)
  call.input("do", do, (None, bq, None, dv_pad),
             lambda i, b, h: (b, qi(i), h, 0))
  call.input("lse", lse2, (None, None, bq), lambda i, b, h: (b, h, qi(i)))
  call.input("delta", delta, (None, None, bq),
             lambda i, b, h: (b, h, qi(i)))
  if write_ds:
    call.output("ds", (batch, num_heads, q_len, kv_len), jnp.float32,
                (None, None, bq, kv_len), lambda i, b, h: (b, h, qi(i), 0))
    name = "flash_dbias"
  else:
    call.output("dq", q.shape, grad_dtype or q.dtype, (None, bq, None, d_pad),
                lambda i, b, h: (b, qi(i), h, 0))
    name = "flash_dq"
  (result,) = call(_dq_kernel, order.grid, st.launch.dq, st.interpret, name,
                   st=st, order=order, write_ds=write_ds)
  return result


