"""The decode kernels' launches: splits, blocks and slots per call.

Triton (`decode_launch`). Split rule: a row's page table is cut into S
splits of `pages_per_split` entries (a whole number of blocks); the grid is
`B * Hkv * S` programs. By default S is the smallest count that gives at
least `WAVES` (2) programs per streaming multiprocessor of the GPU
(`jax.devices()[0].core_count`; 1 without a GPU), and at least 2 while the
grid holds fewer than `2 * WAVES` programs per multiprocessor (measured on
an H200 at B = 64, L = 4k, Hkv = 8: one split reads K/V at 36% of peak, two
at 47%; benchmarks/BENCHMARKS.md), but no more splits than
keep `MIN_BLOCKS_PER_SPLIT` (4) blocks in each, then trimmed so that no
split starts past the table. Page blocking: `pages_per_block` (n) pages are
gathered per loop step: by default `BLOCK_TOKENS` (128; 64 for head sizes
over 128) tokens' worth of pages, and at least 16 tokens (Triton's smallest
dot side).

Mosaic GPU (`mosaic_decode_launch`): `MOSAIC_BLOCKS` tokens per slot and
slots per head size (measured on an H200: benchmarks/BENCHMARKS.md), and
the split count that fills whole waves of programs (`_wave_split`), at
least `MOSAIC_MIN_BLOCKS_PER_SPLIT` (2) blocks each (at B = 1, L = 4k,
Hkv = 8 on an H100: 16 splits of 2 blocks take 14.1 µs a call dense and
14.2 paged 16, 8 splits of 4 take 15.4 and 15.9; benchmarks/BENCHMARKS.md).

Both plan on the table's capacity `M * ps` (the lengths are not static);
splits past a row's length exit at once and merge as empty. `num_splits`
overrides the count.

Glossary of shapes:
- B: batch size; Hkv: key/value heads.
- ps: tokens per page; M: page-table entries per row.
- D, Dv: query/key and value head sizes.
"""

from __future__ import annotations

import numpy as np

from flexible_attention.kernels import gpu
from flexible_attention.kernels.flash import mosaic_decode
from flexible_attention.kernels.flash.mosaic_decode import MosaicDecodeLaunch
from flexible_attention.kernels.flash.structure import MAX_HEAD_DIM
from flexible_attention.kernels.flash.structure import MIN_BLOCK
from flexible_attention.kernels.flash.structure import next_power_of_2
from flexible_attention.kernels.flash.triton_decode import DecodeLaunch

WAVES = 2  # Programs per streaming multiprocessor the default split aims at.
MIN_BLOCKS_PER_SPLIT = 4  # A split reads at least this many blocks.
BLOCK_TOKENS = 128  # Tokens gathered per loop step (64 for D > 128).
# The Mosaic kernel's default (tokens per slot, slots) per head size: its
# slots, query and float32 output tiles fill ~176 KiB of shared memory.
MOSAIC_BLOCKS = {64: (128, 4), 128: (128, 2), 256: (64, 2)}
MOSAIC_MIN_BLOCKS_PER_SPLIT = 2  # The Mosaic kernel's (module docstring).
MOSAIC_SPLIT_OVERHEAD = 4  # A program's fixed cost, in blocks (a guess).
SHARED_MEMORY = 227 * 1024  # Bytes of shared memory a Hopper block may use.
SHARED_MEMORY_SLACK = 4096  # Barriers, row vectors, alignment.
SHARED_MEMORY_PER_CORE = 228 * 1024  # A multiprocessor's (1 KiB per block
# reserved).


def _is_power_of_2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def _positive_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x > 0


