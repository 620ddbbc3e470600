"""The one static record of a flash call, and its structure tables (XLA).

Every backend of the flash kernels (`triton_*`, `mosaic_*`) reads a call
through the same two things, built here before any kernel runs:

- `Static`: what is static about the call (scale, soft cap, which structured
  features it uses, grouped heads, the launches, interpret mode); hashable,
  the `custom_vjp`'s non-differentiable argument;
- the structure as `O(B * S)` int32 vectors (`structure_vectors`: positions,
  segment ids, key validity) and, per kernel, the tile-skipping bounds
  (`tile_bounds`): for each tile of one sequence the run `[lo, hi)` of
  tiles of the other that may hold a visible pair and, inside it, the run
  `[flo, fhi)` that certainly holds only visible pairs (no mask needed).

The order in which a backward kernel's programs `(tile, batch row, head)`
start (`TileOrder`) lives here too: the Triton and Mosaic kernels share it.

Padding to whole tiles also lives here: the backends take the same padded
operands.

Glossary of shapes:
- B: batch size.
- Sq, Sk: query and key lengths; Sqp, Skp: padded to whole tiles.
- nq, nk: the number of query and key tiles of one kernel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jax import lax
import jax.numpy as jnp

from flexible_attention.core import masks

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MAX_HEAD_DIM = 256
MIN_BLOCK = 16  # The smallest tile and padded head size (Triton's dot side).

# --- Static description of a call -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything static about a call (the custom_vjp's non-diff argument).

  Attributes:
    sm_scale: the softmax scale (positive).
    softcap: logits soft cap, or None.
    precision: matmul precision of the Triton kernels, or None.
    causal: `kv_pos <= q_pos`.
    window: `(left, right)` around `q_pos`, or None.
    segments: segment ids must match.
    mask: a dense mask is passed (`aux["mask"]`).
    dropout_rate: the rate, or None without dropout.
    groups: G = H // Hkv, query heads per key/value head.
    launch: the kernels' `launch.LaunchConfig` (tiles and backends).
    interpret: run the Triton kernels in Pallas' interpreter.
    mods: the call's score / mask modifications as the Triton kernels read
      them (`mod_lowering.KernelMods`), or None.
    position_bound: with mods, the largest magnitude of a query or key
      position when the positions are known at trace time (the default
      ones: `mod_tables.position_bound`), else None. The Mosaic kernels
      then evaluate a score_mod's integer position arithmetic in float32
      where that is exact (`mosaic_mods.TileMods`).
  """

  sm_scale: float
  softcap: float | None
  precision: Any
  causal: bool
  window: tuple[int, int] | None
  segments: bool
  mask: bool
  dropout_rate: float | None
  groups: int
  launch: Any  # launch.LaunchConfig
  interpret: bool
  mods: Any = None  # mod_lowering.KernelMods
  position_bound: int | None = None

  @property
  def mask_mod(self) -> bool:
    return self.mods is not None and self.mods.mask_mod is not None

  @property
  def score_mod(self) -> bool:
    return self.mods is not None and self.mods.score_mod is not None

  def vectors(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names of the query and key vectors a masked tile reads (the
    Mosaic kernels stack exactly these): positions with causal, a window,
    mods (which read them, in every tile for a score_mod) or dropout (its
    hash, every tile)."""
    positions = self.causal or self.window is not None or (
        self.mods is not None) or self.dropout_rate is not None
    q_names = (("q_pos",) if positions else ()) + (
        ("q_seg",) if self.segments else ())
    kv_names = ("kv_ok",) + (("kv_pos",) if positions else ()) + (
        ("kv_seg",) if self.segments else ())
    return q_names, kv_names



def next_power_of_2(n: int) -> int:
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def pad_dim(d: int) -> int:
  return max(MIN_BLOCK, next_power_of_2(d))


def pad_axis(x, axis: int, size: int, mode: str = "constant", value=0):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  if mode == "edge":
    return jnp.pad(x, widths, mode="edge")
  return jnp.pad(x, widths, constant_values=value)



# --- Block skipping tables (XLA, O(B * S)) ------------------------------------


def _tile_min_max(x, valid, block: int):
  """Per-tile min and max of `x [B, S]` over `valid [B, S]` entries."""
  b, s = x.shape
  x = x.reshape(b, s // block, block)
  valid = valid.reshape(b, s // block, block)
  big = jnp.iinfo(jnp.int32).max
  lo = jnp.min(jnp.where(valid, x, big), axis=-1)
  hi = jnp.max(jnp.where(valid, x, -big), axis=-1)
  return lo, hi


def tile_tables(st: Static, aux, block_q: int, block_k: int,
                mod_tiles=None):
  """`(maybe, full)`, bool `[B, nq, nk]`: whether tile (i, j) may hold a
  visible pair / certainly holds only visible pairs.

  `mod_tiles`: the mask_mod's own `{(block_q, block_k): (maybe, full)}`
  (`mod_tables.derive`, `[B|1, nq, nk]`), and-ed in; without them a call
  with a mask_mod has no fully visible tile (every tile evaluates it).
  """
  q_pos, kv_pos, kv_ok = aux["q_pos"], aux["kv_pos"], aux["kv_ok"] != 0
  q_all = jnp.ones(q_pos.shape, bool)
  qmin, qmax = _tile_min_max(q_pos, q_all, block_q)  # [B, nq]
  kmin, kmax = _tile_min_max(kv_pos, kv_ok, block_k)  # [B, nk]
  b, sk = kv_ok.shape
  ok = kv_ok.reshape(b, sk // block_k, block_k)
  k_any, k_all = jnp.any(ok, -1), jnp.all(ok, -1)
  qmin, qmax = qmin[:, :, None], qmax[:, :, None]
  kmin, kmax = kmin[:, None, :], kmax[:, None, :]
  maybe = jnp.broadcast_to(k_any[:, None, :], (b, qmin.shape[1],
                                               kmin.shape[2]))
  full = maybe & k_all[:, None, :]
  if st.causal:
    maybe &= kmin <= qmax
    full &= kmax <= qmin
  if st.window is not None:
    # The window's ends saturate at int32's (`masks.window_bounds`).
    lo_min, hi_min = masks.window_bounds(qmin, st.window)
    lo_max, hi_max = masks.window_bounds(qmax, st.window)
    maybe &= (kmax >= lo_min) & (kmin <= hi_max)
    full &= (kmin >= lo_max) & (kmax <= hi_min)
  if st.segments:
    sqmin, sqmax = _tile_min_max(aux["q_seg"], q_all, block_q)
    skmin, skmax = _tile_min_max(aux["kv_seg"], kv_ok, block_k)
    sqmin, sqmax = sqmin[:, :, None], sqmax[:, :, None]
    skmin, skmax = skmin[:, None, :], skmax[:, None, :]
    maybe &= (skmax >= sqmin) & (skmin <= sqmax)
    full &= (sqmin == sqmax) & (skmin == skmax) & (sqmin == skmin)
  if st.mask_mod and mod_tiles is not None:
    mod_maybe, mod_full = mod_tiles[(block_q, block_k)]
    maybe &= jnp.asarray(mod_maybe)
    full &= jnp.asarray(mod_full)
  elif st.mask_mod:  # Not static: every tile evaluates the mask_mod.
    full = jnp.zeros_like(full)
  if st.mask:  # Every tile evaluates the dense mask.
    full = jnp.zeros_like(full)
  return maybe, full & maybe


def bounds_table(maybe, full):
  """`[B, n, m]` tables -> int32 `[B, n, 4]`: `(lo, flo, fhi, hi)` per row.

  Tiles `[lo, hi)` of the last axis may be visible; `[flo, fhi)` (inside it)
  are certainly fully visible and need no mask.
  """
  m = maybe.shape[-1]
  idx = jnp.arange(m)
  any_maybe = jnp.any(maybe, -1)
  lo = jnp.where(any_maybe, jnp.argmax(maybe, -1), 0)
  hi = jnp.where(any_maybe, m - jnp.argmax(maybe[..., ::-1], -1), 0)
  any_full = jnp.any(full, -1)
  flo = jnp.where(any_full, jnp.argmax(full, -1), hi)
  after = (idx >= flo[..., None]) & ~full
  fhi = jnp.where(jnp.any(after, -1), jnp.argmax(after, -1), m)
  fhi = jnp.where(any_full, fhi, hi)
  flo = jnp.clip(flo, lo, hi)
  fhi = jnp.clip(fhi, flo, hi)
  return jnp.stack([lo, flo, fhi, hi], -1).astype(jnp.int32)




def structure_vectors(inputs, dropout, q_pad: int, kv_pad: int
                      ) -> dict[str, Any]:
  """The call's structure as padded int vectors, its dense mask and seed.

  Args:
    inputs: the canonical `AttentionInputs` (its `visibility`).
    dropout: a `Dropout`, or None.
    q_pad, kv_pad: Sqp and Skp.

  Returns:
    `aux`: `q_pos [B, Sqp]`, `kv_pos [B, Skp]`, `kv_ok [B, Skp]` (key
    validity), with segment ids `q_seg [B, Sqp]`, `kv_seg [B, Skp]`, a dense
    mask `mask [B|1, H|1, Sqp|1, Skp|1]` int8 and the dropout seed `seed
    [4]` uint32 when the call has them. Padded queries repeat the last real
    one (tighter skipping tables); padded keys are invalid.
  """
  vis, dims = inputs.visibility, inputs.dims
  batch, q_len, kv_len = dims.batch, dims.q_len, dims.kv_len
  kv_ok = jnp.broadcast_to(vis.kv_indices >= 0, (batch, kv_len))
  if vis.kv_lengths is not None:
    kv_ok = kv_ok & (vis.kv_indices[None, :] < vis.kv_lengths[:, None])
  aux = {
      "q_pos": pad_axis(vis.q_positions.astype(jnp.int32), 1, q_pad, "edge"),
      "kv_pos": pad_axis(vis.kv_positions.astype(jnp.int32), 1, kv_pad),
      "kv_ok": pad_axis(kv_ok.astype(jnp.int32), 1, kv_pad),
  }
  if vis.has_segments:
    aux["q_seg"] = pad_axis(vis.q_segment_ids.astype(jnp.int32), 1, q_pad,
                            "edge")
    aux["kv_seg"] = pad_axis(vis.kv_segment_ids.astype(jnp.int32), 1,
                             kv_pad)
  if vis.mask is not None:
    aux["mask"] = masks.pad_broadcastable(vis.mask, q_pad - q_len,
                                          kv_pad - kv_len,
                                          False).astype(jnp.int8)
  if dropout is not None:
    aux["seed"] = jnp.concatenate([
        dropout.seed.astype(jnp.uint32),
        jnp.stack([dropout.batch_offset, dropout.head_offset]).astype(
            jnp.uint32)])
  return aux


def kernel_blocks(st: Static) -> tuple[tuple[int, int], ...]:
  """The `(block_q, block_k)` of each kernel of `st.launch` (fwd, dq,
  dkv)."""
  return tuple((t.block_q, t.block_k) for t in (
      st.launch.fwd, st.launch.dq, st.launch.dkv))


def tile_bounds(st: Static, aux, mod_tiles=None) -> dict[str, Any]:
  """Each kernel's skipping bounds, int32 `[B, n, 4]` (`bounds_table`):
  `bounds_fwd` and `bounds_dq` per query tile, `bounds_dkv` per key tile,
  for the tiles of `st.launch` (`mod_tiles` as `tile_tables`')."""
  launch = st.launch
  fwd = bounds_table(*tile_tables(st, aux, launch.fwd.block_q,
                                  launch.fwd.block_k, mod_tiles))
  dq = bounds_table(*tile_tables(st, aux, launch.dq.block_q,
                                 launch.dq.block_k, mod_tiles))
  maybe, full = tile_tables(st, aux, launch.dkv.block_q, launch.dkv.block_k,
                            mod_tiles)
  dkv = bounds_table(maybe.swapaxes(1, 2), full.swapaxes(1, 2))
  return {"bounds_fwd": fwd, "bounds_dq": dq, "bounds_dkv": dkv}


# --- The backward kernels' program order -------------------------------------


# Whether a causal call's backward programs start in groups of heads, tile
# by tile (`TileOrder`), instead of head by head: the dK/dV kernels'
# (Triton's, Mosaic's split and fused) and the dQ kernels' (Triton's, also
# the bias gradient's, and Mosaic's). The compiled GPU battery passed with
# both on (H100, 2026-12-07, twice). Timed on an H100 (benchmarks/
# BENCHMARKS.md): the dQ order makes the causal backward at D = 128, 4k
# tokens 3.9-4.3% faster (Triton's dQ; H200 and H100). The dK/dV order
# added nothing while the Mosaic kernels launched heads first (below);
# launched tile by tile, it is 2.5-5% faster at 4k causal in two runs
# (mixed at 16k: -2.5%, +1.7%), and is the default too. False restores
# head by head.
GROUPED_CAUSAL_DKV = True
GROUPED_CAUSAL_DQ = True

# Whether the Mosaic GPU backward kernels (dK/dV, fused or split, and dQ)
# launch their grid in `TileOrder`'s order. Mosaic GPU launches a grid's
# *last* axis as CUDA's x (`plgpu.kernel` reverses the grid: Pallas grids
# are row-major, CUDA's column-major), so `TileOrder.grid` as given puts
# the head first and the tile last: the programs running at once are one
# tile of every (batch row, head), each streaming its own head's operands
# through L2. Nsight Compute on an H100 (the fused backward, D = 128, not
# causal, B * S = 16k) measured that: its q / dO loads hit L2 for 0.6% of
# their sectors at 2k tokens (128 heads: one program a head at once), 16%
# at 4k and 56% at 8k, and the kernel was bound by DRAM at 4k (72% of its
# bandwidth, 4.0 ms against 6.3 at 8k for twice the work). With the flag
# the grid is reversed back (`TileOrder.mosaic_grid`) and the programs of
# one head run together, sharing them: the fused backward at 4k tokens
# became the fastest (the backward 8-12% faster than the split one's,
# `launch.FUSED_DQ_MIN_KV_LEN`); elsewhere within +-2% (D = 64, 16k causal,
# split: +1.5-2.2% in two runs). False restores the heads-first launch.
MOSAIC_TILES_FIRST = True


@dataclasses.dataclass(frozen=True)
class TileOrder:
  """The order in which a backward kernel's programs `(tile, batch row,
  head)` start: the dK/dV kernels' (key tile, KV head) and the dQ kernels'
  (query tile, query head; the caller maps the grid's tile axis to the tile,
  heavy causal rows first).

  CUDA starts a grid's programs about in the order of their linear index
  (the first axis fastest), each as a multiprocessor frees. A Triton
  kernel's grid is `grid`; a Mosaic GPU kernel's is `mosaic_grid()`, the
  same order (Mosaic GPU makes a grid's last axis CUDA's x). Head by head
  (`group` = 1, grid `(tiles, B, heads)`, names "t", "b", "h"), under a
  causal mask each head's programs go from its heaviest tile to its
  lightest, so the last heads' heavy tiles start late and the programs end
  unevenly: in a model of the dK/dV work (key tile t costs the query tiles
  that see it; list scheduling on 132 multiprocessors), 5.9% over an even
  split at 8k tokens (B = 2, 16 heads) and 7.0% at 4k (B = 4), 0.9% at
  16k; the Triton dQ kernel's, 3-7% at 4k-8k with one program a
  multiprocessor and 7-16% with two. In groups of `group` heads (grid
  `(group, tiles, B heads / group)`, names "g", "t", "c") a group's
  programs go tile by tile, each over the group's heads: heaviest first
  within the group, within 0.2% of the even split in the dK/dV model at 4k
  and 8k (1.6% at 2k, B = 8, against 6.9%), while the programs running at
  once still share a few heads' operands in L2.
  """
  batch: int
  heads: int
  tiles: int
  group: int = 1

  @classmethod
  def choose(cls, batch: int, heads: int, tiles: int, causal: bool,
             cores: int | None, *, kernel: str) -> TileOrder:
    """Head by head, unless `causal`, the `kernel`'s flag on ("dkv":
    `GROUPED_CAUSAL_DKV`, "dq": `GROUPED_CAUSAL_DQ`) and `cores` (the
    multiprocessors; None off a GPU) known: then groups of the fewest heads
    (a divisor of B heads) with at least `cores` programs."""
    grouped = {"dkv": GROUPED_CAUSAL_DKV, "dq": GROUPED_CAUSAL_DQ}[kernel]
    n, group = batch * heads, 1
    if causal and grouped and cores:
      group = next(g for g in range(1, n + 1)
                   if n % g == 0 and (g * tiles >= cores or g == n))
    return cls(batch, heads, tiles, group)

  @property
  def grid(self) -> tuple[int, int, int]:
    if self.group == 1:
      return (self.tiles, self.batch, self.heads)
    return (self.group, self.tiles, self.batch * self.heads // self.group)

  @property
  def names(self) -> tuple[str, str, str]:
    return ("t", "b", "h") if self.group == 1 else ("g", "t", "c")

  def mosaic_grid(self) -> dict[str, tuple]:
    """`grid` and `grid_names` for a Mosaic GPU kernel (`plgpu.kernel`,
    `plgpu.Mesh`): with `MOSAIC_TILES_FIRST` reversed, since Mosaic GPU
    launches a grid's last axis as CUDA's x, so that CUDA starts the
    programs in this order as it does a Triton kernel's `grid`."""
    if not MOSAIC_TILES_FIRST:
      return dict(grid=self.grid, grid_names=self.names)
    return dict(grid=self.grid[::-1], grid_names=self.names[::-1])

  def at(self, *ids):
    """`(tile, batch row, head)` of the program at grid indices `ids` (a
    Triton kernel's `pl.program_id`s, a `BlockSpec`'s index map's
    arguments)."""
    if self.group == 1:
      return ids
    g, tile, c = ids
    bh = c * self.group + g
    return tile, bh // self.heads, bh % self.heads

  def program(self, axis_index=lax.axis_index):
    """`(tile, batch row, head)` of the running program of a kernel over
    the named grid `names` (Mosaic GPU's `axis_index(name)`)."""
    return self.at(*map(axis_index, self.names))


@dataclasses.dataclass(frozen=True)
class DecodeStatic:
  """Everything static about a decode call, what both decode kernels read
  (`triton_decode`, `mosaic_decode`; for Triton also what
  `triton_common.scores` and `dot` read).

  Attributes:
    sm_scale: the softmax scale (positive).
    softcap: logits soft cap, or None.
    precision: matmul precision (None: the backend's default), or a
      `lax.Precision` (Triton only).
    causal: key token `t` visible only if `t <= q_pos`.
    window: `(left, right)` around `q_pos`, or None.
    launch: the backend's launch, `triton_decode.DecodeLaunch` or
      `mosaic_decode.MosaicDecodeLaunch`.
    interpret: run in Pallas' interpreter.
  """

  sm_scale: float
  softcap: float | None
  precision: Any
  causal: bool
  window: tuple[int, int] | None
  launch: Any
  interpret: bool
  # What `triton_common.scores` reads of the general kernels' record: the
  # decode kernels take no mods (cache calls with mods run the general
  # kernels, `decode.cache_call_reason`).
  score_mod: bool = dataclasses.field(default=False, init=False)

  def token_range(self, kv_length, first_pos, last_pos, any_query,
                  capacity: int):
    """The key tokens a row's queries may see: `(length, lo, hi)`, none of
    them outside `[lo, hi)`.

    What both decode kernels skip by (the Triton kernel's operands, worked
    out by XLA for every row; the Mosaic kernel works it out for its own
    row from scalars): the same jnp code on `[B]` arrays or on scalars.

    Args:
      kv_length: int32, the row's key count (any value: clipped to
        `[0, capacity]`).
      first_pos, last_pos: int32, the smallest and largest position of the
        row's real queries (in `[-2**30, 2**30]`).
      any_query: bool, whether the row has a real query (if not, `hi` is 0).
      capacity: the tokens a row's page table holds (`M * ps`).

    Returns:
      int32 `(length, lo, hi)`: the clipped key count and the token range
      (`lo` the int 0 without a window).
    """
    length = jnp.clip(kv_length, 0, capacity)
    lo, hi = 0, length
    if self.causal:
      hi = jnp.minimum(hi, last_pos + 1)
    if self.window is not None:
      left, right = (min(w, capacity) for w in self.window)
      lo = jnp.maximum(first_pos - left, 0)
      hi = jnp.minimum(hi, last_pos + right + 1)
    return length, lo, jnp.where(any_query, hi, 0)
