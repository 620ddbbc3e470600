"""The benchmark's problems: named cells and the inputs they run on.

A cell is one problem (batch, sequence length, heads, head size, causal or
packed documents). `config_cell` and `standard_grid` make them from a
benchmark config (configs/benchmark.py); `random_inputs` builds the arrays
every row of a cell runs on, on the devices; `attention_flops` and
`minimum_bytes` are what its timings and memory are measured against.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Cell:
  """One problem of a benchmark: sizes, causal and packed documents."""

  batch: int
  seq_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  causal: bool
  packed: bool = False  # Segment ids: documents of 64..2048 tokens.

  @property
  def name(self) -> str:
    kind = "packed" if self.packed else ("causal" if self.causal else "full")
    gqa = "" if self.num_heads == self.num_kv_heads else (
        f" H{self.num_heads}/{self.num_kv_heads}")
    return f"S{self.seq_len} D{self.head_dim} {kind}{gqa}"


def config_names(text: str) -> list[str]:
  """The names of a comma-separated config string."""
  return [n.strip() for n in text.split(",") if n.strip()]


def config_cell(config, seq_len: int) -> Cell:
  """The cell of a plain (one size per sequence length) config."""
  return Cell(batch=config.batch_size, seq_len=seq_len,
              num_heads=config.num_heads,
              num_kv_heads=config.num_kv_heads or config.num_heads,
              head_dim=config.head_dim, causal=config.causal)


def standard_grid(config) -> list[Cell]:
  """The standard grid of BENCH.md: B*S = `grid_tokens`, H*D =
  `grid_hidden`, S in `grid_lengths`, D in `grid_head_dims`, causal and not;
  plus grouped-query (H=32, Hkv=8, D=128, causal) and packed documents at
  each length of `grid_extra_lengths`."""
  cells = []
  for head_dim in config.grid_head_dims:
    for seq_len in config.grid_lengths:
      for causal in (False, True):
        cells.append(Cell(config.grid_tokens // seq_len, seq_len,
                          config.grid_hidden // head_dim,
                          config.grid_hidden // head_dim, head_dim, causal))
  for seq_len in config.grid_extra_lengths:
    batch = max(config.grid_tokens // seq_len, 1)
    cells.append(Cell(batch, seq_len, 32, 8, 128, True))
    heads = max(config.grid_hidden // 128, 1)
    cells.append(Cell(batch, seq_len, heads, heads, 128, True, packed=True))
  return cells


def packed_segment_ids(batch: int, seq_len: int, seed: int) -> np.ndarray:
  """`[B, S]` int32 ids of documents of random lengths in [64, 2048]."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, seq_len), np.int32)
  for row in ids:
    start, doc = 0, 0
    while start < seq_len:
      length = int(rng.integers(64, 2049))
      row[start:start + length] = doc
      start, doc = start + length, doc + 1
  return ids