def decode_unsupported_reason(head_dim: int, value_dim: int, page_size: int
                       ) -> str | None:
  """Why the decode kernel cannot serve these sizes, or None if it can.

  It reads the cache where it lies (no padded copy), and Triton's tensors
  have power-of-two sides: D and Dv must be powers of two in [16, 256] and
  the page size a power of two.
  """
  for name, d in (("head_dim", head_dim), ("value_dim", value_dim)):
    if not (_is_power_of_2(d) and MIN_BLOCK <= d <= MAX_HEAD_DIM):
      return (f"the decode kernel needs {name} a power of two in "
              f"[{MIN_BLOCK}, {MAX_HEAD_DIM}], got {d}")
  if not _is_power_of_2(page_size):
    return f"the decode kernel needs a power-of-two page size, got {page_size}"
  return None


def _split_count(batch: int, num_kv_heads: int, blocks: int,
                 num_splits: int | None, core_count: int | None,
                 waves: int = WAVES) -> tuple[int, int]:
  """`(S, blocks per split)` for a row of `blocks` loop steps: the split
  rule (module docstring) or the user's `num_splits`."""
  if num_splits is None:
    cores = core_count or gpu.core_count() or 1
    want = -(-waves * cores // (batch * num_kv_heads))
    if batch * num_kv_heads * want < 2 * waves * cores:
      want = max(want, 2)
    splits = max(1, min(want, blocks // MIN_BLOCKS_PER_SPLIT))
  elif _positive_int(num_splits):
    splits = int(num_splits)
  else:
    raise ValueError(f"num_splits must be a positive int or None, got "
                     f"{num_splits!r}.")
  return splits, -(-blocks // splits)


def decode_launch(batch: int, num_kv_heads: int, table_len: int,
                  page_size: int, head_dim: int, *,
                  num_splits: int | None = None,
                  pages_per_block: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None,
                  core_count: int | None = None) -> DecodeLaunch:
  """The decode kernel's launch: the defaults (module docstring) with the
  given fields over them.

  Args:
    batch, num_kv_heads: B and Hkv.
    table_len: M, page-table entries per row.
    page_size: ps (a power of two).
    head_dim: the larger of D and Dv.
    num_splits: S, or None for the split rule.
    pages_per_block: n (a power of two, `n * ps >= 16`), or None.
    num_warps, num_stages: Triton's settings, or None (4 and 2).
    core_count: the GPU's streaming multiprocessors (default: the default
      GPU's; 1 without a GPU).

  Returns:
    A `DecodeLaunch`.
  """
  min_pages = max(1, MIN_BLOCK // page_size)
  if pages_per_block is None:
    tokens = BLOCK_TOKENS if head_dim <= 128 else BLOCK_TOKENS // 2
    pages_per_block = max(min_pages, min(max(1, tokens // page_size),
                                         next_power_of_2(table_len)))
  elif not (_positive_int(pages_per_block) and
            _is_power_of_2(pages_per_block) and
            pages_per_block >= min_pages):
    raise ValueError(
        f"pages_per_block must be a power of two with pages_per_block * "
        f"page_size >= {MIN_BLOCK} (page_size = {page_size}: at least "
        f"{min_pages}), got {pages_per_block!r}.")
  n = int(pages_per_block)
  splits, blocks_per_split = _split_count(
      batch, num_kv_heads, -(-table_len // n), num_splits, core_count)
  pages_per_split = blocks_per_split * n
  if num_splits is None:  # No split starts past the table.
    splits = -(-table_len // pages_per_split)
  for name, value in (("num_warps", num_warps), ("num_stages", num_stages)):
    if value is not None and not _positive_int(value):
      raise ValueError(f"{name} must be a positive int or None, got "
                       f"{value!r}.")
  return DecodeLaunch(pages_per_block=n, num_splits=splits,
                      pages_per_split=pages_per_split,
                      num_warps=num_warps or 4, num_stages=num_stages or 2)


def _wave_split(rows: int, blocks: int, cores: int) -> int:
  """The Mosaic kernel's split count: programs run in waves of `cores` (the
  programs that fit in the multiprocessors' shared memory), and the time is
  about `waves * (blocks per split + MOSAIC_SPLIT_OVERHEAD)` blocks; the
  count that minimises it (the smallest on ties), with at least
  `MOSAIC_MIN_BLOCKS_PER_SPLIT` blocks per split."""
  most = max(1, blocks // MOSAIC_MIN_BLOCKS_PER_SPLIT)
  cost = lambda s: (-(-rows * s // cores) *
                    (-(-blocks // s) + MOSAIC_SPLIT_OVERHEAD), s)
  return min(range(1, most + 1), key=cost)


def mosaic_decode_launch(batch: int, num_kv_heads: int, table_len: int,
                         page_size: int, head_dim: int, *,
                         num_splits: int | None = None,
                         block_tokens: int | None = None,
                         stages: int | None = None,
                         producers: int | None = None,
                         core_count: int | None = None) -> MosaicDecodeLaunch:
  """The Mosaic GPU decode kernel's launch: `MOSAIC_BLOCKS`' tile and slots
  for the head size and `_wave_split`'s count over blocks of
  `block_tokens`, with the given fields over them. A split holds whole
  blocks and whole pages.

  Args:
    batch, num_kv_heads: B and Hkv.
    table_len: M, page-table entries per row.
    page_size: ps (a power of two >= 8).
    head_dim: D (== Dv; 64, 128 or 256).
    num_splits: S, or None for the split rule.
    block_tokens: tokens per shared-memory slot (a power of two in [64,
      256]), or None.
    stages: shared-memory slots (>= 1), or None.
    producers: warpgroups streaming the slots, 1 or 2 (keys and values
      apart), or None (1).
    core_count: the GPU's streaming multiprocessors (default: the default
      GPU's; 1 without a GPU).

  Returns:
    A `MosaicDecodeLaunch`.
  """
  default_tokens, default_stages = MOSAIC_BLOCKS.get(head_dim, (64, 2))
  bk = default_tokens if block_tokens is None else block_tokens
  if not (_positive_int(bk) and _is_power_of_2(bk) and
          mosaic_decode.MIN_BLOCK_TOKENS <= bk <= 256):
    raise ValueError(f"block_tokens must be a power of two in "
                     f"[{mosaic_decode.MIN_BLOCK_TOKENS}, 256], got "
                     f"{block_tokens!r}.")
  stages = default_stages if stages is None else stages
  if not _positive_int(stages):
    raise ValueError(f"stages must be a positive int or None, got "
                     f"{stages!r}.")
  if producers is None:
    producers = 1
  if not _positive_int(producers) or producers > 2:
    raise ValueError(f"producers must be 1, 2 or None, got {producers!r}.")
  itemsize = 2  # bf16 / fp16.
  smem = (2 * mosaic_decode.ROWS * head_dim * itemsize + mosaic_decode.ROWS *
          min(head_dim, mosaic_decode.OUT_COLUMNS) * 4 +
          stages * bk * 2 * head_dim * itemsize + SHARED_MEMORY_SLACK)
  if smem > SHARED_MEMORY:
    raise ValueError(
        f"block_tokens = {bk} with stages = {stages} needs {smem} bytes of "
        f"shared memory at head size {head_dim}; a block has "
        f"{SHARED_MEMORY}.")
  unit = max(bk, page_size)  # Splits hold whole blocks and whole pages.
  units = -(-table_len * page_size // unit)
  blocks = units * (unit // bk)
  if num_splits is None:
    per_core = max(1, SHARED_MEMORY_PER_CORE // (smem + 1024))
    splits = _wave_split(batch * num_kv_heads, blocks,
                         per_core * (core_count or gpu.core_count() or 1))
  elif _positive_int(num_splits):
    splits = int(num_splits)
  else:
    raise ValueError(f"num_splits must be a positive int or None, got "
                     f"{num_splits!r}.")
  tokens_per_split = -(-blocks // splits * bk // unit) * unit
  if num_splits is None:
    splits = -(-table_len * page_size // tokens_per_split)
  return MosaicDecodeLaunch(block_tokens=int(bk), num_splits=splits,
                            tokens_per_split=tokens_per_split,
                            stages=int(stages), producers=int(producers))
