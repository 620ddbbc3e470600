"""flash's dQ kernel for Hopper, in Mosaic GPU.

Computes what the Triton dQ kernel (`triton_bwd.dq`) computes, for the
calls the Mosaic forward serves (`mosaic_common.unsupported_reason`), with
the score / mask mods it evaluates (`mosaic_mods`: the program's values
read once, the tile part on each tile, and the score_mod's derivative in
the score in forward mode, `TileMods.score_grads`; `mod_args`' gradients
are the dK/dV kernel's), from the same padded operands, structure vectors
and skipping bounds (`bounds_dq`, for this kernel's tiles), and is built
like the forward (`mosaic_fwd`), of which it is the backward sibling:

- three warpgroups per program of `BLOCK_Q` query rows: a producer that
  streams K, V and the keys' structure vectors into `STAGES` shared-memory
  slots with TMA (`mosaic_common.stream_keys`, the forward's), and two
  consumers of 64 rows each, which hold their q and dO tiles in shared
  memory and their rows' base-2 log-sum-exp and `delta` in registers;
- per key tile a consumer runs `s = q k^T` and `dp = dO v^T` as
  asynchronous `wgmma`s, forms `p = exp2(s * scale - lse)` (masked as the
  forward masks) and `ds = p (dp - delta)` (through the score_mod and the
  soft cap, times the softmax scale: `mosaic_common.probabilities`,
  `score_grads`, the Mosaic dK/dV kernel's; with dropout `dp` of the kept
  `p`, `mosaic_common.TileDropout`), and adds `ds k` into its
  float32 `[64, Dp]` dQ with a `wgmma` that takes `ds` from registers (as
  the forward takes `p`);
- the consumers ping-pong through a named barrier as the forward's do, so
  one's elementwise work overlaps the other's matmuls;
- the programs start head by head, heavy causal query tiles first, or (a
  causal call, by default: `structure.GROUPED_CAUSAL_DQ`) tile by tile over
  groups of heads (`structure.TileOrder`, the dK/dV kernels' order).

dQ is written in the inputs' dtype (the Triton kernel writes any
`grad_dtype`; the launch policy keeps float32 results on Triton).

Budget per program (16-bit inputs; 227 KiB of shared memory a block, 232
registers a consumer thread): shared memory holds q and dO (`2 * 2 * 64 *
Dp * 2` bytes) and `STAGES` = 2 slots of K and V (`2 * 2 * bk * Dp * 2`),
registers the float32 dQ (`Dp / 2` a thread), `s` and `dp` (`bk / 2` each)
and `ds` (`bk / 4`, 16-bit pairs):

| Dp  | bk  | shared memory | registers a consumer thread    |
|-----|-----|---------------|--------------------------------|
| 64  | 128 | 96 KiB        | 32 + 64 + 64 + 32 ds = 192     |
| 128 | 64  | 128 KiB       | 64 + 32 + 32 + 16 ds = 144     |
| 256 | 64  | 256 KiB       | 128 + 32 + 32 + 16 ds = 208    |

Dp = 256 does not fit (`mosaic_common.dq_reason`: the launch policy keeps
it on Triton): `wgmma` takes K tiles of at least 64 keys (its K dimension
with the 128-byte swizzle), and 32-key tiles would be needed.

Glossary of shapes:
- B: batch size; H, Hkv: query and key/value heads; G = H // Hkv.
- Sqp, Skp: query and key lengths padded to whole tiles (`BLOCK_Q`, bk).
- Dp: the padded head size (64, 128 or 256).
- Nq, Nk: the number of query / key structure vectors (`Static.vectors`).
- nq: Sqp // BLOCK_Q, the number of query tiles.
- bk: the key tile (`dq_block_k(Dp)`).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from flexible_attention.kernels import gpu
from flexible_attention.kernels.flash.mosaic_common import BLOCK_Q
from flexible_attention.kernels.flash.mosaic_common import BOUNDS_ROW
from flexible_attention.kernels.flash.mosaic_common import CONSUMERS
from flexible_attention.kernels.flash.mosaic_common import CONSUMER_REGISTERS
from flexible_attention.kernels.flash.mosaic_common import ROWS
from flexible_attention.kernels.flash.mosaic_common import STAGES
from flexible_attention.kernels.flash.mosaic_common import TileDropout
from flexible_attention.kernels.flash.mosaic_common import dq_block_k
from flexible_attention.kernels.flash.mosaic_common import dq_reason
from flexible_attention.kernels.flash.mosaic_common import key_vector
from flexible_attention.kernels.flash.mosaic_common import key_vectors
from flexible_attention.kernels.flash.mosaic_common import load_vector
from flexible_attention.kernels.flash.mosaic_common import logit_scale
from flexible_attention.kernels.flash.mosaic_common import meet
from flexible_attention.kernels.flash.mosaic_common import probabilities
from flexible_attention.kernels.flash.mosaic_common import query_vectors
from flexible_attention.kernels.flash.mosaic_common import score_grads
from flexible_attention.kernels.flash.mosaic_common import stream_keys
from flexible_attention.kernels.flash.mosaic_common import visible
from flexible_attention.kernels.flash.mosaic_common import wgmma_transforms
from flexible_attention.kernels.flash.mosaic_mod_rows import consumer_mods
from flexible_attention.kernels.flash.mosaic_mod_rows import row_operands
from flexible_attention.kernels.flash.mosaic_mod_rows import row_scratch
from flexible_attention.kernels.flash.mosaic_mod_rows import split_row_refs
from flexible_attention.kernels.flash.mosaic_mod_rows import split_row_scratch
from flexible_attention.kernels.flash.mosaic_mod_split import key_terms
from flexible_attention.kernels.flash.mosaic_mod_split import split_lse2
from flexible_attention.kernels.flash.mosaic_mod_split import split_slot
from flexible_attention.kernels.flash.mosaic_mods import unmasked_reads
from flexible_attention.kernels.flash.mosaic_schedule import bounds_count
from flexible_attention.kernels.flash.mosaic_schedule import pad_bounds
from flexible_attention.kernels.flash.mosaic_schedule import query_tile_kernel
from flexible_attention.kernels.flash.mosaic_schedule import query_tile_loop
from flexible_attention.kernels.flash.mosaic_schedule import query_tile_program
from flexible_attention.kernels.flash.mosaic_schedule import ranked_bounds
from flexible_attention.kernels.flash.mosaic_schedule import ranked_order
from flexible_attention.kernels.flash.mosaic_schedule import ranked_tile_order
from flexible_attention.kernels.flash.structure import LOG2E
from flexible_attention.kernels.flash.structure import Static
from flexible_attention.kernels.flash.structure import TileOrder


def _kernel(q_ref, k_ref, v_ref, do_ref, stats_ref, bounds_ref, qvec_ref,
            kvvec_ref, mod_refs, dq_ref, scratch, mod_scratch, *, st: Static,
            bk: int, order: TileOrder, split: bool, ranked: bool):
  """One program: dQ of `BLOCK_Q` query rows of one (batch, head) pair.

  `mod_refs`, `mod_scratch`: the mods' program values and their
  shared-memory rows, as the forward's (`mosaic_fwd._kernel`); `split`,
  as there: the logits gain the key terms, the lse read leaves out the
  row terms (`mosaic_mods.split_lse2`)."""
  (q_smem, do_smem, k_smem, v_smem, qvec_smem, kvvec_smem, stats_smem,
   bounds_smem, ready, free, sched) = scratch
  (q_ready, do_ready, stats_ready, qvec_ready, k_ready, v_ready, kvvec_ready,
   bounds_ready) = ready
  k_free, v_free = free
  dtype = q_ref.dtype
  kv_names = st.vectors()[1]
  tile, batch, head, wg, (lo, flo, fhi, hi, *seed) = query_tile_program(
      bounds_ref, bounds_smem, bounds_ready, order, bounds_count(st),
      ranked)
  drop = TileDropout(st, seed, batch) if seed else None
  sync = functools.partial(meet, sched)  # The consumers' ping-pong.

  @pl.when(wg < CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
    rows = tile * BLOCK_Q + wg * ROWS
    q_tile, do_tile = q_smem.at[wg], do_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(rows, ROWS), head], q_tile,
                            q_ready.at[wg])
    plgpu.copy_gmem_to_smem(do_ref.at[batch, pl.ds(rows, ROWS), head],
                            do_tile, do_ready.at[wg])
    plgpu.copy_gmem_to_smem(stats_ref.at[batch, head, :, pl.ds(rows, ROWS)],
                            stats_smem.at[wg], stats_ready.at[wg])
    mods = consumer_mods(st, mod_refs, mod_scratch, batch, head, wg,
                         (ROWS, bk))
    q_vec = query_vectors(st, qvec_ref, qvec_smem, qvec_ready, batch, wg,
                          rows, (ROWS, bk))
    if split:  # The key terms' reference: this consumer's first position.
      ref = qvec_smem[wg, st.vectors()[0].index("q_pos"), 0]
    plgpu.barrier_wait(stats_ready.at[wg])
    # The rows' base-2 log-sum-exp and delta, across a `[64, bk]` tile.
    lse, delta = (lax.broadcast_in_dim(
        load_vector(stats_smem.at[wg, n], plgpu.Layout.WGMMA.reduce(1)),
        (ROWS, bk), [0]) for n in range(2))
    if drop is not None:  # The rows' hash, once.
      drop_rows = drop.rows(head, load_vector(
          qvec_smem.at[wg, st.vectors()[0].index("q_pos")],
          plgpu.Layout.WGMMA.reduce(1)), (ROWS, bk), 0)
    plgpu.barrier_wait(q_ready.at[wg])
    plgpu.barrier_wait(do_ready.at[wg])

    # The key vectors an unmasked tile reads: the score_mod's or the
    # dropout hash's positions.
    unmasked_kv = unmasked_reads(None if split else st.mods, "kv_pos",
                                 drop is not None)

    def step(t, dq, masked: bool):
      slot = lax.rem(t - lo, STAGES)
      plgpu.barrier_wait(k_ready.at[slot])
      plgpu.barrier_wait(v_ready.at[slot])

      def scores(s_ref, dp_ref):  # s = q k^T, dp = dO v^T.
        plgpu.wgmma(s_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
        plgpu.wgmma(dp_ref, do_tile, v_smem.at[slot].transpose((1, 0)))
        sync()  # The other consumer's matmuls go next.
        return s_ref[...], dp_ref[...]

      s, dp = pl.run_scoped(scores, plgpu.ACC((ROWS, bk), jnp.float32),
                            plgpu.ACC((ROWS, bk), jnp.float32))
      plgpu.barrier_arrive(v_free.at[slot])
      plgpu.barrier_wait(kvvec_ready.at[slot])  # Every phase, as K's.
      kv = key_vectors(st, kvvec_smem, slot,
                       kv_names if masked else unmasked_kv, (ROWS, bk))
      vis = visible(st, q_vec, kv) if masked else None
      if masked and st.mask_mod:
        vis = vis & mods.visible(q_vec.get("q_pos"), kv.get("kv_pos"))
      key = score = None
      if split:  # One add per element: the key terms, from a vector.
        key = lax.broadcast_in_dim(key_terms(mods, key_vector(
            st, kvvec_smem, slot, "kv_pos"), ref, logit_scale(st) / LOG2E),
                                   s.shape, [1])
      elif st.score_mod:
        score = functools.partial(mods.score_grads, q_pos=q_vec.get("q_pos"),
                                  kv_pos=kv.get("kv_pos"))
      p, dcap, dmod = probabilities(st, s, lse, vis, score, key)
      if drop is not None:  # The gradient of the kept p, scaled.
        dp = jnp.where(drop.keep(drop_rows, kv["kv_pos"]), dp * drop.scale,
                       0.0)
      ds = score_grads(st, p, dcap, dp - delta, dtype, dmod)
      plgpu.barrier_arrive(sched)  # The elementwise work is done.
      plgpu.barrier_wait(sched)  # The tensor cores are ours again.

      def accumulate(acc_ref):  # dq += ds k.
        plgpu.wgmma(acc_ref, ds, k_smem.at[slot])

      dq = pl.run_state(accumulate)(plgpu.ACC.init(dq))
      plgpu.barrier_arrive(k_free.at[slot])
      return dq

    dq = plgpu.layout_cast(jnp.zeros((ROWS, q_ref.shape[-1]), jnp.float32),
                           plgpu.Layout.WGMMA)
    dq = query_tile_loop(step, dq, (lo, flo, fhi, hi), sched, wg)

    q_tile[...] = dq.astype(dtype)  # The query tile is spent: reuse it.
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[batch, pl.ds(rows, ROWS), head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == CONSUMERS)
  def _producer():
    stream_keys(st, k_ref, v_ref, kvvec_ref, (k_smem, v_smem, kvvec_smem),
                (k_ready, v_ready, kvvec_ready), (k_free, v_free), bk=bk,
                batch=batch, head=head, lo=lo, hi=hi)


def dq(st: Static, q, k, v, do, lse2, delta, bounds, q_vectors, kv_vectors,
       mod_rows=(None, None), seed=None):
  """dQ on padded operands (the Triton dQ kernel's function).

  Args:
    st: the call's static structure.
    q: `[B, Sqp, H, Dp]`, bf16 or fp16, Sqp a multiple of `BLOCK_Q`.
    k: `[B, Skp, Hkv, Dp]`, Skp a multiple of `dq_block_k(Dp)`.
    v: `[B, Skp, Hkv, Dp]`.
    do: `[B, Sqp, H, Dp]`, the output's cotangent, in q's dtype.
    lse2: float32 `[B, H, Sqp]`, the rows' log-sum-exp in base 2 (0 for
      rows that see no key).
    delta: float32 `[B, H, Sqp]`, `rowsum(dO * O)` (less the lse's
      cotangent).
    bounds: int32 `[B, Sqp // BLOCK_Q, 4]`, per query tile the key tiles
      `[lo, hi)` that may be visible and, inside, `[flo, fhi)` that are
      fully visible (`structure.bounds_table` for tiles `BLOCK_Q x
      dq_block_k(Dp)`: `bounds_dq` of the launch `mosaic_dq_launch(Dp)`).
    q_vectors: int32 `[B, Nq, Sqp]` (a zero `[B, 1, Sqp]` when Nq = 0).
    kv_vectors: int32 `[B, Nk, Skp]` (`kv_ok` first).
    mod_rows: with mods (`st.mods`, which `mosaic_mods.plan` accepts), their
      program values, as the forward's (`mosaic_mods.program_rows`).
    seed: with dropout, uint32 `[4]`, as the forward's.

  Returns:
    `dq [B, Sqp, H, Dp]` in q's dtype (0 for rows that see no key).
  """
  batch, q_len, heads, d = q.shape
  kv_len = k.shape[1]
  reason = dq_reason(d)
  if reason is not None:
    raise ValueError(f"flash (Mosaic GPU): {reason}.")
  bk = dq_block_k(d)
  nq = q_len // BLOCK_Q
  if q_len % BLOCK_Q or kv_len % bk:
    raise ValueError(f"flash (Mosaic GPU dQ): Sqp = {q_len} and Skp = "
                     f"{kv_len} must be multiples of {BLOCK_Q} and {bk}.")
  swizzled = wgmma_transforms(q.dtype)
  nqv, nkv = q_vectors.shape[1], kv_vectors.shape[1]
  split = split_slot(st.mods, st.causal) is not None
  lse2 = split_lse2(st, lse2, mod_rows, q_vectors)
  stats = jnp.stack([lse2, delta], axis=2)  # [B, H, 2, Sqp]
  bounds = pad_bounds(bounds, seed)
  ranked = ranked_order(st, "dq")
  if ranked:  # Heavy query tiles first over every (batch row, head).
    bounds = ranked_bounds(bounds)
    order = ranked_tile_order(batch, heads, nq)
  else:
    order = TileOrder.choose(batch, heads, nq, st.causal, gpu.core_count(),
                             kernel="dq")

  def flash_dq(*refs):
    refs = list(refs)
    operands, dq_ref = refs[:8], refs[-1]
    mod_refs = split_row_refs(mod_rows, refs[8:-1])
    smem = (
        plgpu.SMEM((CONSUMERS, ROWS, d), q.dtype, transforms=swizzled),
        plgpu.SMEM((CONSUMERS, ROWS, d), do.dtype, transforms=swizzled),
        plgpu.SMEM((STAGES, bk, d), k.dtype, transforms=swizzled),
        plgpu.SMEM((STAGES, bk, d), v.dtype, transforms=swizzled),
        plgpu.SMEM((CONSUMERS, nqv, ROWS), jnp.int32),
        plgpu.SMEM((STAGES, nkv, bk), jnp.int32),
        plgpu.SMEM((CONSUMERS, 2, ROWS), jnp.float32),
        plgpu.SMEM((CONSUMERS + 1, BOUNDS_ROW), jnp.int32),
    )
    ready = ((plgpu.Barrier(num_barriers=CONSUMERS),) * 4
             + (plgpu.Barrier(num_barriers=STAGES),) * 3
             + (plgpu.Barrier(num_barriers=CONSUMERS + 1),))
    free = (plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=STAGES),) * 2
    sched = plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=1)

    def scoped(smem_refs, ready_refs, free_refs, sched_ref, row_refs):
      _kernel(*operands, mod_refs, dq_ref,
              (*smem_refs, ready_refs, free_refs, sched_ref),
              split_row_scratch(mod_rows, row_refs), st=st, bk=bk,
              order=order, split=split, ranked=ranked)

    pl.run_scoped(scoped, smem, ready, free, sched, row_scratch(mod_rows),
                  collective_axes="wg")

  return query_tile_kernel(
      flash_dq, jax.ShapeDtypeStruct(q.shape, q.dtype), order)(
          q, k, v, do, stats, bounds, q_vectors, kv_vectors,
          *row_operands(mod_rows))
