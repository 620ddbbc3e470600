"""flash's dK/dV kernel for Hopper, in Mosaic GPU.

Computes what the Triton dK/dV kernel (`triton_bwd`) computes, for the
calls the Mosaic forward serves, in the same style (`mosaic_fwd`): a
producer warpgroup streams the query-side tiles (q, dO, the rows' base-2
log-sum-exp and `delta`, their structure vectors) into shared-memory slots;

- at Dp <= 128 ("rows" layout, `mosaic_bwd_rows`) two consumers own 64
  keys each and accumulate their dK and dV with `wgmma`;
- at Dp = 256 ("columns" layout, `mosaic_bwd_columns`), where those
  accumulators fill both consumers' registers, the consumers share 64 keys
  and split dK's and dV's columns, exchanging `p`, `dp - delta` and `ds`
  through shared memory
  (FlashAttention-3's hdim-256 layout).

dQ is its own kernel's (Triton's or `mosaic_dq`), or, with
`LaunchConfig.atomic_dq` in the rows layout, this kernel's too (the fused
backward, FlashAttention-3's one kernel: 5 matmuls per tile pair instead
of 7): each consumer writes its
step's `ds^T` to shared memory, and, once the other's is there too, takes
half of dQ's columns of `ds k` over the program's 128 keys (`[bq, Dp / 2]`
float32) from `wgmma`s that read both through transposed views beside the
same columns of the K tiles, and adds them into dQ in global memory with
a TMA reduce-add (`copy_smem_to_gmem(..., reduction_op=
"add")`): one `[bq, Dp]` add per step and program. With
`LaunchConfig.deterministic_dq` (the default) the adds are int32: each
row's share `x` leaves as `trunc(x s)`, s a power of two per query row
from a bound on every partial sum of the row's dQ (`mosaic_numerics.
fixed_point_scales`), and XLA divides the sum by s. Integer addition is
associative, so dQ is bitwise reproducible whatever order the programs'
adds land in, at the cost of one multiply and one conversion per element.
Without it the adds are float32, into one dQ in the order the GPU runs
the programs (float32 rounding of the same sum differs from run to
run). At Dp = 128 the fused kernel derives its K and V tiles' `wgmma`
descriptors in each step (`mosaic_common.step_zero`): kept across the
loop, they did not fit beside the accumulators and spilled.

The programs that run at once are consecutive key tiles of one (batch, KV
head) (`structure.TileOrder`, launched through `mosaic_grid` so that the
key-tile axis is CUDA's x: `structure.MOSAIC_TILES_FIRST`), so they share
the head's q / dO tiles in L2; a causal call's heavy key tiles go first
over a group of heads (`structure.GROUPED_CAUSAL_DKV`). In a call without
causal, window or segment structure in reach, every one of them walks the
same query tiles from the first, so in the fused backward they add into
the same dQ tile together. With `LaunchConfig.rotate_dq` such a program
(no masked tile in its range) starts at its key tile's index and wraps
around: the programs of one head add into different dQ tiles. Its dK and
dV then sum their steps in another (fixed) order; the fixed point's dQ is
the same bits either way (checked on an H100). The default launches set
it from `launch.ROTATE_DQ_MIN_KV_LEN` keys, where it measured faster.

With dropout (either layout) the kernel hashes each transposed tile's
keep mask (`mosaic_common.TileDropout`): dV takes the kept `p` (scaled by
`1 / (1 - rate)` once, at the end), `ds` the gradient of the kept `p`.

In the rows layout it evaluates the score / mask mods the Mosaic forward
does (`mosaic_mods`; with the fused dQ too where their shared memory fits
`mosaic_common.FUSED_MODS_SMEM`, else an error): each consumer copies the
program values of the group's G query heads (`[G, ROW]` float32 and int32
rows) to its shared memory once, reads head g's as scalars each step and
evaluates the mods on the transposed tile: the mask_mod where the bounds
do not certify the tile visible, the score_mod and its derivative in the
logits on every tile. For the float `mod_args` it sums `p (dp - delta)
d(score_mod)/d(value)` over head g's tiles per value the score_mod reads
(`mosaic_mods.grad_slots`), as `[64]` row vectors in registers (2 per
thread and value), stored per head through a `[n, 64]` float32 tile of
shared memory (n * 256 bytes per consumer) to a `[B, Hkv, Skp / bk, 2, G,
n, 64]` output that XLA sums; `mosaic_mods.args_grads` takes them to
`mod_args`. The columns layout takes no mods
(`mosaic_common.dkv_mods_reason`: the launch policy keeps such calls on
Triton's dK/dV kernel). Lowered for CUDA and tested on CPU, and checked
against the float32 reference on an H200 (`tests/test_mods.py::
test_flash_mosaic_mods_compiled_on_a_gpu`).

Glossary of shapes:
- B: batch size; H, Hkv: query and key/value heads; G = H // Hkv.
- Sqp, Skp: query and key lengths padded to whole tiles.
- Dp: the padded head size (64, 128 or 256).
- Nq, Nk: the number of query / key structure vectors (`Static.vectors`).
- bq, bk: `dkv_block_q(Dp)` query rows per step, `dkv_block_k(Dp)` keys per
  program.
- ROW: the program values of one mod row (`mosaic_mods.ROW`); n: the
  values whose gradients it sums (`mosaic_mods.grad_slots`).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from flexible_attention.kernels import gpu
from flexible_attention.kernels.flash.mosaic_bwd_columns import columns_consumer
from flexible_attention.kernels.flash.mosaic_bwd_rows import exchange_buffers
from flexible_attention.kernels.flash.mosaic_bwd_rows import rows_consumer
from flexible_attention.kernels.flash.mosaic_bwd_rows import staggered
from flexible_attention.kernels.flash.mosaic_common import BOUNDS_ROW
from flexible_attention.kernels.flash.mosaic_common import CONSUMERS
from flexible_attention.kernels.flash.mosaic_common import CONSUMER_REGISTERS
from flexible_attention.kernels.flash.mosaic_common import PRODUCER_REGISTERS
from flexible_attention.kernels.flash.mosaic_common import ROWS
from flexible_attention.kernels.flash.mosaic_common import SPLIT_HEAD_DIM
from flexible_attention.kernels.flash.mosaic_common import STAGES
from flexible_attention.kernels.flash.mosaic_common import SWIZZLE
from flexible_attention.kernels.flash.mosaic_common import TileDropout
from flexible_attention.kernels.flash.mosaic_common import dkv_block_k
from flexible_attention.kernels.flash.mosaic_common import dkv_block_q
from flexible_attention.kernels.flash.mosaic_common import dkv_mods_reason
from flexible_attention.kernels.flash.mosaic_common import fused_dq_reason
from flexible_attention.kernels.flash.mosaic_common import load_vector
from flexible_attention.kernels.flash.mosaic_common import read_row
from flexible_attention.kernels.flash.mosaic_common import visible
from flexible_attention.kernels.flash.mosaic_common import wgmma_transforms
from flexible_attention.kernels.flash.mosaic_mod_rows import dkv_mods_scratch
from flexible_attention.kernels.flash.mosaic_mod_rows import fused_mods_reason
from flexible_attention.kernels.flash.mosaic_mod_rows import row_operands
from flexible_attention.kernels.flash.mosaic_mod_rows import split_row_refs
from flexible_attention.kernels.flash.mosaic_mod_rows import split_row_scratch
from flexible_attention.kernels.flash.mosaic_mod_split import REF_ROWS
from flexible_attention.kernels.flash.mosaic_mod_split import split_lse2
from flexible_attention.kernels.flash.mosaic_mod_split import split_slot
from flexible_attention.kernels.flash.mosaic_mods import grad_slots
from flexible_attention.kernels.flash.mosaic_numerics import fixed_point_scales
from flexible_attention.kernels.flash.mosaic_schedule import bounds_count
from flexible_attention.kernels.flash.mosaic_schedule import pad_bounds
from flexible_attention.kernels.flash.mosaic_schedule import ranked_bounds
from flexible_attention.kernels.flash.mosaic_schedule import ranked_order
from flexible_attention.kernels.flash.mosaic_schedule import ranked_tile_order
from flexible_attention.kernels.flash.mosaic_schedule import row_tile
from flexible_attention.kernels.flash.structure import Static
from flexible_attention.kernels.flash.structure import TileOrder


class _DkdvRefs:
  """The operands, outputs and scratch of one dK/dV program, and what
  every warpgroup reads the same way. `dq` is the dQ the fused backward
  adds into (`with_dq`; `[B, Sqp, H, Dp]`, int32 in fixed point when
  `fixed_point`, else float32), else None; `mod_refs` the rows
  of the mods' program values (`mod_rows`' operands; None where none),
  `dslots` the output of their gradients (`grad_slots`), else None; `drop`
  the program's `TileDropout` with dropout (set once the bounds row is
  read), else None."""

  def __init__(self, st: Static, bq: int, refs, scratch, with_dq: bool,
               fixed_point: bool, mod_rows, order: TileOrder):
    refs = list(refs)
    (self.q, self.k, self.v, self.do, self.stats, self.bounds, self.qvec,
     self.kvvec) = refs[:8]
    del refs[:8]
    self.mod_refs = split_row_refs(mod_rows, refs)
    self.dq = refs.pop(0) if with_dq else None
    self.fixed_point = fixed_point
    self.dk, self.dv, *dslots = refs
    self.dslots = dslots[0] if dslots else None
    (self.k_smem, self.v_smem, self.kvvec_smem, self.q_smem, self.do_smem,
     self.stats_smem, self.qvec_smem, self.bounds_smem, self.exchange,
     own_ready, ready, self.free, (row_refs, self.dslots_smem)) = scratch
    self.mod_scratch = split_row_scratch(mod_rows, row_refs)
    (self.k_ready, self.v_ready, self.kvvec_ready,
     self.bounds_ready) = own_ready
    (self.q_ready, self.do_ready, self.stats_ready,
     self.qvec_ready) = ready
    self.st, self.bq = st, bq
    self.dtype = self.q.dtype
    self.q_names, self.kv_names = st.vectors()
    self.tile, self.batch, self.kv_head = order.program()
    self.wg = lax.axis_index("wg")
    self.drop = None
    self.rotation = 0  # `rotate`'s, once the bounds row is read.
    # A split score_mod (`mosaic_mods.split_slot`): each step's logits gain
    # the key terms relative to its first query's position (its tile is
    # one group of `REF_ROWS` rows), the stats leave out the row terms.
    self.split = split_slot(st.mods, st.causal) is not None
    assert not self.split or bq == REF_ROWS, (bq, REF_ROWS)

  def rotate(self, lo, flo, fhi, hi):
    """Sets the offset from which this program walks its query tiles
    `[lo, hi)` (`query_tile`): with `st.launch.rotate_dq` (the fused
    backward) and no masked tile among them, its key tile's index modulo
    their count; else 0."""
    if not (self.dq is not None and self.st.launch.rotate_dq):
      return
    steps = jnp.maximum(hi - lo, 1)
    unmasked = (lo == flo) & (fhi == hi)
    self.rotation = jnp.where(unmasked, lax.rem(self.tile, steps), 0)

  def query_tile(self, i, lo, hi):
    """The query tile of the step the loop numbers `i` in `[lo, hi)`: `i`
    moved on by `rotation` within the range, wrapping."""
    if isinstance(self.rotation, int):  # Not rotating.
      return i
    t = i + self.rotation
    return jnp.where(t >= hi, t - (hi - lo), t)

  def column(self, ref):
    """A per-query `[bq]` vector in shared memory, across a `[64, bq]`
    transposed tile."""
    return lax.broadcast_in_dim(
        load_vector(ref, plgpu.Layout.WGMMA.reduce(0)), (ROWS, self.bq), [1])

  def key_vectors(self, smem):
    """The keys' structure vectors, across a `[64, bq]` transposed tile."""
    return {name: lax.broadcast_in_dim(
        load_vector(smem.at[n], plgpu.Layout.WGMMA.reduce(1)),
        (ROWS, self.bq), [0]) for n, name in enumerate(self.kv_names)}

  def query_vectors(self, slot, names):
    """Step `slot`'s query structure vectors `names`, across its `[64, bq]`
    transposed tile."""
    return {name: self.column(self.qvec_smem.at[slot,
                                                self.q_names.index(name)])
            for name in names}

  def keep(self, slot, g, kv_vec):
    """Step `slot`'s dropout keep mask (query head g of the group) on its
    `[64, bq]` transposed tile."""
    q_pos = load_vector(self.qvec_smem.at[slot, self.q_names.index("q_pos")],
                        plgpu.Layout.WGMMA.reduce(0))
    rows = self.drop.rows(self.kv_head * self.st.groups + g, q_pos,
                          (ROWS, self.bq), 1)
    return self.drop.keep(rows, kv_vec["kv_pos"])

  def visible(self, slot, kv_vec):
    """The structured mask of step `slot`'s transposed tile."""
    return visible(self.st, self.query_vectors(slot, self.q_names), kv_vec)

  def loop(self, lo, flo, fhi, hi, step, carry, end=None):
    """Runs `step(i, carry, masked, base, g)` over every query head g's
    tiles `[lo, hi)` (of the group), those outside `[flo, fhi)` masked;
    `base` counts the steps before head g's; then `end(g, carry)` (None:
    nothing) gives the next head's carry. Returns the carry."""
    steps = hi - lo

    def head(g, carry):
      base = g * steps
      masked = functools.partial(step, masked=True, base=base, g=g)
      carry = lax.fori_loop(lo, flo, masked, carry)
      carry = lax.fori_loop(
          flo, fhi, functools.partial(step, masked=False, base=base, g=g),
          carry)
      carry = lax.fori_loop(fhi, hi, masked, carry)
      return carry if end is None else end(g, carry)

    return lax.fori_loop(0, self.st.groups, head, carry)

  def produce(self, lo, hi):
    """The producer warpgroup: streams every step's q, dO, stats and query
    vectors into the `STAGES` slots."""
    plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
    steps = hi - lo
    per_head = jnp.maximum(steps, 1)
    bq = self.bq

    def load(n, slot):  # The n-th step: query head g, query tile i.
      g = lax.div(n, per_head)
      i = self.query_tile(lo + lax.rem(n, per_head), lo, hi)
      head = self.kv_head * self.st.groups + g
      rows = pl.ds(i * bq, bq)
      plgpu.copy_gmem_to_smem(self.q.at[self.batch, rows, head],
                              self.q_smem.at[slot], self.q_ready.at[slot])
      plgpu.copy_gmem_to_smem(self.do.at[self.batch, rows, head],
                              self.do_smem.at[slot], self.do_ready.at[slot])
      plgpu.copy_gmem_to_smem(self.stats.at[self.batch, head, :, rows],
                              self.stats_smem.at[slot],
                              self.stats_ready.at[slot])
      plgpu.copy_gmem_to_smem(self.qvec.at[self.batch, :, rows],
                              self.qvec_smem.at[slot],
                              self.qvec_ready.at[slot])

    total = self.st.groups * steps
    for slot in range(STAGES):
      pl.when(slot < total)(functools.partial(load, slot, slot))

    def refill(n, _):
      slot = lax.rem(n, STAGES)
      plgpu.barrier_wait(self.free.at[slot])
      load(n, slot)

    lax.fori_loop(STAGES, total, refill, None)


