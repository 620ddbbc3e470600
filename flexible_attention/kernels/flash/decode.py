"""Decoding against a paged (or dense) KV cache: flash's decode entry point.

`decode_attention` is the pure, differentiable function a cache call with
few new tokens runs: it checks its arguments, lays the queries out as one
block of rows per KV head, chooses the backend and launch (pages per
block or slots, and the key splits), runs the split-KV kernel
(`mosaic_decode` on Hopper, `triton_decode` elsewhere), and merges the
splits by their log-sum-exps (`core.merge.merge_stacked`, two
small XLA reductions). A dense cache is served by the same kernel through
a free reshape (`dense_as_pages`). The backward does not rerun the forward: it
gathers the pages into a dense `[B, M * ps, Hkv, D]` copy and runs flash's
general backward kernels with the forward's output and log-sum-exp
(`interface.backward_pass`, the structure of the call as `canonicalize`
records it: kv lengths, q positions, key positions `arange(M * ps)`, causal,
window); gradients reach q, the key pages and the value pages (a page shared
by several rows, or several table entries, sums their gradients).

Launches (`decode_launch.py`): the Triton kernel's split rule and page
blocking, the Mosaic GPU kernel's slots and split by whole waves; which
kernel serves a call is `launch.choose_decode_backend`'s.

Glossary of shapes:
- B: batch size; Sq: new queries per row (1 to ~16).
- H, Hkv: query and key/value heads; G = H // Hkv.
- P: pages in the pool; ps: tokens per page; M: page-table entries per row.
- D, Dv: query/key and value head sizes.
- L: a dense cache's length.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from flexible_attention.core import cache as cache_lib
from flexible_attention.core import merge
from flexible_attention.core.inputs import AttentionInputs
from flexible_attention.core.inputs import canonical_window
from flexible_attention.core.inputs import check_array
from flexible_attention.core.inputs import check_sinks
from flexible_attention.core.inputs import concrete
from flexible_attention.core.inputs import canonicalize
from flexible_attention.core.inputs import poison_overflow
from flexible_attention.core.types import BlockSizes
from flexible_attention.core.types import KernelOutput
from flexible_attention.kernels.flash import interface
from flexible_attention.kernels.flash import launch as launch_policy
from flexible_attention.kernels.flash import mosaic_decode
from flexible_attention.kernels.flash import structure
from flexible_attention.kernels.flash import triton_decode
from flexible_attention.kernels.flash.structure import MIN_BLOCK
from flexible_attention.kernels.flash.structure import next_power_of_2
from flexible_attention.kernels.flash.decode_launch import decode_launch
from flexible_attention.kernels.flash.decode_launch import (
    decode_unsupported_reason)
from flexible_attention.kernels.flash.decode_launch import (
    mosaic_decode_launch)
from flexible_attention.kernels.flash.triton_decode import DecodeLaunch  # Exported.
from flexible_attention.kernels.flash.structure import DecodeStatic
from flexible_attention.kernels.flash.mosaic_decode import MosaicDecodeLaunch

MAX_PAGE_SIZE = 128  # The largest page `dense_as_pages` makes.


def dense_as_pages(keys, values):
  """A dense cache seen as pages, without copying it.

  `keys [B, L, Hkv, D]` is row-major, so `keys.reshape(B * L // ps, ps, Hkv,
  D)` is free (no data moves) and row b's token t lies in page
  `b * (L // ps) + t // ps`, slot `t % ps`. The page size is the largest
  power of two <= 128 dividing L. Every L has one (at worst ps = 1, for odd
  L): a small page only makes the table longer (4 bytes per page against
  `2 * Hkv * D * itemsize` bytes of K/V per token) and the kernel gathers
  more pages per block (at least 16 tokens' worth), so any L is served
  copy-free.

  Args:
    keys: `[B, L, Hkv, D]`.
    values: `[B, L, Hkv, Dv]`.

  Returns:
    `(key_pages [B * L / ps, ps, Hkv, D], value_pages [B * L / ps, ps, Hkv,
    Dv], page_table [B, L / ps] int32)`.
  """
  for name, x in (("keys", keys), ("values", values)):
    if np.ndim(x) != 4:
      raise ValueError(f"{name} must be [B, L, Hkv, D], got shape "
                       f"{np.shape(x)}.")
  if keys.shape[:3] != values.shape[:3]:
    raise ValueError(f"values must be [B, L, Hkv, Dv] with the keys' B, L, "
                     f"Hkv = {keys.shape[:3]}, got {values.shape}.")
  batch, length = keys.shape[:2]
  if length == 0:
    raise ValueError("keys must hold at least one slot per row, got L = 0.")
  page_size = math.gcd(length, MAX_PAGE_SIZE)  # The largest power of 2.
  pages = length // page_size
  key_pages = keys.reshape(batch * pages, page_size, *keys.shape[2:])
  value_pages = values.reshape(batch * pages, page_size, *values.shape[2:])
  return key_pages, value_pages, dense_table(batch, pages)


def dense_table(batch: int, pages: int):
  """The page table of `dense_as_pages`' pages: int32 `[B, M]`, row b's
  pages `b * M ... b * M + M - 1` (M = `pages`)."""
  return (jnp.arange(batch, dtype=jnp.int32)[:, None] * pages +
          jnp.arange(pages, dtype=jnp.int32)[None, :])


@dataclasses.dataclass(frozen=True)
class _Config:
  """The custom_vjp's static argument: the kernel's record, the tiles of
  the backward's flash kernels, and whether the Mosaic kernel tests which
  rows overflowed itself (`decode_attention`'s `check_overflow`)."""

  static: DecodeStatic
  block_sizes: BlockSizes | None
  kernel_checks: bool = False


def _forward(cfg: _Config, q, key_pages, value_pages, page_table, kv_lengths,
             q_positions, q_valid, sinks, overflow):
  """`(out [B, Sq, H, Dv] in q's dtype, lse [B, H, Sq] float32)`; `sinks
  [H]` (or None) merge as one more part after the key splits; the rows of
  `overflow` (`[B]` bool, or None) NaN."""
  st = cfg.static
  launch = st.launch
  batch, q_len, num_heads, head_dim = q.shape
  _, page_size, num_kv_heads, value_dim = value_pages.shape
  groups = num_heads // num_kv_heads
  mosaic = isinstance(launch, MosaicDecodeLaunch)
  if page_table is None and not mosaic:  # The Mosaic kernel needs none.
    page_table = dense_table(batch, value_pages.shape[0] // batch)
  table_len = (value_pages.shape[0] // batch if page_table is None else
               page_table.shape[1])
  capacity = table_len * page_size
  splits = launch.num_splits
  # One Mosaic split without sinks: the kernel writes the attention itself.
  final = mosaic and splits == 1 and sinks is None
  if mosaic:  # The kernel gathers its rows' queries and works out each
    # row's range and vectors itself.
    table = None if page_table is None else structure.pad_axis(
        page_table, 1, splits * launch.tokens_per_split // page_size)
    outs, lses = mosaic_decode.decode_partials(
        st, q, key_pages, value_pages, table, kv_lengths, q_positions,
        q_valid, capacity, overflow=overflow, check_cache=cfg.kernel_checks,
        final=final)
    overflow = None  # The kernel wrote NaN (the merge keeps it).
  else:
    if q_valid is None:
      q_valid = jnp.ones((batch, q_len), bool)
    # [B, Sq, Hkv, G, D] -> [B, Hkv, Sq * G, D], padded to R rows.
    pad = max(MIN_BLOCK, next_power_of_2(groups * q_len)) - q_len * groups
    qr = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    qr = qr.transpose(0, 2, 1, 3, 4).reshape(batch, num_kv_heads,
                                             q_len * groups, head_dim)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, pad), (0, 0)))
    row_pos = jnp.pad(jnp.repeat(q_positions, groups, axis=1),
                      ((0, 0), (0, pad)), mode="edge")
    row_ok = jnp.pad(jnp.repeat(q_valid, groups, axis=1).astype(jnp.int32),
                     ((0, 0), (0, pad)))
    # Per row: its key count and the token range its queries may see.
    big = 2**30
    pos = jnp.clip(q_positions, -big, big)
    length, lo, hi = st.token_range(
        kv_lengths, jnp.min(jnp.where(q_valid, pos, big), axis=1),
        jnp.max(jnp.where(q_valid, pos, -big), axis=1),
        jnp.any(q_valid, axis=1), capacity)
    info = jnp.stack([jnp.broadcast_to(x, (batch,)) for x in
                      (length, lo, hi, 0)], axis=1).astype(jnp.int32)
    # The splits' whole blocks of table entries (no copy when M fills them).
    table = structure.pad_axis(
        page_table, 1, launch.num_splits * launch.pages_per_split)
    outs, lses = triton_decode.decode_partials(
        st, qr, key_pages, value_pages, table, row_pos, row_ok, info)
  # [S, B, Hkv, R] -> [S, B, H, Sq]; [S, B, Hkv, R, Dv] -> [S, B, Sq, H, Dv].
  lses = lses[:, :, :, :q_len * groups].reshape(splits, batch, num_kv_heads,
                                                q_len, groups)
  lses = lses.transpose(0, 1, 2, 4, 3).reshape(splits, batch, num_heads,
                                               q_len)
  if final:
    return outs, lses[0]
  outs = outs[:, :, :, :q_len * groups].reshape(
      splits, batch, num_kv_heads, q_len, groups, value_dim)
  outs = outs.transpose(0, 1, 3, 2, 4, 5).reshape(splits, batch, q_len,
                                                  num_heads, value_dim)
  if splits == 1:
    out, lse = outs[0], lses[0]
  else:
    out, lse = merge.merge_stacked(outs, lses)
  if sinks is not None:
    out, lse = merge.merge_sinks(out.astype(jnp.float32), lse, sinks)
  return poison_overflow(out.astype(q.dtype), lse, overflow)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode(cfg, q, key_pages, value_pages, page_table, kv_lengths,
            q_positions, q_valid, sinks, overflow):
  return _forward(cfg, q, key_pages, value_pages, page_table, kv_lengths,
                  q_positions, q_valid, sinks, overflow)


def _decode_fwd(cfg, q, key_pages, value_pages, page_table, kv_lengths,
                q_positions, q_valid, sinks, overflow):
  out, lse = _forward(cfg, q, key_pages, value_pages, page_table, kv_lengths,
                      q_positions, q_valid, sinks, overflow)
  if cfg.kernel_checks:  # The kernel's test again, in XLA, for the backward.
    overflow = _overflowing_rows(page_table, kv_lengths, key_pages)
  return (out, lse), (q, key_pages, value_pages, page_table, kv_lengths,
                      q_positions, q_valid, sinks, overflow, out, lse)


def _decode_bwd(cfg, residuals, cotangents):
  (q, key_pages, value_pages, page_table, kv_lengths, q_positions, q_valid,
   sinks, overflow, out, lse) = residuals
  dout, dlse = cotangents
  if page_table is None:
    page_table = dense_table(q.shape[0], key_pages.shape[0] // q.shape[0])
  if q_valid is None:
    q_valid = jnp.ones(q_positions.shape, bool)
  if overflow is not None:
    # An overflowing row's NaN is a constant: no gradient flows from it. As
    # a query that sees no key it gives out 0 and lse +inf (p = 0) here.
    q_valid = q_valid & ~overflow[:, None]
    out = jnp.where(q_valid[:, :, None, None], out, jnp.zeros_like(out))
    lse = jnp.where(q_valid[:, None, :], lse, jnp.inf)
  st = cfg.static
  (k, v), gather_vjp = jax.vjp(
      lambda kp, vp: cache_lib.dense_view(cache_lib.PagedKVCache(
          kp, vp, page_table, kv_lengths)), key_pages, value_pages)
  inputs = canonicalize(q, k, v, causal=st.causal, kv_lengths=kv_lengths,
                        q_positions=q_positions, sliding_window=st.window)
  call = interface.prepare(inputs, sm_scale=st.sm_scale, softcap=st.softcap,
                           precision=st.precision,
                           block_sizes=cfg.block_sizes,
                           interpret=st.interpret)
  # Padded query slots: no gradient (flash's kernels see them as queries).
  dout = jnp.where(q_valid[:, :, None, None], dout, jnp.zeros_like(dout))
  dlse = jnp.where(q_valid[:, None, :], dlse, 0.0)
  # With sinks the lse counts them: dq, dk, dv unchanged (p = exp(s - lse)).
  dq, dk, dv, _, _ = interface.backward_pass(call, out, lse, dout, dlse)
  dkp, dvp = gather_vjp((dk, dv))
  dsinks = None if sinks is None else merge.sink_gradient(
      sinks, out, lse, dout, dlse)
  return dq, dkp, dvp, None, None, None, None, dsinks, None


_decode.defvjp(_decode_fwd, _decode_bwd)


def _overflowing_rows(page_table, kv_lengths, key_pages):
  """`cache_lib.overflowing_rows` of the call's table (None: a dense
  cache's pages) and lengths: `[B]` bool."""
  batch = kv_lengths.shape[0]
  num_pages, page_size = key_pages.shape[:2]
  if page_table is None:
    return cache_lib.overflowing_rows(kv_lengths,
                                      num_pages // batch * page_size)
  return cache_lib.overflowing_rows(
      kv_lengths, page_table.shape[1] * page_size, page_table, num_pages)


def _check_int(name: str, x, shape: tuple[int, ...], expected: str):
  check_array(name, x, len(shape), expected)
  if tuple(x.shape) != shape:
    raise ValueError(f"{name} must be {expected} = {shape}, got shape "
                     f"{tuple(x.shape)}.")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array {expected}, got dtype "
                    f"{x.dtype}.")
  return x.astype(jnp.int32)


def _positive_float(name: str, x) -> float:
  """`x` as a positive finite python float (static), or a ValueError."""
  try:
    value = float(x)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    value = math.nan
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be a positive finite number, got {x!r}.")
  return value


def _check_table_values(page_table, kv_lengths, num_pages: int,
                        page_size: int, overflow_flagged: bool = False):
  """Checks the table entries of every valid token, when not traced; with
  `overflow_flagged` (`check_overflow`) only that no length is negative (a
  length past the table or an entry outside the pool flags its row)."""
  table, lengths = concrete(page_table), concrete(kv_lengths)
  if table is None or lengths is None:
    return
  capacity = table.shape[1] * page_size
  for b, length in enumerate(lengths):
    if overflow_flagged:
      if length < 0:
        raise ValueError(f"kv_lengths[{b}] = {length} is negative.")
      continue
    if not 0 <= length <= capacity:
      raise ValueError(
          f"kv_lengths[{b}] = {length} is outside [0, {capacity}] (the page "
          f"table holds {table.shape[1]} pages of {page_size} tokens).")
    used = table[b, :-(-int(length) // page_size)]
    bad = np.flatnonzero((used < 0) | (used >= num_pages))
    if bad.size:
      j = int(bad[0])
      raise ValueError(
          f"page_table[{b}, {j}] = {used[j]} holds tokens of row {b} "
          f"(kv_lengths[{b}] = {length}) but is outside the pool's pages "
          f"[0, {num_pages}).")


def decode_attention(q, key_pages, value_pages, page_table, kv_lengths,
                     q_positions, *, sm_scale: float,
                     softcap: float | None = None, causal: bool = True,
                     window=None, q_valid=None, precision=None,
                     num_splits: int | None = None,
                     pages_per_block: int | None = None,
                     num_warps: int | None = None,
                     num_stages: int | None = None,
                     block_tokens: int | None = None,
                     stages: int | None = None,
                     producers: int | None = None,
                     backend: str | None = None,
                     block_sizes: BlockSizes | None = None,
                     interpret: bool = False,
                     sinks=None, overflow=None,
                     check_overflow: bool = False) -> KernelOutput:
  """Attention of a few new queries per row against a paged KV cache.

  Query `i` of row `b` (at token index `q_positions[b, i]`) attends to the
  tokens `t` of row b (`t < kv_lengths[b]`, key position `t`) with the
  library's semantics: float32 logits `q . k * sm_scale`, soft cap,
  causal (`t <= q_pos`), window (`q_pos - left <= t <= q_pos + right`), a
  softmax over visible keys; a query that sees no key gives out 0, lse
  -inf. Query head h reads KV head `h // (H // Hkv)`. A dense cache is
  passed through `dense_as_pages`.

  Args:
    q: `[B, Sq, H, D]`, the new tokens' queries (float; the pages' dtype).
    key_pages: `[P, ps, Hkv, D]`.
    value_pages: `[P, ps, Hkv, Dv]`.
    page_table: `[B, M]` ints: row b's token t is in page
      `page_table[b, t // ps]`, slot `t % ps`. Entries for tokens at or past
      the row's length are never used (any value). Entries outside `[0, P)`
      for valid tokens are an error: raised here when the table and lengths
      are concrete; under `jit` they cannot be checked, and the kernel (and
      the backward's gather) clamps them into `[0, P)`, so they read another
      page's keys (never out of bounds).
      Or None for a dense cache's pages (`dense_as_pages`, `B * M` of
      them): row b's pages are `b * M ... b * M + M - 1`, and the Mosaic
      kernel reads no table.
    kv_lengths: `[B]` ints, valid tokens per row (the new ones included),
      in `[0, M * ps]` (checked when concrete; clamped under `jit`).
    q_positions: `[B, Sq]` ints, each query's token index.
    sm_scale: the softmax scale (positive).
    softcap: logits soft cap `c` (`c * tanh(s / c)`), or None.
    causal: key `t` visible only if `t <= q_pos`.
    window: `int` or `(left, right)` (an int w is `(w, 0)` with causal,
      `(w, w)` without), or None.
    q_valid: `[B, Sq]` bool, False for padded query slots (out 0, lse -inf,
      no gradient), or None (all real).
    precision: matmul precision in the kernels (None: Triton's default,
      TF32 for float32 inputs).
    num_splits: key splits per row (None: the split rule, module
      docstring); splits past a row's keys merge as empty.
    pages_per_block: pages gathered per loop step (a power of two, at least
      16 tokens), or None.
    num_warps, num_stages: the Triton launch (None: 4 and 2).
    block_tokens, stages, producers: the Mosaic GPU launch: tokens per
      shared-memory slot and slots (None: `MOSAIC_BLOCKS`), and the
      warpgroups that stream them (None: 1; 2 streams keys and values
      apart).
    backend: `"triton"`, `"mosaic"` (Hopper) or None: the launch policy
      (`launch.choose_decode_backend`: Mosaic GPU on Hopper where it serves
      the call, else Triton).
    block_sizes: `fa.BlockSizes` of the flash kernels of the backward
      (as `flash_attention`'s), or None.
    interpret: run the kernel in Pallas' interpreter (CPU tests).
    sinks: `[H]` float sink logits (semantics step 6), or None; merged
      after the key splits as one more part (out 0, lse `sinks[h]`).
    overflow: `[B]` bool, rows whose cache overflowed (`core/cache.py`):
      their out and lse are NaN (the Mosaic kernel writes them so), and no
      gradient flows from them; or None.
    check_overflow: instead of `overflow`, flag the rows that overflowed
      by `core/cache.py`'s test (`cache_lib.overflowing_rows`: a length
      past the table's `M * ps` tokens, or an entry outside `[0, P)` that
      holds a token below the length), as a cache call whose table and
      lengths these are: such rows give NaN, no gradient and no error. The
      Mosaic kernel tests them itself where its loads read every entry the
      test covers (a dense cache's pages; a table with no window and every
      query slot real): its producer checks each page id it reads, its
      consumer the length, and no pass over the table runs before it.
      Elsewhere, and in the backward, an XLA reduction over the table.

  Returns:
    `KernelOutput(out [B, Sq, H, Dv] in q's dtype, lse [B, H, Sq] float32,
    None)`; both differentiable with respect to q, key_pages, value_pages
    and sinks.

  Raises:
    ValueError / TypeError: naming the argument, for shapes, ranks and
      dtypes that do not match, head or page sizes the kernel cannot read
      (`decode_unsupported_reason`), bad scales or launch fields, and, when
      concrete, out-of-range table entries or lengths.
  """
  check_array("q", q, 4, "[B, Sq, H, D]")
  check_array("key_pages", key_pages, 4, "[P, ps, Hkv, D]")
  check_array("value_pages", value_pages, 4, "[P, ps, Hkv, Dv]")
  batch, q_len, num_heads, head_dim = q.shape
  num_pages, page_size, num_kv_heads, _ = key_pages.shape
  value_dim = value_pages.shape[-1]
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise TypeError(f"q must be a floating array, got dtype {q.dtype}.")
  for name, x in (("key_pages", key_pages), ("value_pages", value_pages)):
    if x.dtype != q.dtype:
      raise TypeError(f"{name} must have q's dtype {q.dtype}, got "
                      f"{x.dtype}.")
  if key_pages.shape[3] != head_dim:
    raise ValueError(f"key_pages must be [P, ps, Hkv, D] with q's D = "
                     f"{head_dim}, got shape {tuple(key_pages.shape)}.")
  if value_pages.shape[:3] != key_pages.shape[:3]:
    raise ValueError(
        f"value_pages must be [P, ps, Hkv, Dv] with key_pages' P, ps, Hkv = "
        f"{tuple(key_pages.shape[:3])}, got shape "
        f"{tuple(value_pages.shape)}.")
  if num_kv_heads == 0 or num_heads % num_kv_heads:
    raise ValueError(
        f"q's heads H = {num_heads} must be a multiple of key_pages' KV heads "
        f"Hkv = {num_kv_heads}.")
  if num_pages == 0 or q_len == 0:
    raise ValueError(f"key_pages needs at least one page and q one query, got "
                     f"P = {num_pages}, Sq = {q_len}.")
  reason = decode_unsupported_reason(head_dim, value_dim, page_size)
  if reason is not None:
    raise ValueError(f"key_pages / value_pages: {reason}.")
  if page_table is None:  # Dense pages: row b's are b M ... b M + M - 1.
    if num_pages % batch:
      raise ValueError(f"page_table=None takes a dense cache's pages "
                       f"(`dense_as_pages`: B * M of them), got P = "
                       f"{num_pages} for B = {batch}.")
    table_len = num_pages // batch
  else:
    check_array("page_table", page_table, 2, "[B, M]")
    page_table = _check_int("page_table", page_table,
                            (batch, page_table.shape[1]), "[B, M]")
    table_len = page_table.shape[1]
    if table_len == 0:
      raise ValueError("page_table must have at least one entry per row, "
                       f"got shape {tuple(page_table.shape)}.")
  kv_lengths = _check_int("kv_lengths", kv_lengths, (batch,), "[B]")
  q_positions = _check_int("q_positions", q_positions, (batch, q_len),
                           "[B, Sq]")
  if q_valid is not None:
    check_array("q_valid", q_valid, 2, "[B, Sq]")
    if tuple(q_valid.shape) != (batch, q_len):
      raise ValueError(f"q_valid must be [B, Sq] = {(batch, q_len)}, got "
                       f"shape {tuple(q_valid.shape)}.")
    if q_valid.dtype != jnp.bool_:
      raise TypeError(f"q_valid must be boolean, got dtype {q_valid.dtype}.")
  sm_scale = _positive_float("sm_scale", sm_scale)
  softcap = None if softcap is None else _positive_float("softcap", softcap)
  if not isinstance(causal, (bool, np.bool_)):
    raise TypeError(f"causal must be a python bool, got {causal!r}.")
  window = canonical_window(window, bool(causal))
  if precision is not None and not isinstance(precision, lax.Precision):
    precision = lax.Precision(precision)
  if not isinstance(check_overflow, (bool, np.bool_)):
    raise TypeError(f"check_overflow must be a python bool, got "
                    f"{check_overflow!r}.")
  if check_overflow and overflow is not None:
    raise ValueError("pass overflow or check_overflow, not both.")
  _check_table_values(dense_table(batch, table_len) if page_table is None
                      else page_table, kv_lengths, num_pages, page_size,
                      overflow_flagged=check_overflow)
  backend = launch_policy.choose_decode_backend(
      backend, mosaic_reason=mosaic_decode.unsupported_reason(
          dtype=q.dtype, head_dim=head_dim, value_dim=value_dim,
          page_size=page_size, rows=num_heads // num_kv_heads * q_len,
          interpret=bool(interpret), precision=precision),
      triton_fields=any(x is not None for x in
                        (pages_per_block, num_warps, num_stages)),
      mosaic_fields=any(x is not None for x in
                        (block_tokens, stages, producers)),
      interpret=bool(interpret))
  if backend == "mosaic":
    launch = mosaic_decode_launch(
        batch, num_kv_heads, table_len, page_size, head_dim,
        num_splits=num_splits, block_tokens=block_tokens, stages=stages,
        producers=producers)
  else:
    launch = decode_launch(batch, num_kv_heads, table_len, page_size,
                           max(head_dim, value_dim), num_splits=num_splits,
                           pages_per_block=pages_per_block,
                           num_warps=num_warps, num_stages=num_stages)
  st = DecodeStatic(
      sm_scale=sm_scale, softcap=softcap,
      precision=precision, causal=bool(causal), window=window,
      launch=launch, interpret=bool(interpret))
  if sinks is not None:
    sinks = check_sinks(sinks, num_heads)
  if overflow is not None:
    check_array("overflow", overflow, 1, "[B]")
    if tuple(overflow.shape) != (batch,) or overflow.dtype != jnp.bool_:
      raise ValueError(f"overflow must be [B] = ({batch},) bool, got shape "
                       f"{tuple(overflow.shape)} and dtype {overflow.dtype}.")
  kernel_checks = check_overflow and backend == "mosaic" and (
      page_table is None or (window is None and q_valid is None))
  if check_overflow and not kernel_checks:
    overflow = _overflowing_rows(page_table, kv_lengths, key_pages)
  out, lse = _decode(_Config(st, block_sizes, kernel_checks), q, key_pages,
                     value_pages, page_table, kv_lengths, q_positions,
                     q_valid, sinks, overflow)
  return KernelOutput(out, lse, None)


MAX_DECODE_QUERIES = 16  # New tokens per row the decode kernel takes.


def cache_call_reason(inputs: AttentionInputs, dropout) -> str | None:
  """Why a cache call goes to the general flash kernels rather than the
  decode kernel (None: the decode kernel serves it).

  The decode kernel computes the cache-call semantics (kv lengths, the
  queries' positions, causal, window, soft cap, grouped heads) for up to
  `MAX_DECODE_QUERIES` new tokens per row, from a paged cache (`pages`) or
  a dense one (`dense_as_pages`), with power-of-two head and page sizes;
  a bias, a dense mask, dropout or score / mask mods go to the general
  kernels, which compute the same function on the dense view. One
  device's shard of the keys (`inputs.key_shard`) is a dense cache whose
  slots start at the shard's first (`shard_slots`).
  """
  dims, vis = inputs.dims, inputs.visibility
  if dims.q_len > MAX_DECODE_QUERIES:
    return (f"{dims.q_len} new tokens per row (the decode kernel takes up to "
            f"{MAX_DECODE_QUERIES})")
  if (inputs.bias is not None or vis.mask is not None or dropout is not None
      or inputs.mods is not None):
    return "a bias, dense mask, dropout or score / mask mods"
  page_size = (inputs.pages.page_size if inputs.pages is not None else
               math.gcd(dims.kv_len, MAX_PAGE_SIZE))
  return decode_unsupported_reason(dims.head_dim, dims.value_dim, page_size)


def shard_slots(vis, shard_len: int):
  """A key shard's cache call as a call on a cache of its own: `(kv_lengths
  [B], q_positions [B, Sq])` counted from the shard's first slot.

  On a sequence mesh that splits the keys (`sharding/shard.py`), a device
  holds slots `first + arange(L)` of the cache (a contiguous block:
  `vis.kv_indices`), their positions equal to their slots. Shifting the
  lengths and the queries' positions by `first` keeps every key's
  visibility (causal and windows compare positions by their difference):
  the row's tokens in the shard are `clip(length - first, 0, L)`, and a
  query before the shard (a negative position) sees none of it.
  """
  first = vis.kv_indices[0]
  return (jnp.clip(vis.kv_lengths - first, 0, shard_len),
          vis.q_positions - first)


def cache_attention(inputs: AttentionInputs, dropout=None, *,
                    sm_scale: float, softcap: float | None = None,
                    precision=None, block_sizes: BlockSizes | None = None,
                    launch=None, interpret: bool = False) -> KernelOutput:
  """flash on a KV-cache call (the canonical record a module builds from
  its cache): the decode kernel when `cache_call_reason` allows, reading
  `inputs.pages` (a paged cache) or the dense cache in place; else
  `interface.flash_attention` on the record's dense keys. Both compute the
  same function; `launch` (the general kernels' launches) makes the call
  take the general kernels.

  Args:
    inputs: the record: `query [B, Sq, H, D]`, the cache's dense view as
      `key [B, L, Hkv, D]` / `value [B, L, Hkv, Dv]`, its pages (or None),
      and the visibility (kv lengths, query positions = token indices, key
      positions `arange(L)`, causal, window).
    dropout, sm_scale, softcap, precision, block_sizes, interpret: as
      `interface.flash_attention`'s.
    launch: a `LaunchConfig` for the general kernels, or None.

  Returns:
    `KernelOutput(out [B, Sq, H, Dv], lse [B, H, Sq] float32, None)`; NaN
    in the rows of `inputs.overflow` (when given).
  """
  if launch is not None or cache_call_reason(inputs, dropout) is not None:
    result = interface.flash_attention(
        inputs, dropout, sm_scale=sm_scale, softcap=softcap,
        precision=precision, block_sizes=block_sizes, launch=launch,
        interpret=interpret)
    out, lse = poison_overflow(result.out, result.lse, inputs.overflow)
    return result._replace(out=out, lse=lse)
  vis = inputs.visibility
  kv_lengths, q_positions = (shard_slots(vis, inputs.dims.kv_len)
                             if inputs.key_shard else
                             (vis.kv_lengths, vis.q_positions))
  if inputs.pages is not None:
    pages = inputs.pages
    key_pages, value_pages, table = (pages.key_pages, pages.value_pages,
                                     pages.page_table)
  else:
    # The dense cache's pages, without their table: the kernels know it.
    key_pages, value_pages, _ = dense_as_pages(inputs.key, inputs.value)
    table = None
  # The rows of `inputs.overflow` are those `cache_lib.overflowing_rows`
  # finds in the cache's table and lengths, which the decode call receives:
  # it tests them again (in the Mosaic kernel, or fused with its XLA steps),
  # so the write's reduction over the table drops out of the program. A
  # key shard's lengths are the shard's: its flags come as they are.
  check = inputs.overflow is not None and not inputs.key_shard
  return decode_attention(
      inputs.query, key_pages, value_pages, table, kv_lengths,
      q_positions, sm_scale=sm_scale, softcap=softcap, causal=vis.causal,
      window=vis.window, precision=precision, block_sizes=block_sizes,
      interpret=interpret, sinks=inputs.sinks, check_overflow=check,
      overflow=None if check else inputs.overflow)
