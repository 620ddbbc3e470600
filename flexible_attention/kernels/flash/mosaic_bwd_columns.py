"""flash's Mosaic GPU dK/dV kernel at Dp = 256: the "columns" layout's
consumer warpgroups (`mosaic_bwd` holds the kernel, its operands and the
rows layout).

At Dp = 256 the dK and dV accumulators of 64 keys fill both consumers'
registers, so the consumers share the program's 64 keys and split dK's and
dV's columns, exchanging `p`, `dp - delta` and `ds` through shared memory
(FlashAttention-3's hdim-256 layout).

Glossary of shapes: as `mosaic_bwd`'s (bq: `DKV_BLOCK_Q` query rows per
step; Dp: the padded head size).
"""

from __future__ import annotations

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from flexible_attention.kernels.flash.mosaic_common import CONSUMERS
from flexible_attention.kernels.flash.mosaic_common import ROWS
from flexible_attention.kernels.flash.mosaic_common import STAGES
from flexible_attention.kernels.flash.mosaic_common import load_vector
from flexible_attention.kernels.flash.mosaic_common import probabilities
from flexible_attention.kernels.flash.mosaic_common import score_grads
from flexible_attention.kernels.flash.mosaic_common import wgmma_zeros


def columns_consumer(r, lo, flo, fhi, hi, *, w: int):
  """Dp = 256: the program's 64 keys; warpgroup w owns dK's and dV's
  columns `[128 w, 128 w + 128)`.

  Per step, warpgroup 0 computes `s^T = k q^T` and
  `p^T`, the other `dp^T = v do^T` and passes `dp^T - delta` to it through
  shared memory; the first forms `ds^T` and passes it and `p^T` back. Each
  then accumulates its columns: `dv_w += p^T do_w`, `dk_w += ds^T q_w`. The
  exchange tiles are single: warpgroup 0 writes `p^T` and `ds^T` once the
  other has read the last ones (`mm_done`).
  """
  scores = w == 0
  (p_smem, x_smem, ds_smem, p_ready, x_ready, ds_ready, mm_done,
   both_done) = r.exchange
  batch, kv_head, bq, dtype = r.batch, r.kv_head, r.bq, r.dtype
  half = r.k.shape[-1] // CONSUMERS
  cols = pl.ds(w * half, half)
  keys = pl.ds(r.tile * ROWS, ROWS)
  k_tile, v_tile = r.k_smem.at[0], r.v_smem.at[0]
  if scores:
    plgpu.copy_gmem_to_smem(r.k.at[batch, keys, kv_head], k_tile,
                            r.k_ready.at[0])
    plgpu.copy_gmem_to_smem(r.kvvec.at[batch, :, keys], r.kvvec_smem.at[0],
                            r.kvvec_ready.at[0])
    plgpu.barrier_wait(r.kvvec_ready.at[0])
    kv_vec = r.key_vectors(r.kvvec_smem.at[0])
    plgpu.barrier_wait(r.k_ready.at[0])
  else:
    plgpu.copy_gmem_to_smem(r.v.at[batch, keys, kv_head], v_tile,
                            r.v_ready.at[0])
    if r.drop is not None:  # Both hash the keys' positions.
      plgpu.barrier_wait(r.kvvec_ready.at[0])
      kv_vec = r.key_vectors(r.kvvec_smem.at[0])
    plgpu.barrier_wait(r.v_ready.at[0])
    plgpu.barrier_arrive(mm_done)  # The exchange tiles start free.

  def step(i, carry, masked: bool, base, g):
    dk, dv = carry
    slot = lax.rem(base + i - lo, STAGES)
    plgpu.barrier_wait(r.q_ready.at[slot])
    plgpu.barrier_wait(r.do_ready.at[slot])
    plgpu.barrier_wait(r.stats_ready.at[slot])
    q_cols, do_cols = r.q_smem.at[slot, :, cols], r.do_smem.at[slot, :, cols]

    def transposed(operand, tile):  # operand @ tile^T, [64, bq].
      def matmul(acc_ref):
        plgpu.wgmma(acc_ref, operand, tile.transpose((1, 0)))
        return acc_ref[...]
      return pl.run_scoped(matmul, plgpu.ACC((ROWS, bq), jnp.float32))

    if scores:
      s = transposed(k_tile, r.q_smem.at[slot])
      plgpu.barrier_wait(r.qvec_ready.at[slot])
      p, dcap, _ = probabilities(r.st, s,
                                 r.column(r.stats_smem.at[slot, 0]),
                                 r.visible(slot, kv_vec) if masked else None)
      # dV's: the kept p (its 1 / (1 - rate) once, at the end).
      p_low = (p if r.drop is None else
               jnp.where(r.keep(slot, g, kv_vec), p, 0.0)).astype(dtype)
      plgpu.barrier_wait(mm_done)  # The other has read the last p, ds.
      p_smem[...] = p_low
      plgpu.commit_smem()
      plgpu.barrier_arrive(p_ready)

      def accumulate(refs):
        dv_ref, dk_ref = refs
        plgpu.wgmma(dv_ref, p_low, do_cols)
        plgpu.barrier_wait(x_ready)
        x = load_vector(x_smem, plgpu.Layout.WGMMA).astype(jnp.float32)
        ds = score_grads(r.st, p, dcap, x, dtype)
        ds_smem[...] = ds
        plgpu.commit_smem()
        plgpu.barrier_arrive(ds_ready)
        plgpu.wgmma(dk_ref, ds, q_cols)
    else:
      dp = transposed(v_tile, r.do_smem.at[slot])
      if r.drop is not None:  # The gradient of the kept p, scaled.
        plgpu.barrier_wait(r.qvec_ready.at[slot])
        dp = jnp.where(r.keep(slot, g, kv_vec), dp * r.drop.scale, 0.0)
      x_smem[...] = (dp - r.column(r.stats_smem.at[slot, 1])).astype(dtype)
      plgpu.commit_smem()
      plgpu.barrier_arrive(x_ready)

      def accumulate(refs):
        dv_ref, dk_ref = refs
        plgpu.barrier_wait(p_ready)
        plgpu.wgmma(dv_ref, p_smem, do_cols)
        plgpu.barrier_wait(ds_ready)
        plgpu.wgmma(dk_ref, ds_smem, q_cols)

    dv, dk = pl.run_state(accumulate)((plgpu.ACC.init(dv),
                                       plgpu.ACC.init(dk)))
    if not scores:
      plgpu.barrier_arrive(mm_done)
    plgpu.barrier_arrive(r.free.at[slot])
    return dk, dv

  dk, dv = r.loop(lo, flo, fhi, hi, step, (wgmma_zeros(half), wgmma_zeros(half)))

  def meet():
    plgpu.barrier_arrive(both_done)
    plgpu.barrier_wait(both_done)

  if r.drop is not None:
    dv = dv * r.drop.scale
  meet()  # K and V are spent: both warpgroups write their columns there.
  k_tile.at[:, cols][...] = dk.astype(dtype)
  v_tile.at[:, cols][...] = dv.astype(dtype)
  plgpu.commit_smem()
  meet()
  out, tile = (r.dk, k_tile) if scores else (r.dv, v_tile)
  plgpu.copy_smem_to_gmem(tile, out.at[batch, keys, kv_head])
  plgpu.wait_smem_to_gmem(0)
