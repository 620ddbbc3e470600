"""flash's Mosaic GPU dK/dV kernel at Dp <= 128: the "rows" layout's
consumer warpgroups, with or without dQ (`mosaic_bwd` holds the kernel, its
operands, the producer and the Dp = 256 "columns" layout's dispatch).

Two consumers own 64 of the program's 128 keys each and accumulate their
dK and dV with `wgmma`; in the fused backward each also adds its half of
dQ's columns per step (`rows_consumer`).

Glossary of shapes: as `mosaic_bwd`'s (bq: `DKV_BLOCK_Q` query rows per
step; Dp: the padded head size).
"""

from __future__ import annotations

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from flexible_attention.kernels.flash.mosaic_common import BLOCK_Q
from flexible_attention.kernels.flash.mosaic_common import CONSUMERS
from flexible_attention.kernels.flash.mosaic_common import DKV_BLOCK_Q
from flexible_attention.kernels.flash.mosaic_common import FUSED_MODS_SMEM
from flexible_attention.kernels.flash.mosaic_common import ROWS
from flexible_attention.kernels.flash.mosaic_common import STAGES
from flexible_attention.kernels.flash.mosaic_common import key_vector
from flexible_attention.kernels.flash.mosaic_common import load_vector
from flexible_attention.kernels.flash.mosaic_common import logit_scale
from flexible_attention.kernels.flash.mosaic_common import probabilities
from flexible_attention.kernels.flash.mosaic_common import score_grads
from flexible_attention.kernels.flash.mosaic_common import smem_bytes
from flexible_attention.kernels.flash.mosaic_common import step_zero
from flexible_attention.kernels.flash.mosaic_common import visible
from flexible_attention.kernels.flash.mosaic_common import wgmma_zeros
from flexible_attention.kernels.flash.mosaic_mod_rows import dkv_mods_scratch
from flexible_attention.kernels.flash.mosaic_mod_rows import group_rows
from flexible_attention.kernels.flash.mosaic_mod_rows import head_mods
from flexible_attention.kernels.flash.mosaic_mod_split import key_terms
from flexible_attention.kernels.flash.mosaic_mods import grad_slots
from flexible_attention.kernels.flash.mosaic_mods import unmasked_reads
from flexible_attention.kernels.flash.mosaic_numerics import to_fixed_point
from flexible_attention.kernels.flash.structure import LOG2E


# A schedule of the rows layout's fused step, off (a profile of the fused
# backward, D = 128, 16k, put a fifth of its consumers' samples on wgmma
# waits: benchmarks/flash_notes.md): DQ_ADD_BESIDE_DK issues dK's wgmma
# after dQ's and adds dQ (fixed point, store, TMA) while dK's runs,
# instead of after both (the other's ds^T is then waited for behind dV's
# wgmma only). (Another, the step waiting for s^T's wgmma only and
# computing p while dp^T's runs, made the lagged fused backward 1.9-2.3%
# slower on an H100 and was removed; bb0b955 has it as EXP_BESIDE_DP.)
DQ_ADD_BESIDE_DK = False
# Two more, for the consumers' meet (the same profile: a third of their
# barrier waits were for the other's ds^T), on by default: with DQ_LAG (dQ;
# with mods where theirs fits beside the third buffer) each step takes the
# dQ of the step before, from three exchange buffers, so a consumer waits
# for the other's ds^T of the step before its own, not of the same step;
# with STAGGER too, consumer 1 starts once consumer 0's first s^T and dp^T
# are in, so that the two may run half a step apart (one's exp while the
# other's wgmmas run, as FlashAttention-3's ping-pong forward). DQ_LAG's
# step replaces DQ_ADD_BESIDE_DK's. Both together made the fused backward
# 4-7% faster on an H100 (benchmarks/BENCHMARKS.md).
DQ_LAG = True
STAGGER = True
# (A third, the consumers taking turns each step to issue their matmuls,
# FlashAttention-3's ping-pong enforced where STAGGER only sets the start,
# made the backward 6.5% slower on an H100 and was removed; d877edf has
# it.)