def _dkdv_kernel(*refs, st: Static, bq: int, with_dq: bool,
                 fixed_point: bool, mod_rows, order: TileOrder,
                 ranked: bool):
  """One program: `dkv_block_k(Dp)` keys of one (batch, KV head), every
  query head of its group; `refs` are the operands (the mods' rows after
  the inputs, then `with_dq` dQ's Ref), the outputs, and last the
  shared-memory scratch. `ranked`: the grid's tile axis is a rank, the
  program's key tile in its bounds row (`ranked_tile_order`)."""
  r = _DkdvRefs(st, bq, refs[:-1], refs[-1], with_dq, fixed_point, mod_rows,
                order)
  lo, flo, fhi, hi, *seed = read_row(r.bounds.at[r.batch, r.tile],
                                      r.bounds_smem.at[r.wg],
                                      r.bounds_ready.at[r.wg],
                                      bounds_count(st))
  if ranked:
    r.tile = row_tile(r.bounds_smem, r.wg)
  if seed:
    r.drop = TileDropout(st, seed, r.batch)
  r.rotate(lo, flo, fhi, hi)
  columns = r.k.shape[-1] >= SPLIT_HEAD_DIM

  @pl.when(r.wg < CONSUMERS)
  def _consumers():
    plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
    if not columns and not with_dq:
      rows_consumer(r, lo, flo, fhi, hi)
    elif not columns:  # Static column halves of dQ.
      for w in range(CONSUMERS):
        pl.when(r.wg == w)(functools.partial(
            rows_consumer, r, lo, flo, fhi, hi, w=w))
    else:
      for w in range(CONSUMERS):
        pl.when(r.wg == w)(functools.partial(
            columns_consumer, r, lo, flo, fhi, hi, w=w))

  @pl.when(r.wg == CONSUMERS)
  def _producer():
    r.produce(lo, hi)


