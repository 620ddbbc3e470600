"""flash's decode kernel for Hopper, in Mosaic GPU: split-KV over pages.

Computes what the Triton decode kernel (`triton_decode`) computes, for
sm_90: each split's float32 partial output and natural log-sum-exp, which
`decode.py` merges. It takes the call's `[B, Sq, H, D]` queries, kv
lengths and query positions as they come: each program works
out its row's token range (`DecodeStatic.token_range`) and its rows'
positions from scalars, so no XLA step prepares them (the Triton kernel
gets them as operands).

Grid `(S, B, Hkv)`; program `(s, b, h)` holds all the query rows of KV head
`h` in row `b` (`G * Sq` of them, padded to one `wgmma` tile of `ROWS`), so
each key and value is read once per KV head, and runs two warpgroups (three
with `producers = 2`):

- a producer that streams the split's keys and values into a ring of
  `stages` shared-memory slots with TMA. A slot holds `block_tokens` tokens:
  one copy per page for pages smaller than a block (the page ids read from
  the table, in global memory, one block ahead, so that their latency
  overlaps the copies), a slice of one page for larger pages. No dense copy
  of the cache is ever made, and a dense cache is a table of consecutive
  pages (`decode.dense_as_pages`). With `producers = 2` a second producer
  streams the values and the first the keys, so each issues half of a
  block's copies (one per page for small pages: opt-in; on an H100 no
  faster than one producer at B = 1 and 8, L = 4k and 32k);
- a consumer that runs `q k^T` and `p v` as `wgmma`s on the slots and the
  online softmax (base 2, raw logits, as `mosaic_fwd`), masking every block
  with the library's rule (`masks.pair_visible`: a real query row, a token
  below the row's length, causal / window for the row's position).

Blocks outside the tokens the program's rows can see (past the row's length,
after its last query under causal, outside the window) are never loaded; a
split with none writes out 0 and lse -inf. Page ids read from the table are
clamped to `[0, P)` (as the Triton kernel does). A row whose cache
overflowed gets NaN out and lse from the epilogue (it adds the row's `0` or
NaN to its rows' `1 / l` and lse), so no pass over the output follows the
kernel. Which rows overflowed comes as an operand (`overflow`), or the
kernel tests it itself (`check_cache`: `core/cache.py`'s
`overflowing_rows`): the consumer compares the row's length with the
capacity, and the producer checks each table entry it reads for a page id
outside `[0, P)` below the length (one comparison per id it loads anyway;
then, for a split whose queries stop before the row's length, the entries
of the rest of its part) and leaves its verdict in shared memory behind a
barrier the epilogue waits on. The producer reads every entry below the
length only where the row's queries see every token up to it: no window,
every query slot real (the caller's contract; `decode.py` tests the other
calls in XLA).

Shared memory: the query tile `[ROWS, D]` and its unswizzled stage (the
new tokens' query heads are copied there from `[B, Sq, H, D]`, then
through registers into the tile), the slots `stages * block_tokens * (D +
Dv)` values and an output tile `[ROWS, min(Dv, 32)]` (wider outputs go out
32 columns at a time): 168 KiB at D = Dv = 128 with 2 slots of 128 tokens
(one program per multiprocessor; 3 slots of 128 do not fit), 96 KiB with
2 slots of 64 at D = 64 (two).

Glossary of shapes:
- B: batch size; Sq: new queries per row; Hkv: key/value heads; G: query
  heads per KV head; S: key splits.
- R: `ROWS` (64), query rows of a program (`G * Sq` real ones);
  Ro: rows read into the tile and written back (`G * Sq` rounded up to
  8).
- P: pages in the pool; ps: tokens per page; M: page-table entries per row
  (M0 before the table is padded to whole splits).
- D, Dv: query/key and value head sizes (D == Dv in 64, 128, 256).
- bk: `block_tokens`, tokens per slot.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from flexible_attention.core import masks
from flexible_attention.kernels.flash.mosaic_common import CONSUMER_REGISTERS
from flexible_attention.kernels.flash.mosaic_common import PRODUCER_REGISTERS
from flexible_attention.kernels.flash.mosaic_common import load_vector
from flexible_attention.kernels.flash.mosaic_common import operands_reason
from flexible_attention.kernels.flash.mosaic_common import wgmma_transforms
from flexible_attention.kernels.flash.structure import LN2
from flexible_attention.kernels.flash.structure import LOG2E

ROWS = 64  # Query rows of a program: one wgmma M tile.
MIN_PAGE_SIZE = 8  # The swizzled slots' row tiling.
OUT_COLUMNS = 32  # Columns of the float32 output tile in shared memory.
MIN_BLOCK_TOKENS = 64  # `p v`'s contraction: one 128-byte swizzle of 16 bits.


@dataclasses.dataclass(frozen=True)
class MosaicDecodeLaunch:
  """The launch of the Mosaic GPU decode kernel (all fields resolved).

  Attributes:
    block_tokens: bk, tokens per shared-memory slot (a power of two in
      [64, 256]: `wgmma`'s N for `q k^T`, its K for `p v`).
    num_splits: S, the key splits of each row.
    tokens_per_split: tokens of each split (a multiple of bk and of the page
      size).
    stages: shared-memory slots of K and V.
    producers: warpgroups streaming them: 1 (keys and values), or 2 (one
      for the keys, one for the values: each issues half of a block's
      copies, which for small pages are one per page).
  """

  block_tokens: int
  num_splits: int
  tokens_per_split: int
  stages: int
  producers: int = 1


def unsupported_reason(*, dtype, head_dim: int, value_dim: int,
                       page_size: int, rows: int, interpret: bool,
                       precision) -> str | None:
  """Why this kernel cannot serve a decode call (`rows = G * Sq` query rows
  per KV head), or None."""
  reason = operands_reason(dtype=dtype, head_dim=head_dim,
                           value_dim=value_dim, interpret=interpret)
  if reason is not None:
    return reason
  if page_size < MIN_PAGE_SIZE or page_size & (page_size - 1):
    return (f"it takes power-of-two page sizes >= {MIN_PAGE_SIZE}, got "
            f"{page_size}")
  if rows > ROWS:
    return (f"it holds up to {ROWS} query rows per KV head (G * Sq), got "
            f"{rows}")
  if precision is not None:
    return "it has one matmul precision (the inputs' type, float32 sums)"
  return None


def _row_queries(pos_ref, valid_ref, batch):
  """Row `batch`'s query positions and whether each is a real query, as
  scalars (`Sq` of each, read from global memory; every query is real
  without `valid_ref`)."""
  q_len = pos_ref.shape[1]
  if valid_ref is None:
    valid = [jnp.asarray(True)] * q_len
  else:
    valid = [valid_ref[batch, i] != 0 for i in range(q_len)]
  return [pos_ref[batch, i] for i in range(q_len)], valid


def _token_range(st, length_ref, pos_ref, valid_ref, batch, capacity: int):
  """Row `batch`'s `(length, lo, hi)` (`DecodeStatic.token_range`) from its
  key count and its queries' positions, in scalars."""
  big = 2**30
  positions, valid = _row_queries(pos_ref, valid_ref, batch)
  positions = [jnp.clip(x, -big, big) for x in positions]
  first = functools.reduce(jnp.minimum, [
      jnp.where(ok, x, big) for x, ok in zip(positions, valid)])
  last = functools.reduce(jnp.maximum, [
      jnp.where(ok, x, -big) for x, ok in zip(positions, valid)])
  return st.token_range(length_ref[batch], first, last,
                        functools.reduce(jnp.logical_or, valid), capacity)


def _row_vectors(pos_ref, valid_ref, batch, groups: int, layout):
  """The `[R]` vectors of the tile's rows (row r: query head `r % G` of
  new token `r // G`): each row's query position, and 1 for a real query
  row (0 past the `G * Sq` rows and for padded query slots)."""
  positions, valid = _row_queries(pos_ref, valid_ref, batch)
  token = lax.div(plgpu.broadcasted_iota(jnp.int32, (ROWS,), 0,
                                         layout=layout), groups)
  row_pos = row_ok = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.int32), layout)
  for i, (x, ok) in enumerate(zip(positions, valid)):
    row_pos = jnp.where(token == i, x, row_pos)
    row_ok = jnp.where(token == i, ok.astype(jnp.int32), row_ok)
  return row_pos, row_ok