def lagged(st, head_dim: int) -> bool:
  """Whether the fused dK/dV kernel of `st` at padded head size `head_dim`
  takes each step's dQ a step late (`DQ_LAG`): where the mods' shared
  memory (`dkv_mods_scratch`) fits beside the third exchange buffer in
  what the kernel leaves them (`FUSED_MODS_SMEM`; else it keeps two)."""
  if not (DQ_LAG and st.launch.atomic_dq):
    return False
  third = CONSUMERS * ROWS * DKV_BLOCK_Q * 2  # 16-bit ds^T tiles.
  return st.mods is None or (
      smem_bytes(dkv_mods_scratch(st.mods, st.groups)) + third
      <= FUSED_MODS_SMEM[head_dim])


def exchange_buffers(st, head_dim: int) -> int:
  """The steps' ds^T buffers of the fused dK/dV kernel's exchange."""
  return 3 if lagged(st, head_dim) else 2


def staggered(st, head_dim: int) -> bool:
  """Whether consumer 1 of the fused dK/dV kernel starts half a step
  after consumer 0 (`STAGGER`, with `DQ_LAG`); the exchange then has a
  barrier for it."""
  return STAGGER and lagged(st, head_dim)


def rows_consumer(r, lo, flo, fhi, hi, w=None):
  """Dp <= 128: warpgroup w < 2 owns keys `[64 w, 64 w + 64)` of the
  program's 128 and all of their dK and dV columns.

  With `r.dq` (the fused backward; `w` then static) each step also adds the
  program's share of the step's dQ rows, `ds k` over its 128 keys, split by
  columns: each warpgroup writes its `ds^T` to its tile of the step's
  exchange buffer (which also feeds its `dk += ds^T q`), signals it, waits
  for the other's, and takes dQ's columns `[w Dp / 2, (w + 1) Dp / 2)` from
  two `wgmma`s (A: each tile's transposed view; B: the same columns of its
  K tile). The float32 `[bq, Dp / 2]` result leaves by TMA reduce-add from
  the warpgroup's dQ tile: one `[bq, Dp]` add per step and program (not
  one per warpgroup), and a `[64, Dp / 2]` accumulator beside dK and dV.
  The exchange has two buffers, used by alternate steps: a warpgroup
  rewrites one only after the other has signalled the next step's, so
  after its reads of this one are done. Lagged (`lagged`), it has three,
  step n's dQ columns come from step n + 1's matmuls (a zero ds^T in the
  last buffer stands for step -1's, the last step's after the loop), and a
  warpgroup waits for the other's ds^T of step n - 1 before writing its
  own of step n: the other has then read step n - 3's, the buffer's last.

  With `r.fixed_point` dQ is int32: the warpgroup adds `trunc(x s)`, s the
  rows' scales (`fixed_point_scales`, a third row of the step's stats),
  from an int32 tile, so the sum's bits do not depend on the order of the
  adds.

  With mods (`r.st.mods`) the warpgroup first copies the program values of
  the group's G query heads to its shared memory (`mosaic_mods.
  group_rows`); each step reads head g's as scalars and evaluates the
  mods on its transposed tile: the mask_mod on masked tiles, the score_mod
  and its derivative in the logits (forward mode) on every one. With
  `r.dslots` it also accumulates, per slot of `grad_slots`, the `[64]` row
  sums of `p (dp - delta) * d(score_mod)/d(value)` over head g's steps, and
  after them stores the `[n, 64]` sums through its shared-memory tile to
  `r.dslots` (TMA; a head's copy has read the tile before the next head
  overwrites it).
  """
  st = r.st
  batch, kv_head, bq = r.batch, r.kv_head, r.bq
  with_dq = r.dq is not None
  wg = r.wg if w is None else w
  keys = pl.ds(r.tile * BLOCK_Q + wg * ROWS, ROWS)
  k_tile, v_tile = r.k_smem.at[wg], r.v_smem.at[wg]
  lag = with_dq and lagged(st, r.k.shape[-1])
  lead = ()  # Staggered (`staggered`): consumer 0's start.
  if with_dq:  # [2 or 3, CONSUMERS, 64, bq], [CONSUMERS, bq, Dp / 2].
    ds_smem, dq_smem, ds_ready, both_done, *lead = r.exchange
    buffers = ds_smem.shape[0]
    half = r.k.shape[-1] // CONSUMERS
    cols = pl.ds(w * half, half)
  plgpu.copy_gmem_to_smem(r.k.at[batch, keys, kv_head], k_tile,
                          r.k_ready.at[wg])
  plgpu.copy_gmem_to_smem(r.v.at[batch, keys, kv_head], v_tile,
                          r.v_ready.at[wg])
  plgpu.copy_gmem_to_smem(r.kvvec.at[batch, :, keys], r.kvvec_smem.at[wg],
                          r.kvvec_ready.at[wg])
  mod_rows = None if st.mods is None else group_rows(
      r.mod_refs, r.mod_scratch, batch, kv_head, st.groups, wg)
  slots = grad_slots(st.mods) if r.dslots is not None else range(0)
  # The query vectors an unmasked tile reads: the score_mod's positions
  # (those of its slot gradients only, when split).
  unmasked_q = unmasked_reads(None if r.split and not slots else st.mods,
                              "q_pos")
  plgpu.barrier_wait(r.kvvec_ready.at[wg])
  kv_vec = r.key_vectors(r.kvvec_smem.at[wg])
  if r.split:  # The keys' positions, down the transposed tiles' rows.
    kv_rows = key_vector(st, r.kvvec_smem, wg, "kv_pos", dim=1)
  plgpu.barrier_wait(r.k_ready.at[wg])
  plgpu.barrier_wait(r.v_ready.at[wg])

  def step(i, carry, masked: bool, base, g):
    dk, dv, prev, dslots = carry
    n = base + i - lo  # The program's step.
    slot = lax.rem(n, STAGES)
    # With dQ at Dp = 128, per-step K / V descriptors (`mosaic_bwd`;
    # at Dp = 64 they were slower, without dQ as fast: flash_notes.md).
    zero = 0
    if with_dq and r.k.shape[-1] > 64:
      zero = step_zero(i)
      k_step, v_step = r.k_smem.at[wg + zero], r.v_smem.at[wg + zero]
    else:
      k_step, v_step = k_tile, v_tile
    plgpu.barrier_wait(r.q_ready.at[slot])
    plgpu.barrier_wait(r.do_ready.at[slot])

    def step_inputs():  # What p needs besides s^T: stats, query vectors.
      plgpu.barrier_wait(r.stats_ready.at[slot])
      plgpu.barrier_wait(r.qvec_ready.at[slot])
      dq_scale = None
      if with_dq and r.fixed_point:  # Read before the slot is freed.
        dq_scale = load_vector(r.stats_smem.at[slot, 2],
                               plgpu.Layout.WGMMA.reduce(1))
        if not lag:  # Lagged, the [bq] scales wait a step.
          dq_scale = lax.broadcast_in_dim(dq_scale, (bq, half), [0])
      q_vec = r.query_vectors(slot, r.q_names if masked else unmasked_q)
      vis = visible(st, q_vec, kv_vec) if masked else None
      mods = (None if st.mods is None else
              head_mods(st, mod_rows, g, (ROWS, bq)))
      q_pos, kv_pos = q_vec.get("q_pos"), kv_vec.get("kv_pos")
      if masked and st.mask_mod:
        vis = vis & mods.visible(q_pos, kv_pos)
      return dq_scale, vis, mods, q_pos, kv_pos

    def softmax(s, vis, mods, q_pos, kv_pos):  # p, dcap, dmod, natural.
      natural = []  # The score_mod's input: the natural-unit logits.
      key = None
      if r.split:  # The key terms, relative to the step's first query.
        ref = r.qvec_smem[slot, r.q_names.index("q_pos"), 0]
        key = lax.broadcast_in_dim(key_terms(
            mods, kv_rows, ref, logit_scale(st) / LOG2E), (ROWS, bq), [0])
        # The slots' derivatives of `score + a q + b k + c` do not read
        # the score: any tile serves as their input.
        natural.append(s)

      def score(s):
        natural.append(s)
        return mods.score_grads(s, q_pos, kv_pos)

      return (*probabilities(st, s, r.column(r.stats_smem.at[slot, 0]), vis,
                             score if st.score_mod else None, key), natural)

    def transposed_scores(s_ref, dp_ref):  # s^T = k q^T, dp^T = v do^T.
      plgpu.wgmma(s_ref, k_step, r.q_smem.at[slot].transpose((1, 0)))
      plgpu.wgmma(dp_ref, v_step, r.do_smem.at[slot].transpose((1, 0)))
      return s_ref[...], dp_ref[...]

    score_tiles = [plgpu.ACC((ROWS, bq), jnp.float32)] * 2
    s, dp = pl.run_scoped(transposed_scores, *score_tiles)
    if lead and w == 0:  # Consumer 1 may start its first step.
      pl.when(n == 0)(lambda: plgpu.barrier_arrive(lead[0]))
    dq_scale, vis, mods, q_pos, kv_pos = step_inputs()
    p, dcap, dmod, natural = softmax(s, vis, mods, q_pos, kv_pos)
    p_kept = p  # dV's: the kept p (its 1 / (1 - rate) once, at the end).
    if r.drop is not None:  # dp: the gradient of the kept p, scaled.
      keep = r.keep(slot, g, kv_vec)
      p_kept = jnp.where(keep, p, 0.0)
      dp = jnp.where(keep, dp * r.drop.scale, 0.0)
    x = dp - r.column(r.stats_smem.at[slot, 1])
    ds = score_grads(st, p, dcap, x, r.dtype, dmod)
    if slots:  # p (dp - delta): the modified logits' cotangent, times
      # d(score_mod)/d(value), one slot at a time (one tile live).
      post = p * x
      dslots = tuple(acc + jnp.where(post != 0.0, post * mods.slot_grads(
          natural[0], q_pos, kv_pos, (n,))[0], 0.0).sum(axis=1)
                     for acc, n in zip(dslots, slots))

    def accumulate(refs):  # dv += p^T do, dk += ds^T q (transposed tiles),
      # and with dQ its columns of ds k, from a fresh accumulator.
      plgpu.wgmma(refs[0], p_kept.astype(r.dtype), r.do_smem.at[slot])
      if not with_dq:
        plgpu.wgmma(refs[1], ds, r.q_smem.at[slot])
        return
      buf = lax.rem(base + i - lo, buffers)
      if lag:  # The other's ds^T of step n - 1 (its reads of buf done).
        last = lax.rem(n + buffers - 1, buffers)
        plgpu.barrier_wait(ds_ready.at[last])
      ds_smem.at[buf, w][...] = ds
      plgpu.commit_smem()
      plgpu.barrier_arrive(ds_ready.at[buf])
      if lag:  # dK's, then step n - 1's dQ columns.
        plgpu.wgmma(refs[1], ds_smem.at[buf, w], r.q_smem.at[slot])
        dq_columns(refs[2], last, zero)
        return
      if not DQ_ADD_BESIDE_DK:
        plgpu.wgmma(refs[1], ds_smem.at[buf, w], r.q_smem.at[slot])
      plgpu.barrier_wait(ds_ready.at[buf])  # The other's ds^T is there.
      dq_columns(refs[2], buf, zero)
      if DQ_ADD_BESIDE_DK:  # dK's wgmma runs while dQ is added.
        plgpu.wgmma(refs[1], ds_smem.at[buf, w], r.q_smem.at[slot])
        add_dq(plgpu.wgmma_accumulator_load(refs[2], wait_n=1),
               r.query_tile(i, lo, hi), g, dq_scale)

    accumulators = (plgpu.ACC.init(dv), plgpu.ACC.init(dk))
    if with_dq:
      accumulators += (plgpu.ACC.init(wgmma_zeros(half)),)
    dv, dk, *dq_add = pl.run_state(accumulate)(accumulators)
    plgpu.barrier_arrive(r.free.at[slot])
    if lag:  # Step n - 1's; this step's waits for the next.
      pl.when(n > 0)(lambda: add_dq(dq_add[0], *prev))
      prev = (r.query_tile(i, lo, hi), g, dq_scale)
    elif with_dq and not DQ_ADD_BESIDE_DK:
      add_dq(dq_add[0], r.query_tile(i, lo, hi), g, dq_scale)
    return (dk, dv, prev, dslots)

  def dq_columns(acc, buf, zero):  # += ds k: the columns of both ds^T.
    for x in range(CONSUMERS):
      plgpu.wgmma(acc, ds_smem.at[buf, x].transpose((1, 0)),
                  r.k_smem.at[x + zero, :, cols])

  def add_dq(dq, tile_index, g, dq_scale):  # A step's dQ columns (query
    # tile `tile_index`, query head g of the group) into r.dq (TMA
    # reduce-add). Its views are made here: one made outside a run_state
    # body (where this may run) and closed over does not lower (jax 0.11.2).
    head, tile = kv_head * st.groups + g, dq_smem.at[w]
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # The last add's read.
    if r.fixed_point and dq_scale.ndim == 1:  # [bq] (lagged).
      dq_scale = lax.broadcast_in_dim(dq_scale, (bq, half), [0])
    tile[...] = to_fixed_point(dq, dq_scale) if r.fixed_point else dq
    plgpu.commit_smem()
    rows = pl.ds(tile_index * bq, bq)
    plgpu.copy_smem_to_gmem(tile, r.dq.at[batch, rows, head, cols],
                            reduction_op="add")

  def end(g, carry):  # Head g's slot sums out; the next head's from zero.
    dk, dv, prev, dslots = carry
    dslots_tile = r.dslots_smem.at[wg]  # [n, 64]
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # The last head's.
    for n, x in enumerate(dslots):
      dslots_tile.at[n][...] = x
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dslots_tile,
                            r.dslots.at[batch, kv_head, r.tile, wg, g])
    return (dk, dv, prev, tuple(wgmma_zeros(None) for _ in dslots))

  prev = ()  # Lagged: the last step's query tile, head and dQ scales.
  if lag:
    total = st.groups * (hi - lo)  # The program's steps.
    # Step -1's zero ds^T; consumer 1 waits for consumer 0's start.
    ds_smem.at[buffers - 1, w][...] = wgmma_zeros(bq).astype(r.dtype)
    plgpu.commit_smem()
    plgpu.barrier_arrive(ds_ready.at[buffers - 1])
    if lead and w == 1:
      pl.when(total > 0)(lambda: plgpu.barrier_wait(lead[0]))
    prev = (lo, jnp.int32(0), wgmma_zeros(None) if r.fixed_point else None)
  dk, dv, prev, _ = r.loop(
      lo, flo, fhi, hi, step,
      (wgmma_zeros(r.k.shape[-1]), wgmma_zeros(r.v.shape[-1]), prev,
       tuple(wgmma_zeros(None) for _ in slots)), end if slots else None)
  if lag:  # The last step's dQ (step -1's zero one without steps).
    last = lax.rem(total + buffers - 1, buffers)
    plgpu.barrier_wait(ds_ready.at[last])
    (dq,) = pl.run_state(lambda refs: dq_columns(refs[0], last, 0))(
        (plgpu.ACC.init(wgmma_zeros(half)),))
    pl.when(total > 0)(lambda: add_dq(dq, *prev))
  if with_dq:  # The other's last dQ matmuls have read this K tile.
    plgpu.barrier_arrive(both_done)
    plgpu.barrier_wait(both_done)
  if r.drop is not None:
    dv = dv * r.drop.scale
  k_tile[...] = dk.astype(r.dtype)  # K and V are spent: reuse their tiles.
  v_tile[...] = dv.astype(r.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_tile, r.dk.at[batch, keys, kv_head])
  plgpu.copy_smem_to_gmem(v_tile, r.dv.at[batch, keys, kv_head])
  plgpu.wait_smem_to_gmem(0)  # With dQ or the slots, their last copies.


