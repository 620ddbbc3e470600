"""Which tiles the programs of flash's Mosaic GPU kernels run, in what order.

- The bounds table's rows (`structure.bounds_table`): per tile of a
  program, the tiles `[lo, hi)` its loop runs and those it runs unmasked
  `[flo, fhi)` (a query tile's key tiles; in the dK/dV kernel a key
  tile's query tiles), padded to rows TMA copies (`pad_bounds`), with
  dropout the seed's words beside them; for the persistent forward,
  optionally sorted by work (`ranked_bounds`, `ranked_order`).
- Programs over one query tile (the dQ kernel): the grid of a
  `structure.TileOrder` (`query_tile_kernel`, `query_tile_program`) and the
  consumers' loop over the tile's key tiles (`query_tile_loop`, which the
  forward's items run too).
- The persistent forward: one program per multiprocessor running the work
  items `(query tile, batch row, head)` that `WorkOrder` deals it
  (`persistent_kernel`).

`mosaic_common` holds what the kernels' steps share (tiles, operands,
masking, the producer's stream); this module only where the steps run.

Glossary of shapes:
- B: batch size.
- nq: query tiles of a (batch row, head).
"""

from __future__ import annotations

import dataclasses
import functools

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from flexible_attention.kernels.flash.mosaic_common import BOUNDS_ROW
from flexible_attention.kernels.flash.mosaic_common import CONSUMERS
from flexible_attention.kernels.flash.mosaic_common import meet
from flexible_attention.kernels.flash.mosaic_common import read_row
from flexible_attention.kernels.flash.structure import TileOrder


def pad_bounds(bounds, seed=None):
  """`[B, n, 4]` -> `[B, n, BOUNDS_ROW]`: rows TMA can copy; with dropout
  the seed's words (uint32 `[4]`, `structure.structure_vectors`' `seed`)
  follow a tile's bounds as int32, so a program reads both in one row."""
  if seed is not None:
    words = lax.bitcast_convert_type(seed, jnp.int32)
    bounds = jnp.concatenate([bounds, jnp.broadcast_to(
        words, bounds.shape[:-1] + words.shape)], axis=-1)
  return jnp.pad(bounds, ((0, 0), (0, 0), (0, BOUNDS_ROW - bounds.shape[-1])))


TILE_COLUMN = BOUNDS_ROW - 1  # A ranked bounds row's tile (`ranked_bounds`).


def ranked_bounds(bounds):
  """A padded bounds table `[B, n, BOUNDS_ROW]` (`pad_bounds`) with each
  batch row's tiles sorted by `hi - lo` (the forward's and the dQ
  kernel's query tiles by their key tiles, the dK/dV kernel's key tiles by
  their query tiles), most first (ties by tile), and each row's tile in
  its `TILE_COLUMN`: row
  `r` of batch row b is the tile of rank r (`WorkOrder.ranked`,
  `ranked_tile_order`)."""
  work = bounds[..., 3] - bounds[..., 0]
  ranks = jnp.argsort(-work, axis=1, stable=True).astype(jnp.int32)
  rows = jnp.take_along_axis(bounds, ranks[..., None], axis=1)
  return rows.at[..., TILE_COLUMN].set(ranks)


def ranked_order(st, kernel: str = "fwd") -> bool:
  """Whether `kernel` deals a call's tiles by rank, where segment ids or a
  mask_mod make a tile's work other than its index says: the persistent
  forward its query tiles (`"fwd"`, `WorkOrder.ranked`; `RANKED_ORDER`),
  the backward's grid kernels their programs' tiles (`"dkv"`: key tiles,
  `"dq"`: query tiles; `ranked_tile_order`; `RANKED_BWD_ORDER`)."""
  flag = {"fwd": RANKED_ORDER, "dkv": RANKED_BWD_ORDER,
          "dq": RANKED_BWD_ORDER}[kernel]
  return flag and bool(st.segments or st.mask_mod)


def ranked_tile_order(batch: int, heads: int, tiles: int) -> TileOrder:
  """A grid kernel's programs by rank: rank r of every (batch row, head)
  before rank r + 1 (`TileOrder` in one group of all `batch * heads`), its
  tile axis the rank, with the bounds table sorted by `ranked_bounds` (the
  program reads its tile from its row: `row_tile`)."""
  return TileOrder(batch, heads, tiles, group=batch * heads)


def row_tile(bounds_smem, row):
  """The tile of a ranked bounds row already read into shared memory."""
  return bounds_smem[row, TILE_COLUMN]


def bounds_count(st) -> int:
  """The scalars a program reads from its bounds row: the 4 bounds, then
  with dropout the seed's 4 words (`pad_bounds`)."""
  return 4 if st.dropout_rate is None else 8


