"""flash's forward kernel for Hopper, in Mosaic GPU.

Computes what the Triton forward (`triton_fwd`) computes, from the same
padded operands, structure vectors and skipping bounds, with the same `out`
and natural-log `lse`, written for sm_90 as FlashAttention-3 describes it
(Shah et al., 2024, https://arxiv.org/abs/2407.08608):

- a persistent kernel: one program per multiprocessor, each running query
  tiles of `BLOCK_Q` rows one after another in the order
  `mosaic_schedule.WorkOrder` gives (head by head, a heavy causal tile beside
  its light mirror; or, for causal calls of few heads, single tiles
  heaviest first over all heads; with `mosaic_schedule.RANKED_ORDER`, for
  packed documents and mask_mods, by each tile's work, read from its
  bounds row), the next tile's bounds, query rows and values fetched
  during this one, so that a short call does not pay each tile's start,
  loads and store in sequence;
- three warpgroups per program: a producer that streams K, V (and the keys'
  structure vectors) of every tile the program runs into a ring of
  shared-memory slots with TMA, and two consumers of 64 query rows each
  (one `wgmma` M tile);
- the consumers run `q k^T` and `p v` as asynchronous `wgmma`s on operands
  in shared memory and ping-pong through a named barrier, so one
  warpgroup's softmax overlaps the other's matmuls;
- the softmax keeps the raw logits and the row maxima in base 2, one FMA
  per element (as the Triton kernel does).

(FlashAttention-3's intra-warpgroup pipelining, each consumer's softmax
beside its own `p v`, was built and measured slower on an H200:
benchmarks/flash_notes.md.)

It serves the calls `mosaic_common.unsupported_reason` accepts (bf16 /
fp16, padded head sizes 64, 128 or 256 with D == Dv, no bias or dense
mask; dropout by the library's hash, `mosaic_common.TileDropout`; sinks
as a first key of value zero, each row's softmax starting from `m = sink,
l = 1`), with the score_mod / mask_mod `mosaic_mods.plan` accepts: the
score_mod rewrites the logits after scale and soft cap (natural units,
then `scale = log2(e)`), the mask_mod joins the structured mask in every
tile the bounds do not certify fully visible, and the mods' reads of
`mod_args` arrive as per-program scalars (`mosaic_mods.program_rows`); the
launch policy (`launch.py`) sends every other call to Triton.

Glossary of shapes:
- B: batch size; H, Hkv: query and key/value heads; G = H // Hkv.
- Sqp, Skp: query and key lengths padded to whole tiles (`BLOCK_Q`, bk).
- Dp: the padded head size (64, 128 or 256).
- Nq, Nk: the number of query / key structure vectors (`Static.vectors`).
- nq: Sqp // BLOCK_Q, the number of query tiles.
- bk: the key tile (`block_k(Dp)`).
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
from flexible_attention.kernels.flash.mosaic_common import PRODUCER_REGISTERS
from flexible_attention.kernels.flash.mosaic_common import ROWS
from flexible_attention.kernels.flash.mosaic_common import SINK_ROW
from flexible_attention.kernels.flash.mosaic_common import STAGES
from flexible_attention.kernels.flash.mosaic_common import TileDropout
from flexible_attention.kernels.flash.mosaic_common import block_k
from flexible_attention.kernels.flash.mosaic_common import fetch_query_vectors
from flexible_attention.kernels.flash.mosaic_common import key_vector
from flexible_attention.kernels.flash.mosaic_common import key_vectors
from flexible_attention.kernels.flash.mosaic_common import load_vector
from flexible_attention.kernels.flash.mosaic_common import loaded_query_vectors
from flexible_attention.kernels.flash.mosaic_common import logit_scale
from flexible_attention.kernels.flash.mosaic_common import meet
from flexible_attention.kernels.flash.mosaic_common import stream_tiles
from flexible_attention.kernels.flash.mosaic_common import visible
from flexible_attention.kernels.flash.mosaic_common import wgmma_transforms
from flexible_attention.kernels.flash.mosaic_mod_rows import fetch_rows
from flexible_attention.kernels.flash.mosaic_mod_rows import fetched_mods
from flexible_attention.kernels.flash.mosaic_mod_rows import row_operands
from flexible_attention.kernels.flash.mosaic_mod_rows import row_scratch
from flexible_attention.kernels.flash.mosaic_mod_rows import split_row_refs
from flexible_attention.kernels.flash.mosaic_mod_rows import split_row_scratch
from flexible_attention.kernels.flash.mosaic_mod_split import key_terms
from flexible_attention.kernels.flash.mosaic_mod_split import row_terms
from flexible_attention.kernels.flash.mosaic_mod_split import split_slot
from flexible_attention.kernels.flash.mosaic_mods import unmasked_reads
from flexible_attention.kernels.flash.mosaic_schedule import WorkOrder
from flexible_attention.kernels.flash.mosaic_schedule import bounds_count
from flexible_attention.kernels.flash.mosaic_schedule import pad_bounds
from flexible_attention.kernels.flash.mosaic_schedule import persistent_kernel
from flexible_attention.kernels.flash.mosaic_schedule import query_tile_loop
from flexible_attention.kernels.flash.mosaic_schedule import ranked_bounds
from flexible_attention.kernels.flash.mosaic_schedule import ranked_order
from flexible_attention.kernels.flash.mosaic_schedule import row_tile
from flexible_attention.kernels.flash.structure import LN2
from flexible_attention.kernels.flash.structure import LOG2E
from flexible_attention.kernels.flash.structure import Static


def _kernel(q_ref, k_ref, v_ref, bounds_ref, qvec_ref, kvvec_ref, mod_refs,
            sink_ref, out_ref, lse_ref, scratch, mod_scratch, sink_scratch, *,
            st: Static, bk: int, order: WorkOrder, buffers: int, split: bool):
  """One program: the query tiles `order` gives it, one after another, each
  `BLOCK_Q` query rows of one (batch, head) pair (an item).

  Each warpgroup reads an item's bounds row through its own two
  shared-memory rows, the next item's arriving during this one. The
  consumers' query rows, query vectors, mods' values and sink live in
  `buffers` copies: with two, the next item's are fetched once this item's
  first scores are issued (by then the stores of the item before, from the
  buffer they reuse, have left shared memory); with one (Dp = 256, where a
  second does not fit), when the item starts. The producer streams every
  item's key tiles as one stream (`stream_tiles`), so an item's first tiles
  load under the last steps of the one before.

  With `split` the score_mod is `score + a q_pos + b kv_pos + c`
  (`mosaic_mods.split_slot`): each logit gains its key term `b (kv_pos -
  ref)`, `ref` the consumer's first row's position, and the lse it writes
  leaves out the row term (`forward` adds it).

  `mod_refs`: the rows of the mods' program values (`mosaic_mods`),
  `(floats, ints)`, None where the mods read none; `mod_scratch`: their
  shared-memory rows and barriers, `buffers` per consumer. `sink_ref`: with
  sinks the heads' base-2 sink logits as `[H, SINK_ROW]` rows (the first
  value), read through `sink_scratch` (rows and barriers as the mods');
  else None."""
  (q_smem, k_smem, v_smem, qvec_smem, kvvec_smem, bounds_smem, lse_smem,
   ready, free, sched) = scratch
  (q_ready, qvec_ready, k_ready, v_ready, kvvec_ready, bounds_ready) = ready
  dtype = q_ref.dtype
  q_names, kv_names = st.vectors()
  program, wg = lax.axis_index("p"), lax.axis_index("wg")
  count = order.count(program)
  sync = functools.partial(meet, sched)  # The consumers' ping-pong.
  # Each warpgroup's bounds rows: a ring of 2 (the next item's arrives
  # during this one), of 3 by rank (the consumers read the next item's
  # tile at this one's first scores, so it is fetched an item earlier).
  ring = 3 if order.ranked else 2
  ranked_tile = lambda n: row_tile(bounds_smem, wg * ring + lax.rem(n, ring))

  def fetch_bounds(n):  # Item n's bounds row, into row n % ring of this wg's.
    tile, batch, _ = order.item(program, n)
    row = wg * ring + lax.rem(n, ring)
    plgpu.copy_gmem_to_smem(bounds_ref.at[batch, tile], bounds_smem.at[row],
                            bounds_ready.at[row])

  def read_bounds(n, wait: bool = True):  # `(lo, flo, fhi, hi, *seed)`;
    # fetches item n + ring - 1's (`wait`: its row's wait is still due).
    row = wg * ring + lax.rem(n, ring)
    if wait:
      plgpu.barrier_wait(bounds_ready.at[row])
    values = tuple(bounds_smem[row, i] for i in range(bounds_count(st)))
    pl.when(n + (ring - 1) < count)(functools.partial(fetch_bounds,
                                                      n + (ring - 1)))
    return values

  fetch_bounds(0)
  if order.ranked:
    pl.when(1 < count)(functools.partial(fetch_bounds, 1))

  @pl.when(wg < CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")

    def fetch(n, buf, tile=None):  # Item n's query rows and values into
      # buffer `buf`; by rank `tile` is its tile (from its bounds row).
      rank_or_tile, batch, head = order.item(program, n)
      tile = rank_or_tile if tile is None else tile
      rows = tile * BLOCK_Q + wg * ROWS
      i = buf * CONSUMERS + wg
      plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(rows, ROWS), head],
                              q_smem.at[i], q_ready.at[i])
      fetch_query_vectors(st, qvec_ref, qvec_smem.at[i], qvec_ready.at[i],
                          batch, rows)
      fetch_rows(mod_refs, mod_scratch, batch, head, i)
      if sink_ref is not None:
        sink_smem, sink_ready = sink_scratch
        plgpu.copy_gmem_to_smem(sink_ref.at[head], sink_smem.at[i],
                                sink_ready.at[i])

    # By rank with two buffers, an item's bounds row is waited for where
    # its tile is first needed: before its query rows are fetched.
    early = order.ranked and buffers == 2

    def prefetch(n, next_tile=None):  # At item n's first scores (two
      # buffers; by rank at its start, `early`, `next_tile` item n + 1's
      # tile): item n - 1's stores (its output, from the buffer item n + 1
      # takes, and its lse, whose row item n rewrites) have left shared
      # memory.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      pl.when(n + 1 < count)(lambda: fetch(n + 1, lax.rem(n + 1, 2),
                                           next_tile))

    if early:
      plgpu.barrier_wait(bounds_ready.at[wg * ring])
      fetch(0, 0, ranked_tile(0))
    elif buffers == 2:
      fetch(0, 0)

    def item(n, base):
      tile, batch, head = order.item(program, n)
      lo, flo, fhi, hi, *seed = read_bounds(n, wait=not early)
      if order.ranked:
        tile = ranked_tile(n)
      drop = TileDropout(st, seed, batch) if seed else None
      if buffers == 1:  # The last item's output has left the buffer.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        fetch(n, 0, tile if order.ranked else None)
      i = (lax.rem(n, 2) if buffers == 2 else 0) * CONSUMERS + wg
      release = functools.partial(prefetch, n) if buffers == 2 else None
      if early:  # Item n + 1's query rows, fetched here from its tile (its
        # bounds row arrived an item earlier) rather than inside the first
        # step: there the fetch's values held across the step loop spill
        # at Dp = 64 (26 loads and stores a masked step), here it waits for
        # item n - 1's output to leave shared memory (flash_notes.md,
        # thirty-second session).
        pl.when(n + 1 < count)(lambda: plgpu.barrier_wait(
            bounds_ready.at[wg * ring + lax.rem(n + 1, ring)]))
        release(ranked_tile(n + 1))
        release = None
      q_tile = q_smem.at[i]
      mods = fetched_mods(st, mod_scratch, i, (ROWS, bk))
      q_vec = loaded_query_vectors(st, qvec_smem.at[i], qvec_ready.at[i],
                                   (ROWS, bk))
      if split:  # The key terms' reference: this consumer's first position.
        ref = qvec_smem[i, q_names.index("q_pos"), 0]
      # The softmax starts from the sink when there is one: a key of logit
      # `sink` and a zero value (m = sink, l = 1, acc = 0).
      m0, l0 = -jnp.inf, 0.0
      if sink_ref is not None:
        sink_smem, sink_ready = sink_scratch
        plgpu.barrier_wait(sink_ready.at[i])
        m0, l0 = sink_smem[i, 0], 1.0
      plgpu.barrier_wait(q_ready.at[i])
      if drop is not None:  # The rows' hash, once.
        drop_rows = drop.rows(head, load_vector(
            qvec_smem.at[i, q_names.index("q_pos")],
            plgpu.Layout.WGMMA.reduce(1)), (ROWS, bk), 0)

      # `s * scale` are the logits in base 2: the raw `q k^T` with the
      # softmax scale folded in; base-2 soft-capped logits; or the
      # score_mod's natural-unit logits (a split score_mod's key terms join
      # the first two in their units).
      scale = LOG2E if st.score_mod and not split else logit_scale(st)
      # The key vectors an unmasked tile reads: the score_mod's or the
      # dropout hash's positions.
      unmasked_kv = unmasked_reads(None if split else st.mods, "kv_pos",
                                   drop is not None)

      def step(t, carry, masked: bool):
        acc, m, l = carry
        slot = lax.rem(base + t - lo, STAGES)
        plgpu.barrier_wait(k_ready.at[slot])

        def scores(acc_ref):
          plgpu.wgmma(acc_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
          if release is not None:
            pl.when(t == lo)(release)
          sync()  # The other consumer's matmuls go next.
          return acc_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((ROWS, bk), jnp.float32))
        plgpu.barrier_wait(kvvec_ready.at[slot])
        kv = key_vectors(st, kvvec_smem, slot,
                         kv_names if masked else unmasked_kv, (ROWS, bk))
        vis = visible(st, q_vec, kv) if masked else None
        plgpu.barrier_arrive(free[0].at[slot])
        if st.score_mod and not split:  # The semantics' logits, after scale
          s = s * st.sm_scale  # and soft cap.
          if st.softcap is not None:
            s = st.softcap * jnp.tanh(s * (1.0 / st.softcap))
          s = mods.score(s, q_vec.get("q_pos"), kv.get("kv_pos"))
        elif st.softcap is not None:
          s = s * st.sm_scale
          s = (st.softcap * LOG2E) * jnp.tanh(s * (1.0 / st.softcap))
        if split:  # One add per element: the key terms, from a vector, in
          # the units of `s` (its base-2 logits are `s * scale`).
          s = s + lax.broadcast_in_dim(key_terms(mods, key_vector(
              st, kvvec_smem, slot, "kv_pos"), ref, scale / LOG2E), s.shape,
                                       [1])
        if masked:
          if st.mask_mod:
            vis = vis & mods.visible(q_vec.get("q_pos"), kv.get("kv_pos"))
          s = jnp.where(vis, s, -jnp.inf)
        # Row maxima in base 2; `masked` rows of a tile may all be -inf.
        m_new = jnp.maximum(m, s.max(axis=1) * scale)
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_safe, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        if drop is not None:  # Its 1 / (1 - rate) scales the output at the
          p = jnp.where(drop.keep(drop_rows, kv["kv_pos"]), p, 0.0)  # end.
        p = p.astype(dtype)
        plgpu.barrier_arrive(sched)  # Softmax done.
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_wait(sched)  # The tensor cores are ours again.

        def values(acc_ref):
          plgpu.wgmma(acc_ref, p, v_smem.at[slot])

        acc = pl.run_state(values)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(free[1].at[slot])
        return acc, m_new, l

      reduced = plgpu.Layout.WGMMA.reduce(1)
      carry = (
          plgpu.layout_cast(jnp.zeros((ROWS, v_ref.shape[-1]), jnp.float32),
                            plgpu.Layout.WGMMA),
          plgpu.layout_cast(jnp.full((ROWS,), m0, jnp.float32), reduced),
          plgpu.layout_cast(jnp.full((ROWS,), l0, jnp.float32), reduced))
      acc, m, l = query_tile_loop(step, carry, (lo, flo, fhi, hi), sched, wg)
      if release is not None:  # An item without key tiles fetches here.
        pl.when(lo == hi)(release)

      nonempty = l > 0.0
      inv_l = (1.0 if drop is None else drop.scale) / jnp.where(nonempty, l,
                                                                 1.0)
      acc = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
      q_tile[...] = acc.astype(dtype)  # The query rows are spent: reuse.
      lse_smem.at[wg][...] = jnp.where(
          nonempty, m * LN2 + jnp.log(jnp.where(nonempty, l, 1.0)), -jnp.inf)
      plgpu.commit_smem()
      rows = tile * BLOCK_Q + wg * ROWS
      plgpu.copy_smem_to_gmem(q_tile,
                              out_ref.at[batch, pl.ds(rows, ROWS), head])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg],
                              lse_ref.at[batch, head, pl.ds(rows, ROWS)])
      return base + (hi - lo)

    lax.fori_loop(0, count, item, jnp.int32(0))
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == CONSUMERS)
  def _producer():
    plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

    def item(n, base):
      _, batch, head = order.item(program, n)
      lo, _, _, hi, *_ = read_bounds(n)
      return stream_tiles(
          k_ref, v_ref, kvvec_ref, (k_smem, v_smem, kvvec_smem),
          (k_ready, v_ready, kvvec_ready), free, bk=bk, batch=batch,
          kv_head=lax.div(head, jnp.array(st.groups, head.dtype)), lo=lo,
          hi=hi, base=base)

    lax.fori_loop(0, count, item, jnp.int32(0))


def forward(st: Static, q, k, v, bounds, q_vectors, kv_vectors,
            mod_rows=(None, None), seed=None, sinks=None):
  """The forward kernel on padded operands.

  Args:
    st: the call's static structure.
    q: `[B, Sqp, H, Dp]`, bf16 or fp16, Sqp a multiple of `BLOCK_Q`.
    k: `[B, Skp, Hkv, Dp]`, Skp a multiple of `block_k(Dp)`.
    v: `[B, Skp, Hkv, Dp]`.
    bounds: int32 `[B, nq, 4]`, per query tile the key tiles `[lo, hi)` that
      may be visible and, inside, `[flo, fhi)` that are fully visible
      (`structure.bounds_table` for tiles `BLOCK_Q x block_k(Dp)`).
    q_vectors: int32 `[B, Nq, Sqp]` (`st.vectors()[0]`, in order; a zero
      `[B, 1, Sqp]` when Nq = 0).
    kv_vectors: int32 `[B, Nk, Skp]` (`st.vectors()[1]`; `kv_ok` first).
    mod_rows: with mods (`st.mods`, which `mosaic_mods.plan` accepts), their
      program values `(floats [B, H, ROW] float32, ints [B, H, ROW] int32)`,
      None where they read none (`mosaic_mods.program_rows`).
    seed: with dropout (`st.dropout_rate`), uint32 `[4]`: the hash's seed
      and the batch and head offsets (`structure.structure_vectors`).
    sinks: float32 `[H]`, the heads' sink logits (natural units), or None:
      each row's softmax denominator gains `exp(sinks[h])`, and its lse
      counts it (a row that sees no key: out 0, lse `sinks[h]`).

  Returns:
    `(out [B, Sqp, H, Dp] in q's dtype, lse [B, H, Sqp] float32)`: natural
    log, -inf (and out 0) for rows that see no key (without sinks).
  """
  batch, q_len, heads, d = q.shape
  kv_len = k.shape[1]
  bk = block_k(d)
  nq = q_len // BLOCK_Q
  if q_len % BLOCK_Q or kv_len % bk:
    raise ValueError(f"flash (Mosaic GPU): Sqp = {q_len} and Skp = {kv_len} "
                     f"must be multiples of {BLOCK_Q} and {bk}.")
  swizzled = wgmma_transforms(q.dtype)
  nqv, nkv = q_vectors.shape[1], kv_vectors.shape[1]
  bounds = pad_bounds(bounds, seed)
  ranked = ranked_order(st)
  if ranked:  # Rows by rank, each naming its tile.
    bounds = ranked_bounds(bounds)
  # A split score_mod (not with sinks, whose logit the row term would move).
  split = sinks is None and split_slot(st.mods, st.causal) is not None

  # Rows TMA can copy: each head's base-2 sink first.
  sink_rows = None if sinks is None else jnp.pad(
      (sinks.astype(jnp.float32) * LOG2E)[:, None], ((0, 0), (0, SINK_ROW - 1)))

  order = WorkOrder(batch, heads, nq, st.causal, gpu.core_count(),
                    ranked=ranked)
  ring = 3 if ranked else 2  # Each warpgroup's bounds rows (`_kernel`).
  buffers = 2 if d <= 128 else 1  # Two don't fit at Dp = 256.
  copies = buffers * CONSUMERS  # Consumer wg's rows in buffer b: b * 2 + wg.

  def flash_forward(q_ref, k_ref, v_ref, bounds_ref, qvec_ref, kvvec_ref,
                    *refs):  # The kernel's name in profiles, ptxas' report.
    refs = list(refs)
    mod_refs = split_row_refs(mod_rows, refs)
    sink_ref = None if sinks is None else refs.pop(0)
    out_ref, lse_ref = refs
    smem = (
        plgpu.SMEM((copies, ROWS, d), q.dtype,
                   transforms=swizzled),
        plgpu.SMEM((STAGES, bk, d), k.dtype, transforms=swizzled),
        plgpu.SMEM((STAGES, bk, d), v.dtype, transforms=swizzled),
        plgpu.SMEM((copies, nqv, ROWS), jnp.int32),
        plgpu.SMEM((STAGES, nkv, bk), jnp.int32),
        plgpu.SMEM((ring * (CONSUMERS + 1), BOUNDS_ROW), jnp.int32),
        plgpu.SMEM((CONSUMERS, ROWS), jnp.float32),
    )
    ready = (plgpu.Barrier(num_barriers=copies),
             plgpu.Barrier(num_barriers=copies),
             plgpu.Barrier(num_barriers=STAGES),
             plgpu.Barrier(num_barriers=STAGES),
             plgpu.Barrier(num_barriers=STAGES),
             plgpu.Barrier(num_barriers=ring * (CONSUMERS + 1)))
    free = (plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=STAGES),) * 2
    sched = plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=1)

    sink_scratch = None if sinks is None else (
        plgpu.SMEM((copies, SINK_ROW), jnp.float32),
        plgpu.Barrier(num_barriers=copies))

    def scoped(*scratch):
      (smem_refs, ready_refs, free_refs, sched_ref, row_refs,
       sink_refs) = scratch
      row_refs = split_row_scratch(mod_rows, row_refs)
      _kernel(q_ref, k_ref, v_ref, bounds_ref, qvec_ref, kvvec_ref, mod_refs,
              sink_ref, out_ref, lse_ref,
              (*smem_refs, ready_refs, free_refs, sched_ref), row_refs,
              sink_refs, st=st, bk=bk, order=order, buffers=buffers,
              split=split)

    pl.run_scoped(scoped, smem, ready, free, sched,
                  row_scratch(mod_rows, copies=buffers), sink_scratch,
                  collective_axes="wg")

  out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32))
  out, lse = persistent_kernel(flash_forward, out_type, order)(
      q, k, v, bounds, q_vectors, kv_vectors, *row_operands(mod_rows),
      *(() if sinks is None else (sink_rows,)))
  if split:  # The rows' constant terms, left out of the kernel's logits.
    lse = lse + row_terms(st.mods, st.causal, mod_rows[0], q_vectors[
        :, st.vectors()[0].index("q_pos")])
  return out, lse