def dkdv(st: Static, q, k, v, do, lse2, delta, bounds, q_vectors,
         kv_vectors, mod_rows=(None, None), seed=None):
  """dK and dV on padded operands (the Triton dK/dV kernel's function), and
  with `st.launch.atomic_dq` dQ too (the fused backward; Dp <= 128).

  Args:
    st: the call's static structure.
    q: `[B, Sqp, H, Dp]`, bf16 or fp16, Sqp a multiple of bq
      (`dkv_block_q`).
    k: `[B, Skp, Hkv, Dp]`, Skp a multiple of `dkv_block_k(Dp)`.
    v: `[B, Skp, Hkv, Dp]`.
    do: `[B, Sqp, H, Dp]`, the output's cotangent.
    lse2: float32 `[B, H, Sqp]`, the rows' log-sum-exp in base 2 (0 for
      rows that see no key).
    delta: float32 `[B, H, Sqp]`, `rowsum(dO * O)` (less the lse's
      cotangent).
    bounds: int32 `[B, Skp // dkv_block_k(Dp), 4]`, per key tile the query
      tiles (bq rows) that may see it, as `forward`'s.
    q_vectors: int32 `[B, Nq, Sqp]` (a zero `[B, 1, Sqp]` when Nq = 0).
    kv_vectors: int32 `[B, Nk, Skp]`.
    mod_rows: with mods (`st.mods`, which `mosaic_mods.plan` accepts; Dp
      <= 128), their program values, as the forward's (`mosaic_mods.
      program_rows`).
    seed: with dropout, uint32 `[4]`, as the forward's.

  Returns:
    `(dk [B, Skp, Hkv, Dp], dv [B, Skp, Hkv, Dp], dq, dslots)`: dk, dv in
    k's dtype; with `st.launch.atomic_dq` dq `[B, Sqp, H, Dp]` float32
    (with `st.launch.deterministic_dq` summed in int32 fixed point, per row
    on the scale of `fixed_point_scales`, then scaled back: the same bits
    whatever order the programs' adds land in; else float32 sums in the
    order the programs run, not bitwise reproducible), else
    None; with `mosaic_mods.grad_slots(st.mods)` (n of them) dslots
    float32 `[B, H, n]`, the loss' gradient in each program value those
    slots hold (`mosaic_mods.args_grads` takes it to `mod_args`), else
    None.
  """
  batch, q_len, heads, d = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  with_dq = st.launch.atomic_dq
  fixed_point = with_dq and st.launch.deterministic_dq
  bq = dkv_block_q(d, fused=with_dq, mods=st.mods is not None)
  bk = dkv_block_k(d)
  nk = kv_len // bk
  if st.launch.dkv.block_q != bq:  # The rows its bounds table counts.
    raise ValueError(f"flash (Mosaic GPU): the dK/dV kernel takes {bq} query "
                     f"rows a step here, its launch {st.launch.dkv.block_q}.")
  if q_len % bq or kv_len % bk:
    raise ValueError(f"flash (Mosaic GPU): Sqp = {q_len} and Skp = {kv_len} "
                     f"must be multiples of {bq} and {bk}.")
  reason = fused_dq_reason(d) if with_dq else None
  if reason is None and st.mods is not None:
    reason = dkv_mods_reason(d) or (
        fused_mods_reason(st.mods, d, st.groups) if with_dq else None)
  if reason is not None:
    raise ValueError(f"flash (Mosaic GPU): {reason}.")
  mods_scratch = dkv_mods_scratch(st.mods, st.groups)
  n_slots = len(grad_slots(st.mods))
  # With dQ each consumer reads half of K's columns as a `wgmma` operand,
  # which must be whole rows of the swizzle, as the other operand's: at
  # Dp = 64 every 16-bit operand takes 64-byte rows.
  swizzled = wgmma_transforms(q.dtype, min(
      SWIZZLE, d // CONSUMERS * q.dtype.itemsize) if with_dq else SWIZZLE)
  nqv, nkv = q_vectors.shape[1], kv_vectors.shape[1]
  dq_dtype = jnp.int32 if fixed_point else jnp.float32
  lse2 = split_lse2(st, lse2, mod_rows, q_vectors)  # A split score_mod's.
  stats = [lse2, delta]
  if fixed_point:  # Each row's dQ scale, streamed with its stats.
    scales = fixed_point_scales(k, v, do, delta, sm_scale=st.sm_scale,
                                groups=st.groups,
                                dropout_rate=st.dropout_rate)
    stats.append(scales)
  stats = jnp.stack(stats, axis=2)  # [B, H, 2 or 3, Sqp]
  bounds = pad_bounds(bounds, seed)
  key_tiles = bk // ROWS  # One per warpgroup of 64 keys.
  ranked = ranked_order(st, "dkv")
  if ranked:  # Heavy key tiles first over every (batch row, KV head).
    bounds = ranked_bounds(bounds)
    order = ranked_tile_order(batch, kv_heads, nk)
  else:
    order = TileOrder.choose(batch, kv_heads, nk, st.causal,
                             gpu.core_count(), kernel="dkv")

  def flash_dkdv(*operands):
    smem = (
        plgpu.SMEM((key_tiles, ROWS, d), k.dtype, transforms=swizzled),
        plgpu.SMEM((key_tiles, ROWS, d), v.dtype, transforms=swizzled),
        plgpu.SMEM((key_tiles, nkv, ROWS), jnp.int32),
        plgpu.SMEM((STAGES, bq, d), q.dtype, transforms=swizzled),
        plgpu.SMEM((STAGES, bq, d), do.dtype, transforms=swizzled),
        plgpu.SMEM((STAGES, stats.shape[2], bq), jnp.float32),
        plgpu.SMEM((STAGES, nqv, bq), jnp.int32),
        plgpu.SMEM((CONSUMERS + 1, BOUNDS_ROW), jnp.int32),
    )
    exchange = ()
    if key_tiles == 1:  # p^T, dp^T - delta and ds^T; the signals.
      exchange = ((plgpu.SMEM((ROWS, bq), q.dtype, transforms=swizzled),) * 3
                  + (plgpu.Barrier(),) * 4
                  + (plgpu.Barrier(num_arrivals=CONSUMERS),))
    elif with_dq:  # Two (lagged: three) steps' ds^T of each consumer, its
      # dQ columns' tile; per buffer the signal that both ds^T are in, the
      # end (staggered: and consumer 0's start).
      buffers = exchange_buffers(st, d)
      exchange = (plgpu.SMEM((buffers, CONSUMERS, ROWS, bq), q.dtype,
                             transforms=swizzled),
                  plgpu.SMEM((CONSUMERS, bq, d // CONSUMERS), dq_dtype,
                             transforms=wgmma_transforms(dq_dtype)),
                  plgpu.Barrier(num_arrivals=CONSUMERS,
                                num_barriers=buffers),
                  plgpu.Barrier(num_arrivals=CONSUMERS))
      if staggered(st, d):
        exchange += (plgpu.Barrier(),)
    own = (plgpu.Barrier(num_barriers=key_tiles),) * 3 + (
        plgpu.Barrier(num_barriers=CONSUMERS + 1),)
    ready = (plgpu.Barrier(num_barriers=STAGES),) * 4
    free = plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=STAGES)

    def scoped(smem_refs, exchange_refs, own_refs, ready_refs, free_ref,
               mod_refs):
      _dkdv_kernel(*operands, (*smem_refs, exchange_refs, own_refs,
                               ready_refs, free_ref, mod_refs),
                   st=st, bq=bq, with_dq=with_dq, fixed_point=fixed_point,
                   mod_rows=mod_rows, order=order, ranked=ranked)

    pl.run_scoped(scoped, smem, exchange, own, ready, free, mods_scratch,
                  collective_axes="wg")

  out_type = (jax.ShapeDtypeStruct(k.shape, k.dtype),
              jax.ShapeDtypeStruct(v.shape, v.dtype))
  if n_slots:  # Per program, consumer and head: the [64] rows' slot sums.
    out_type += (jax.ShapeDtypeStruct(
        (batch, kv_heads, nk, CONSUMERS, st.groups, n_slots, ROWS),
        jnp.float32),)
  mesh = dict(**order.mosaic_grid(),
              num_threads=CONSUMERS + 1, thread_name="wg")
  params = plgpu.CompilerParams(approx_math=True)
  operands = (q, k, v, do, stats, bounds, q_vectors, kv_vectors,
              *row_operands(mod_rows))
  if not with_dq:
    dq = None
    outs = plgpu.kernel(flash_dkdv, out_type=out_type, compiler_params=params,
                        **mesh)(*operands)
  else:
    def fused(refs):
      # dQ is a Ref the kernel adds into (aliased in and out of it), so it
      # starts at zero. jax 0.10's `plgpu.kernel` takes no Ref operand;
      # `pl.kernel` over a `plgpu.Mesh`, which it wraps, does.
      dq_ref, *out_refs = refs
      outs = pl.kernel(flash_dkdv, out_type,
                       mesh=plgpu.Mesh(**mesh), compiler_params=params,
                       name="flash_dkdv_dq")(*operands, dq_ref)
      for ref, x in zip(out_refs, outs):
        ref[...] = x

    dq, *outs = pl.run_state(fused)(
        (jnp.zeros(q.shape, dq_dtype),
         *(jnp.zeros(x.shape, x.dtype) for x in out_type)))
    if fixed_point:  # Exact: the scales are powers of two (0: NaN rows).
      dq = dq.astype(jnp.float32) / jnp.swapaxes(scales, 1, 2)[..., None]
  dk, dv, *dslots = outs
  # Summed over key tiles, consumers and rows: [B, H, n].
  dslots = (dslots[0].sum(axis=(2, 3, 6)).reshape(batch, heads, n_slots)
            if dslots else None)
  return dk, dv, dq, dslots