def query_tile_program(bounds_ref, bounds_smem, bounds_ready,
                       order: TileOrder, count: int = 4,
                       ranked: bool = False):
  """Where a program over one query tile (dQ) is: `(tile,
  batch, head, wg, (lo, flo, fhi, hi, ...))`, its query tile (the grid's
  tile axis backwards: heavy causal rows first; `ranked`: the axis is a
  rank, the tile in its row, `ranked_tile_order`), batch row, head (in
  `order`), this warpgroup and the first `count` scalars of the tile's
  bounds row (`bounds_count`), which every warpgroup reads through its own
  shared-memory row (`bounds_ref`: `[B, nq, BOUNDS_ROW]`)."""
  t, batch, head = order.program()
  tile = t if ranked else order.tiles - 1 - t
  wg = lax.axis_index("wg")
  bounds = read_row(bounds_ref.at[batch, tile], bounds_smem.at[wg],
                    bounds_ready.at[wg], count)
  if ranked:
    tile = row_tile(bounds_smem, wg)
  return tile, batch, head, wg, bounds


def query_tile_loop(step, carry, bounds, sched, wg):
  """Consumer `wg`'s loop over a query tile's key tiles (the forward, dQ):
  `step(t, carry, masked)` over tiles `[lo, hi)` of `bounds = (lo, flo,
  fhi, hi)`, unmasked in `[flo, fhi)`. Consumer 1 starts one phase behind
  at `sched` and consumer 0 meets it once more at the end, so both meet
  there as often (each step meets twice). Returns the carry."""
  lo, flo, fhi, hi = bounds
  pl.when(wg == 1)(functools.partial(meet, sched))
  masked = functools.partial(step, masked=True)
  carry = lax.fori_loop(lo, flo, masked, carry)
  carry = lax.fori_loop(flo, fhi, functools.partial(step, masked=False),
                        carry)
  carry = lax.fori_loop(fhi, hi, masked, carry)
  pl.when(wg == 0)(functools.partial(meet, sched))
  return carry


def query_tile_kernel(body, out_type, order: TileOrder):
  """`body` as a Mosaic GPU kernel over the programs `(query tile, batch
  row, head)` in `order` (its grid) of `CONSUMERS + 1` warpgroups ("wg"),
  the last the producer."""
  return plgpu.kernel(
      body, out_type=out_type, **order.mosaic_grid(),
      num_threads=CONSUMERS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True))


# A causal call whose heads are few against the programs (at least this
# many programs a head) has its items dealt singly, heaviest first over
# all heads, boustrophedon over the programs (`WorkOrder`). Measured on an
# H100 (benchmarks/flash_notes.md, nineteenth session): 3-5% faster
# forwards at 16k tokens with 16 and 32 heads (4-8 programs a head), 0.5%
# slower and 4.4% faster in two runs at 8k with 32; 3-5% slower at 4k with
# 64 heads and 46% at 2k with 128, where the programs running at once read
# every head's K and V (about one program a head) and L2 no longer serves
# them.
SNAKE_PROGRAMS_PER_HEAD = 4
# The forward's query tiles dealt by rank where the structure makes their
# work uneven (`ranked_order`). Off until timed on a GPU
# (benchmarks/flash_notes.md).
RANKED_ORDER = False
# The backward's grid kernels (the Mosaic dK/dV and dQ kernels) deal their
# programs by rank likewise (`ranked_order(st, "dkv" | "dq")`): heaviest
# first over all (batch row, head) pairs, each program reading its tile
# from its bounds row. In a list-scheduling model of packed documents (16k
# tokens, 16 heads, 128-row tiles, 132 multiprocessors) the grouped
# order's last program ends 1.09-1.17x the mean work in the dK/dV kernel
# (a masked tile costing one or two full ones) and 1.08x in the dQ kernel,
# by rank 1.01x. Off until timed on a GPU (benchmarks/flash_notes.md).
RANKED_BWD_ORDER = False