def _first_keys(seq_len: int, window: int | None,
                segment_ids: np.ndarray | None) -> np.ndarray:
  """`[B, S]` (or `[1, S]`): each causal row's first visible key; its last
  is the row itself."""
  rows = np.arange(seq_len)
  if segment_ids is not None:
    ids = np.asarray(segment_ids)
    starts = np.concatenate(  # Where each row's document begins.
        [np.ones_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    return np.maximum.accumulate(np.where(starts, rows, 0), axis=1)
  if window is not None:
    return np.maximum(rows - window, 0)[None]
  return np.zeros((1, seq_len), np.int64)


def causal_pairs(seq_len: int, *, window: int | None = None,
                 segment_ids: np.ndarray | None = None) -> float:
  """The visible (query, key) pairs per batch row of a causal self-attention
  call of `seq_len` tokens: with a sliding `window` (keys `[i - window,
  i]`), or with `segment_ids` (`[B, S]`: within each document, each one
  run of tokens, as `packed_segment_ids` makes them), the mean
  over the rows. The useful work a kernel that skips invisible tiles is
  measured against."""
  first = _first_keys(seq_len, window, segment_ids)
  return float((np.arange(seq_len) - first + 1).sum()) / first.shape[0]


def visible_tiles(seq_len: int, block_q: int, block_k: int, *,
                  window: int | None = None,
                  segment_ids: np.ndarray | None = None) -> float:
  """The `[block_q, block_k]` tiles with a visible pair per batch row of a
  causal self-attention call (`causal_pairs`' cases), the mean over the
  rows: the tiles a kernel that skips invisible ones computes. A row's
  visible keys are one run (its first key to itself), so a query tile's
  visible key tiles run from its rows' first key to its last row."""
  first = _first_keys(seq_len, window, segment_ids)
  rows = first.shape[0]
  pad = -seq_len % block_q
  first = np.pad(first, ((0, 0), (0, pad)), mode="edge")
  lo = first.reshape(rows, -1, block_q).min(axis=2) // block_k
  last_row = np.minimum(np.arange(0, seq_len, block_q) + block_q,
                        seq_len) - 1
  hi = last_row // block_k
  return float((hi - lo + 1).sum()) / rows


def attention_flops(batch, heads, q_len, kv_len, head_dim, causal) -> float:
  """Forward FLOPs, 4 B H Sq Sk D, halved for causal (BENCH.md)."""
  flops = 4.0 * batch * heads * q_len * kv_len * head_dim
  return flops / 2 if causal else flops


def minimum_bytes(cell: Cell, dtype: str) -> int:
  """The bytes of what a fused forward+backward of `cell` holds.

  Q, O, dO, dQ `[B, S, H, D]` and K, V, dK, dV `[B, S, Hkv, D]` in `dtype`,
  plus the float32 log-sum-exp `[B, H, S]` the backward needs.
  """
  tokens = cell.batch * cell.seq_len
  q_elements = tokens * cell.num_heads * cell.head_dim
  kv_elements = tokens * cell.num_kv_heads * cell.head_dim
  lse_bytes = 4 * tokens * cell.num_heads
  return np.dtype(dtype).itemsize * 4 * (q_elements + kv_elements) + lse_bytes


@dataclasses.dataclass(frozen=True)
class CellInputs:
  """The arrays every row of a cell runs on (made on the devices)."""

  q: jax.Array  # [B, S, H, D]
  k: jax.Array  # [B, S, Hkv, D]
  v: jax.Array  # [B, S, Hkv, D]
  ct_check: jax.Array  # [B, S, H, D], zero outside the last `rows` queries.
  ct_time: jax.Array  # [B, S, H, D]
  rows: int  # The queries checked against the reference.
  segment_ids: np.ndarray | None  # [B, S] for packed cells.


def random_inputs(cell: Cell, dtype: str, seed: int, check_rows: int,
                  sharding) -> CellInputs:
  """The cell's random inputs; the cotangents have the output's dtype.

  Args:
    cell: the problem.
    dtype: the inputs' dtype.
    seed: the seed of the arrays and of the packed documents' lengths.
    check_rows: the last queries checked against the reference (at most S).
    sharding: where the `[B, S, ...]` arrays live, or None (one device).
  """
  b, h, d, hkv = cell.batch, cell.num_heads, cell.head_dim, cell.num_kv_heads
  seq_len = cell.seq_len
  dtype = np.dtype(dtype)
  rows = min(check_rows, seq_len)
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  jit = functools.partial(jax.jit, static_argnums=(1, 2))
  if sharding is not None:
    jit = functools.partial(jit, out_shardings=sharding)
  normal = jit(lambda key, shape, dtype: jax.random.normal(key, shape, dtype))

  @functools.partial(jax.jit, out_shardings=sharding) if sharding else jax.jit
  def check_cotangent(key):
    zeros = jnp.zeros((b, seq_len, h, d), dtype)
    return zeros.at[:, -rows:].set(
        jax.random.normal(key, (b, rows, h, d), dtype))

  return CellInputs(
      q=normal(keys[0], (b, seq_len, h, d), dtype),
      k=normal(keys[1], (b, seq_len, hkv, d), dtype),
      v=normal(keys[2], (b, seq_len, hkv, d), dtype),
      ct_check=check_cotangent(keys[3]),
      ct_time=normal(keys[4], (b, seq_len, h, d), dtype),
      rows=rows,
      segment_ids=(packed_segment_ids(b, seq_len, seed) if cell.packed
                   else None))