def _kernel(q_ref, k_ref, v_ref, table_ref, length_ref, pos_ref, valid_ref,
            poison_ref, out_ref, lse_ref, smem_refs, barrier_refs, *, st,
            rows_out: int, groups: int, capacity: int, final: bool,
            check_cache: bool):
  # With `check_cache` and a table, one more of each: the producer's verdict
  # on the entries it read (0, or NaN when one names no page) and the
  # barrier behind it.
  (q_smem, q_stage, k_smem, v_smem, out_smem, lse_smem,
   *verdict_smem) = smem_refs
  q_ready, k_ready, v_ready, k_free, v_free, *verdict_ready = barrier_refs
  verdict_smem = verdict_smem[0] if verdict_smem else None
  verdict_ready = verdict_ready[0] if verdict_ready else None
  launch = st.launch
  bk, stages = launch.block_tokens, launch.stages
  num_pages, page_size = k_ref.shape[0], k_ref.shape[1]
  chunk = min(page_size, bk)  # Tokens per copy.
  split, batch = lax.axis_index("s"), lax.axis_index("b")
  head, wg = lax.axis_index("h"), lax.axis_index("wg")

  length, lo_token, hi_token = _token_range(st, length_ref, pos_ref,
                                            valid_ref, batch, capacity)
  start = split * launch.tokens_per_split
  lo = jnp.maximum(start, lo_token)
  hi = jnp.minimum(start + launch.tokens_per_split, hi_token)
  lo_block = lax.div(lo, bk)
  hi_block = jnp.where(hi > lo, lax.div(hi + bk - 1, bk), lo_block)

  @pl.when(wg == 0)
  def _consumer():
    if launch.producers > 1:  # Three warpgroups share the registers.
      plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
    # New token t's G query heads are rows [t G, t G + G) of the tile: one
    # copy each into the unswizzled stage, then through registers into the
    # swizzled tile `wgmma` reads. The rows past G * Sq are never visible,
    # so whatever they hold stays in rows that are not written back
    # (`wgmma` rows are independent, and they are masked before the softmax).
    for t in range(pos_ref.shape[1]):
      plgpu.copy_gmem_to_smem(q_ref.at[batch, t, pl.ds(head * groups, groups)],
                              q_stage.at[pl.ds(t * groups, groups)], q_ready)
    rows = plgpu.Layout.WGMMA.reduce(1)
    shape = (ROWS, bk)
    row_pos, row_ok = (lax.broadcast_in_dim(x, shape, [0]) for x in
                       _row_vectors(pos_ref, valid_ref, batch, groups, rows))
    row_ok = row_ok != 0
    slots = plgpu.broadcasted_iota(jnp.int32, shape, 1,
                                   layout=plgpu.Layout.WGMMA)
    plgpu.barrier_wait(q_ready)
    q_smem[...] = load_vector(q_stage, plgpu.Layout.WGMMA, optimized=False)
    plgpu.commit_smem()
    scale = st.sm_scale * LOG2E if st.softcap is None else LOG2E

    def step(j, carry):
      acc, m, l = carry
      slot = lax.rem(j - lo_block, stages)
      plgpu.barrier_wait(k_ready.at[slot])

      def scores(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
        return acc_ref[...]

      s = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])
      if st.softcap is not None:
        s = st.softcap * jnp.tanh(s * (st.sm_scale / st.softcap))
      tokens = slots + j * bk
      vis = masks.pair_visible(row_ok & (tokens < length), row_pos, tokens,
                               causal=st.causal, window=st.window)
      s = jnp.where(vis, s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1) * scale)  # Base 2.
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      alpha = jnp.exp2(m - m_safe)
      p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_safe, shape, [0]))
      l = l * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      plgpu.barrier_wait(v_ready.at[slot])

      def values(acc_ref):
        plgpu.wgmma(acc_ref, p.astype(q_smem.dtype), v_smem.at[slot])

      acc = pl.run_state(values)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    carry = (plgpu.layout_cast(jnp.zeros((ROWS, v_ref.shape[-1]), jnp.float32),
                               plgpu.Layout.WGMMA),
             plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), rows),
             plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), rows))
    acc, m, l = lax.fori_loop(lo_block, hi_block, step, carry)
    nonempty = l > 0.0
    safe_l = jnp.where(nonempty, l, 1.0)
    inv_l = 1.0 / safe_l
    lse = jnp.where(nonempty, m * LN2 + jnp.log(safe_l), -jnp.inf)
    poison = None  # 0, or NaN for a row that overflowed.
    if poison_ref is not None:
      poison = poison_ref[batch]
    elif check_cache:
      poison = jnp.where(length_ref[batch] > capacity, jnp.nan, 0.0)
      if verdict_smem is not None:
        plgpu.barrier_wait(verdict_ready)
        poison = poison + verdict_smem[0]
    if poison is not None:
      inv_l, lse = inv_l + poison, lse + poison
    acc = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
    lse_smem[...] = lse
    cols = out_smem.shape[1]  # The output goes out `cols` columns at a time.
    for c in range(acc.shape[1] // cols):
      columns = pl.ds(c * cols, cols)
      if c:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      out_smem[...] = acc[:, c * cols:(c + 1) * cols].astype(out_smem.dtype)
      plgpu.commit_smem()
      if final:  # New token t's G rows to its query heads.
        for t in range(pos_ref.shape[1]):
          plgpu.copy_smem_to_gmem(
              out_smem.at[pl.ds(t * groups, groups)],
              out_ref.at[batch, t, pl.ds(head * groups, groups), columns])
      else:
        plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, rows_out)],
                                out_ref.at[split, batch, head, :, columns])
    plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, rows_out)],
                            lse_ref.at[split, batch, head])
    plgpu.wait_smem_to_gmem(0)

  def produce(streams, check_table: bool):
    """Streams the split's blocks into the slots of `streams` (`(ref, smem,
    ready, free)` of the keys and / or the values) and, with
    `check_table`, leaves the verdict on the table entries it read."""
    if table_ref is None:  # Dense pages: row b's are b M ... b M + M - 1.
      row_pages = capacity // page_size

      def page_ids(j):
        """The page of each copy of block j (any j: inside the row)."""
        return [batch * row_pages + jnp.clip(
            lax.div(j * bk + c * chunk, page_size), 0, row_pages - 1)
                for c in range(bk // chunk)], None
    else:
      last_block = table_ref.shape[1] * page_size // bk - 1

      def page_ids(j):
        """The page of each copy of block j (any j: the table is read
        inside its bounds) and, with `check_table`, 1 if one of the entries
        read names no page though a token below the row's length lives
        there (else 0)."""
        j = jnp.clip(j, 0, last_block)
        ids, bad = [], None
        for c in range(bk // chunk):
          entry = lax.div(j * bk + c * chunk, page_size)
          page = table_ref[batch, entry]
          ids.append(jnp.clip(page, 0, num_pages - 1))
          if check_table:
            wrong = ((entry * page_size < length) &
                     ((page < 0) | (page >= num_pages))).astype(jnp.int32)
            bad = wrong if bad is None else bad | wrong
        return ids, bad

    def copy(ref, smem, ready, j, pages):
      for c, page in enumerate(pages):
        offset = (lax.rem(j * bk + c * chunk, page_size) if chunk < page_size
                  else 0)
        plgpu.copy_gmem_to_smem(ref.at[page, pl.ds(offset, chunk), head],
                                smem.at[pl.ds(c * chunk, chunk)], ready)

    def load(j, slot, ids):
      for ref, smem, ready, _ in streams:
        copy(ref, smem.at[slot], ready.at[slot], j, ids)

    def either(bad, more):  # Two verdicts (None: not checking) as one.
      return None if bad is None else bad | more

    # The first slots' page ids (and the loop's first) are read together:
    # their global-memory latencies overlap instead of adding up.
    first = lo_block + stages
    ids, bads = zip(*[page_ids(lo_block + slot) for slot in range(stages + 1)])
    for slot in range(stages):
      pl.when(lo_block + slot < hi_block)(
          functools.partial(load, lo_block + slot, slot, ids[slot]))

    def refill(j, carry):
      ids, bad = carry
      slot = lax.rem(j - lo_block, stages)
      # The next block's page ids are read a step ahead: their latency
      # overlaps this step's waits and copies.
      next_ids, next_bad = page_ids(j + 1)
      for ref, smem, ready, free in streams:
        plgpu.barrier_wait(free.at[slot])
        copy(ref, smem.at[slot], ready.at[slot], j, ids)
      return next_ids, either(bad, next_bad)

    bad = functools.reduce(either, bads)
    _, bad = lax.fori_loop(first, hi_block, refill, (ids[stages], bad))
    if check_table:
      # The entries of the split's part below the length that the queries
      # do not reach (none in a cache call: its last query is the row's
      # last token), read without copying their pages.
      stop = jnp.minimum(start + launch.tokens_per_split, length)
      gap_end = jnp.maximum(lax.div(stop + bk - 1, bk), hi_block)
      bad = lax.fori_loop(hi_block, gap_end,
                          lambda j, bad: bad | page_ids(j)[1], bad)
      verdict_smem[0] = jnp.where(bad != 0, jnp.nan, 0.0)
      plgpu.barrier_arrive(verdict_ready)

  keys = (k_ref, k_smem, k_ready, k_free)
  values = (v_ref, v_smem, v_ready, v_free)
  check_table = verdict_smem is not None  # By the keys' producer.
  if launch.producers == 1:
    pl.when(wg == 1)(lambda: produce((keys, values), check_table))
  else:  # Each issues half of a block's copies.
    @pl.when(wg == 1)
    def _keys():
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
      produce((keys,), check_table)

    @pl.when(wg == 2)
    def _values():
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
      produce((values,), False)


def decode_partials(st, q, key_pages, value_pages, page_table, kv_lengths,
                    q_positions, q_valid, capacity: int, overflow=None,
                    check_cache: bool = False, final: bool = False):
  """The decode kernel: each split's partial attention.

  Args:
    st: the call's `structure.DecodeStatic`, with a `MosaicDecodeLaunch`
      (its `precision` None, `softcap` None or positive).
    q: `[B, Sq, H, D]` bf16 / fp16, the call's queries: row `r` of KV head
      `h`'s tile is query head `h * G + r % G` of new token `r // G` (`G *
      Sq <= R`; the tile's rows past `G * Sq` are never real).
    key_pages: `[P, ps, Hkv, D]`.
    value_pages: `[P, ps, Hkv, Dv]`.
    page_table: `[B, M]` int32, the row's `M0` entries padded to `M = S *
      tokens_per_split / ps` (no key past `M0 * ps` is visible); or None
      for a dense cache's pages (row b's are `b M0 ... b M0 + M0 - 1`, `M0
      = capacity / ps`: no operand).
    kv_lengths: `[B]` ints, each row's key count (clipped to `M0 * ps`).
    q_positions: `[B, Sq]` ints, each query's token index.
    q_valid: `[B, Sq]` bool, False for padded query slots, or None (every
      slot holds a query: no operand).
    capacity: `M0 * ps`, the tokens the unpadded table holds.
    overflow: `[B]` bool, rows whose cache overflowed (their out and lse
      NaN), or None.
    check_cache: instead of `overflow`, test which rows overflowed
      (`cache_lib.overflowing_rows(kv_lengths, capacity, page_table[:,
      :M0], P)`) in the kernel. With a table, the call must have no window
      and no `q_valid` (the producer then reads every entry the test
      covers).
    final: with one split (S = 1), write the attention itself: `out` in
      q's dtype and the call's layout, no step after the kernel but the
      lse's (for a call with sinks, which merge after the kernel: False).

  Returns:
    `(out [S, B, Hkv, Ro, Dv] float32, lse [S, B, Hkv, Ro] float32)`: each
    split's normalised output and natural log-sum-exp (0 and -inf where the
    split holds no visible key; NaN for the rows that overflowed); `final`:
    out `[B, Sq, H, Dv]` in q's dtype.
  """
  launch = st.launch
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads, value_dim = value_pages.shape[2:]
  groups = num_heads // num_kv_heads
  # Ro: the rows written back, G * Sq rounded up to the 8 rows of a tile.
  rows_out = -(-groups * q_len // 8) * 8
  bk, stages, splits = (launch.block_tokens, launch.stages,
                        launch.num_splits)
  if groups * q_len > ROWS:
    raise ValueError(f"mosaic decode: G * Sq = {groups * q_len} query rows "
                     f"per KV head, at most {ROWS}.")
  if final and splits != 1:
    raise ValueError(f"mosaic decode: final takes one split, got {splits}.")
  if check_cache and overflow is not None:
    raise ValueError("mosaic decode: pass overflow or check_cache, not both.")
  check_table = check_cache and page_table is not None
  if check_table and (st.window is not None or q_valid is not None):
    raise ValueError("mosaic decode: check_cache with a page table takes no "
                     "window and no q_valid (its loads would not read every "
                     "entry below the lengths).")
  chunk = min(key_pages.shape[1], bk)
  swizzled = wgmma_transforms(q.dtype)
  out_dtype = q.dtype if final else jnp.float32

  def flash_decode(*refs):
    # q, k, v, [table], lengths, positions, [q_valid], [poison], out, lse.
    refs = iter(refs)
    q_ref, k_ref, v_ref = next(refs), next(refs), next(refs)
    table_ref = None if page_table is None else next(refs)
    length_ref, pos_ref = next(refs), next(refs)
    valid_ref = None if q_valid is None else next(refs)
    poison_ref = None if overflow is None else next(refs)
    out_ref, lse_ref = refs
    smem = (
        plgpu.SMEM((ROWS, head_dim), q.dtype, transforms=swizzled),
        plgpu.SMEM((ROWS, head_dim), q.dtype),  # The queries' stage.
        plgpu.SMEM((stages, bk, head_dim), q.dtype, transforms=swizzled),
        plgpu.SMEM((stages, bk, value_dim), q.dtype, transforms=swizzled),
        plgpu.SMEM((ROWS, min(value_dim, OUT_COLUMNS)), out_dtype),
        plgpu.SMEM((ROWS,), jnp.float32),
    )
    barriers = (
        plgpu.Barrier(num_arrivals=q_len),
        plgpu.Barrier(num_arrivals=bk // chunk, num_barriers=stages),
        plgpu.Barrier(num_arrivals=bk // chunk, num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
    )
    if check_table:  # The producer's verdict on the table, and its barrier.
      smem += (plgpu.SMEM((1,), jnp.float32),)
      barriers += (plgpu.Barrier(),)

    def scoped(smem_refs, barrier_refs):
      _kernel(q_ref, k_ref, v_ref, table_ref, length_ref, pos_ref, valid_ref,
              poison_ref, out_ref, lse_ref, smem_refs, barrier_refs,
              st=st, rows_out=rows_out, groups=groups, capacity=capacity,
              final=final, check_cache=check_cache)

    pl.run_scoped(scoped, smem, barriers, collective_axes="wg")

  poison = () if overflow is None else (
      jnp.where(overflow, jnp.nan, 0.0).astype(jnp.float32),)
  out_shape = ((batch, q_len, num_kv_heads * groups, value_dim) if final else
               (splits, batch, num_kv_heads, rows_out, value_dim))
  out_type = (
      jax.ShapeDtypeStruct(out_shape, out_dtype),
      jax.ShapeDtypeStruct((splits, batch, num_kv_heads, rows_out),
                           jnp.float32))
  return plgpu.kernel(
      flash_decode, out_type=out_type, grid=(splits, batch, num_kv_heads),
      grid_names=("s", "b", "h"), num_threads=1 + launch.producers,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, key_pages, value_pages,
    *(() if page_table is None else (page_table,)),
    kv_lengths.astype(jnp.int32), q_positions.astype(jnp.int32),
    *(() if q_valid is None else (q_valid.astype(jnp.int32),)), *poison)