@dataclasses.dataclass(frozen=True)
class WorkOrder:
  """Which query tiles the programs of the persistent forward run, in order.

  The work items are the `(query tile, batch row, head)` triples. Two
  orders:
  - chunks (the default): items numbered head by head (batch row by batch
    row) and, within a head, in zigzag (last tile, first, second last,
    second, ...); consecutive items make a chunk, two under a causal mask
    (a heavy tile and its light mirror, about as heavy together as any
    other pair), else one; program p runs chunks p, p + P, p + 2 P, ... of
    the P programs. The programs running at once work on a few heads' K
    and V (which stay in L2), and a causal call is balanced to within a
    chunk: at the standard causal cells (1024 chunks over 132 programs)
    the busiest program runs 8 where the mean is 7.76, 3% idle in the
    tail.
  - snake (causal calls with at least `SNAKE_PROGRAMS_PER_HEAD` programs a
    head, or `snake=True`): single items, level by level from every head's
    last (heaviest) tile to its first, dealt to programs 0 to P - 1, then
    P - 1 to 0, and so on, so that each program's items pair heavy with
    light: the busiest program within 0.2% of the mean from 4k tokens up
    (tile t costing t + 1 key tiles). The programs running at once work on
    all heads, each head's K and V shared by P / (B H) of them in L2.

  Both assume that a causal tile's work grows with its index. Where the
  structure says otherwise (packed documents, a mask_mod's blocks), with
  `ranked` the orders place a batch row's tiles by rank instead, rank 0
  the heaviest (`ranked_bounds`: the bounds table sorted by each tile's
  key tiles, whose rows then name their tile), and deal them as a causal
  call's, under or without a causal mask: where tile `nq - 1 - r` would
  go, rank `r` goes. At 16k tokens of packed documents (16 heads, 132
  programs) the snake left its busiest program 1.28-1.40x the mean work;
  by rank 1.01-1.02x.

  One program per multiprocessor (`cores`; every chunk its own program
  where it is None). Items of `[0, count(p))` of a program are numbered n.
  """
  batch: int
  heads: int
  tiles: int  # nq, the query tiles of a (batch row, head).
  causal: bool
  cores: int | None = None
  snake: bool | None = None  # None: `SNAKE_PROGRAMS_PER_HEAD`'s rule.
  ranked: bool = False

  @property
  def heavy_first(self) -> bool:
    """Whether a tile's work is known to fall with its rank (causal, or
    `ranked`), which both orders balance."""
    return self.causal or self.ranked

  @property
  def snakes(self) -> bool:
    """Whether the items go in the snake order."""
    if not self.heavy_first or self.snake is False:
      return False
    return self.snake or (self.cores is not None and SNAKE_PROGRAMS_PER_HEAD
                          * self.batch * self.heads <= self.cores)

  @property
  def per_chunk(self) -> int:
    return 2 if self.heavy_first and not self.snakes else 1

  @property
  def items(self) -> int:
    return self.batch * self.heads * self.tiles

  @property
  def chunks(self) -> int:
    return -(-self.items // self.per_chunk)

  @property
  def programs(self) -> int:
    return min(self.chunks, self.cores or self.chunks)

  def _position(self, p, n):
    """Program `p`'s place in the snake's `n`-th pass over the programs."""
    return jnp.where(n % 2 == 0, p, self.programs - 1 - p)

  def count(self, p):
    """The items of program `p` (int32 scalar, < `programs`): at least 1."""
    if self.snakes:
      passes, rest = divmod(self.items, self.programs)
      return passes + (self._position(p, passes) < rest).astype(jnp.int32)
    per, chunks, programs = self.per_chunk, self.chunks, self.programs
    n = (chunks - p + programs - 1) // programs * per
    if self.items % per:  # The last chunk is one item short.
      n = n - ((chunks - 1) % programs == p).astype(n.dtype)
    return n

  def item(self, p, n):
    """`(tile, batch, head)` of program `p`'s `n`-th item (int32 scalars);
    with `ranked` `(rank, batch, head)`: the item's row of the ranked
    bounds table, which names its tile."""
    if self.snakes:
      g = n * self.programs + self._position(p, n)
      level, bh = g // (self.batch * self.heads), g % (self.batch * self.heads)
      tile = level if self.ranked else self.tiles - 1 - level
      return tile, bh // self.heads, bh % self.heads
    per = self.per_chunk
    j = (p + n // per * self.programs) * per + n % per
    bh, r = j // self.tiles, j % self.tiles
    if self.ranked:  # The heavy one (by rank) first.
      tile = jnp.where(r % 2 == 0, r // 2, self.tiles - 1 - r // 2)
    else:  # By tile: the heavy one last.
      tile = jnp.where(r % 2 == 0, self.tiles - 1 - r // 2, r // 2)
    return tile, bh // self.heads, bh % self.heads


def persistent_kernel(body, out_type, order: WorkOrder):
  """`body` as a Mosaic GPU kernel of `order.programs` programs (grid name
  "p") of `CONSUMERS + 1` warpgroups ("wg"), the last the producer."""
  return plgpu.kernel(
      body, out_type=out_type, grid=(order.programs,), grid_names=("p",),
      num_threads=CONSUMERS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True))
