"""KV caches for incremental decoding: the dense and the paged one.

Both are pytrees that a call takes as `cache=` and returns updated in
`AttentionOutput.cache`. This module holds what every mechanism does with
them, once:

- `write`: the call's new keys and values go to each row's slots
  `lengths[b] + i` for its `i < q_lengths[b]` new tokens (all `Sq` without
  `q_lengths`), by a scatter that XLA runs in place when the caller donates
  the cache, at indices it is told are unique (so a GPU need not write them
  with atomics); padded query slots write nothing. A row whose new tokens do
  not fit (past `L` in a dense cache; past its pages, or through a page-table
  slot that names no page, in a paged one) is *overflowing*: what does not
  fit is dropped and the module returns NaN for that row (a condition a
  jitted call cannot raise; never silently wrong).
- `dense_view`: the cache as dense `[B, L, Hkv, D]` keys and values
  (a paged cache gathered through its table, `L = max_pages * page_size`),
  for the mechanisms that read dense keys; XLA drops the gather when the
  kernel reads the pages instead (flash's decode kernels).
- `query_slots`: the new queries' positions (their token indices) and
  which query slots hold a token (`q_lengths`).

The paged cache's contract (the caller allocates pages): row `b`'s token `t`
lives in page `page_table[b, t // page_size]`, slot `t % page_size`; rows may
share pages (a common prefix) as long as no call writes into a shared page
(writes go to slots at and after each row's length; two rows writing one
slot break the contract, and which value lands there is undefined, as the
write's scatter is told its indices are unique); a page-table slot no
token reaches is never read; `UNASSIGNED` (-1) marks a slot with no page
(`init_paged_cache` fills the table with it).

Glossary of shapes:
- B: batch size; Sq: new tokens per call (query slots).
- L: tokens per row of a dense cache.
- P: pages in the pool; page_size: tokens per page; max_pages: page-table
  slots per row.
- Hkv: key/value heads; D, Dv: key and value head sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flexible_attention.core.inputs import concrete


UNASSIGNED = -1  # A page-table slot that names no page.
PAGE_ORDERS = ("contiguous", "shuffled")  # `allocate_pages`' orders.


class KVCache(NamedTuple):
  """A dense key/value cache for incremental decoding (a pytree).

  Attributes:
    keys: `[B, L, Hkv, D]` where `L` is the maximum cache length.
    values: `[B, L, Hkv, Dv]`.
    lengths: `[B]` int32, how many slots of each row hold valid entries.
  """

  keys: jax.Array
  values: jax.Array
  lengths: jax.Array

  @property
  def max_length(self) -> int:
    return self.keys.shape[1]


def _check_sizes(function: str, **sizes):
  for name, value in sizes.items():
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{function}: {name} must be a positive int, got "
                       f"{value!r}.")


def init_cache(batch_size: int, max_length: int, num_kv_heads: int,
               head_dim: int, dtype=jnp.float32, *,
               value_dim: int | None = None) -> KVCache:
  """Returns an empty `KVCache` (all lengths zero).

  Args:
    batch_size: B.
    max_length: L, the number of slots per row.
    num_kv_heads: Hkv.
    head_dim: D, the key size.
    dtype: dtype of the stored keys and values.
    value_dim: Dv, the value size (defaults to `head_dim`).

  Returns:
    A `KVCache` with `keys [B, L, Hkv, D]`, `values [B, L, Hkv, Dv]` zeros and
    `lengths [B]` zeros.
  """
  _check_sizes("init_cache", batch_size=batch_size, max_length=max_length,
               num_kv_heads=num_kv_heads, head_dim=head_dim)
  value_dim = head_dim if value_dim is None else value_dim
  return KVCache(
      keys=jnp.zeros((batch_size, max_length, num_kv_heads, head_dim), dtype),
      values=jnp.zeros((batch_size, max_length, num_kv_heads, value_dim),
                       dtype),
      lengths=jnp.zeros((batch_size,), jnp.int32))


class PagedKVCache(NamedTuple):
  """A paged key/value cache (a pytree): a pool of pages and a page table.

  Attributes:
    key_pages: `[P, page_size, Hkv, D]`.
    value_pages: `[P, page_size, Hkv, Dv]`.
    page_table: `[B, max_pages]` int32: row b's token t is in page
      `page_table[b, t // page_size]`, slot `t % page_size`; `UNASSIGNED`
      (-1) where the row has no page.
    lengths: `[B]` int32, how many tokens each row holds.
  """

  key_pages: jax.Array
  value_pages: jax.Array
  page_table: jax.Array
  lengths: jax.Array

  @property
  def page_size(self) -> int:
    return self.key_pages.shape[1]

  @property
  def max_length(self) -> int:
    """L: the tokens a row can reach through its table."""
    return self.page_table.shape[1] * self.page_size


def init_paged_cache(num_pages: int, page_size: int, num_kv_heads: int,
                     head_dim: int, dtype=jnp.float32, *, batch_size: int,
                     max_pages_per_row: int,
                     value_dim: int | None = None) -> PagedKVCache:
  """Returns an empty `PagedKVCache`: zero pages, an unassigned table.

  The caller assigns pages: `cache._replace(page_table=table)` with its
  `[B, max_pages_per_row]` int32 table (the module docstring says how it is
  read).

  Args:
    num_pages: P, the pages in the pool.
    page_size: tokens per page.
    num_kv_heads: Hkv.
    head_dim: D, the key size.
    dtype: dtype of the stored keys and values.
    batch_size: B.
    max_pages_per_row: page-table slots per row.
    value_dim: Dv (default D).

  Returns:
    A `PagedKVCache` with `key_pages [P, page_size, Hkv, D]`, `value_pages
    [P, page_size, Hkv, Dv]` zeros, `page_table [B, max_pages_per_row]` all
    `UNASSIGNED` and `lengths [B]` zeros.
  """
  _check_sizes("init_paged_cache", num_pages=num_pages, page_size=page_size,
               num_kv_heads=num_kv_heads, head_dim=head_dim,
               batch_size=batch_size, max_pages_per_row=max_pages_per_row)
  value_dim = head_dim if value_dim is None else value_dim
  return PagedKVCache(
      key_pages=jnp.zeros((num_pages, page_size, num_kv_heads, head_dim),
                          dtype),
      value_pages=jnp.zeros((num_pages, page_size, num_kv_heads, value_dim),
                            dtype),
      page_table=jnp.full((batch_size, max_pages_per_row), UNASSIGNED,
                          jnp.int32),
      lengths=jnp.zeros((batch_size,), jnp.int32))


def allocate_pages(batch_size: int, pages_per_row: int, *,
                   order: str = "shuffled", seed: int = 0) -> np.ndarray:
  """A simple page table giving each row its own `pages_per_row` pages (for
  tests, benchmarks and the generation job; a server allocates its own).

  Args:
    batch_size: B.
    pages_per_row: pages each row gets.
    order: `"contiguous"` (row b holds pages `b * pages_per_row + i`) or
      `"shuffled"` (a random permutation of the pool's pages).
    seed: the shuffle's seed.

  Returns:
    `[B, pages_per_row]` int32 page ids, all distinct, in
    `[0, B * pages_per_row)`.
  """
  if order not in PAGE_ORDERS:
    raise ValueError(f"order must be one of {PAGE_ORDERS}, got {order!r}.")
  pages = np.arange(batch_size * pages_per_row, dtype=np.int32)
  if order == "shuffled":
    pages = np.random.default_rng(seed).permutation(pages)
  return pages.reshape(batch_size, pages_per_row)


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def check(cache, query, key, value, q_lengths=None):
  """Raises `TypeError` / `ValueError` unless `cache` can take the call's
  `query [B, Sq, H, D]` and new `key [B, Sq, Hkv, D]` and `value [B, Sq,
  Hkv, Dv]` (same dtype, shapes that match), its lengths are `[B]` ints
  (at least 0 where known at trace time) and `q_lengths` is `[B]` ints (in
  `[0, Sq]` where known)."""
  if not isinstance(cache, (KVCache, PagedKVCache)):
    raise TypeError("cache must be a fa.KVCache or fa.PagedKVCache, got "
                    f"{type(cache)}.")
  for name, x in (("query", query), ("key", key), ("value", value)):
    if len(_shape(x)) != 4:
      raise ValueError(f"{name} must have rank 4, got shape {_shape(x)}.")
  batch, new_len = _shape(key)[:2]
  if _shape(query)[:2] != (batch, new_len) or _shape(value)[:2] != (
      batch, new_len):
    raise ValueError(
        "with a KV cache, query, key and value hold the same new tokens of "
        f"the same rows: got query {_shape(query)}, key {_shape(key)}, value "
        f"{_shape(value)}.")
  heads = _shape(key)[2:]
  if isinstance(cache, KVCache):
    stores = (("cache.keys", cache.keys, key, "[B, L, Hkv, D]"),
              ("cache.values", cache.values, value, "[B, L, Hkv, Dv]"))
    for name, buf, new, form in stores:
      want = (batch, cache.max_length) + _shape(new)[2:]
      if _shape(buf) != want:
        raise ValueError(f"{name} must be {form} = {want}, got "
                         f"{_shape(buf)}.")
  else:
    stores = (("cache.key_pages", cache.key_pages, key,
               "[P, page_size, Hkv, D]"),
              ("cache.value_pages", cache.value_pages, value,
               "[P, page_size, Hkv, Dv]"))
    pages, page_size = _shape(cache.key_pages)[:2]
    for name, buf, new, form in stores:
      want = (pages, page_size) + _shape(new)[2:]
      if _shape(buf) != want:
        raise ValueError(f"{name} must be {form} = {want} (keys {heads}), "
                         f"got {_shape(buf)}.")
    table = cache.page_table
    if len(_shape(table)) != 2 or _shape(table)[0] != batch:
      raise ValueError(f"cache.page_table must be [B, max_pages] with B = "
                       f"{batch}, got {_shape(table)}.")
    _check_ints("cache.page_table", table)
  for name, buf, new, _ in stores:
    if jnp.dtype(buf.dtype) != jnp.dtype(new.dtype):
      raise TypeError(f"{name} holds {jnp.dtype(buf.dtype)}, the call's new "
                      f"entries are {jnp.dtype(new.dtype)}: cast one to the "
                      "other (a cache keeps one dtype).")
  if _shape(cache.lengths) != (batch,):
    raise ValueError(f"cache.lengths must be [B] = ({batch},), got "
                     f"{_shape(cache.lengths)}.")
  _check_ints("cache.lengths", cache.lengths)
  known = concrete(cache.lengths)
  if known is not None and known.min(initial=0) < 0:
    raise ValueError(f"cache.lengths must be >= 0 (tokens a row holds), got "
                     f"{known.tolist()}.")
  if new_len > cache.max_length:
    raise ValueError(f"{new_len} new tokens do not fit a cache of length "
                     f"{cache.max_length}.")
  if q_lengths is not None:
    if _shape(q_lengths) != (batch,):
      raise ValueError(f"q_lengths must be [B] = ({batch},), got "
                       f"{_shape(q_lengths)}.")
    _check_ints("q_lengths", q_lengths)
    known = concrete(q_lengths)
    if known is not None and (known.min() < 0 or known.max() > new_len):
      raise ValueError(f"q_lengths must be in [0, Sq = {new_len}], got "
                       f"{known.tolist()}.")


def _check_ints(name: str, x):
  dtype = jnp.asarray(x).dtype
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"{name} must hold ints, got {dtype}.")


def query_slots(cache, new_len: int, q_lengths=None):
  """`(q_positions [B, Sq] int32, q_valid [B, Sq] bool)`: slot i of row b
  holds the token `lengths[b] + i`, and a token only for `i <
  q_lengths[b]` (every slot without `q_lengths`)."""
  lengths = jnp.asarray(cache.lengths, jnp.int32)
  slots = jnp.arange(new_len, dtype=jnp.int32)
  q_positions = lengths[:, None] + slots
  if q_lengths is None:
    return q_positions, jnp.ones(q_positions.shape, bool)
  return q_positions, slots[None, :] < jnp.asarray(q_lengths, jnp.int32)[:,
                                                                         None]


def write(cache, key, value, q_lengths=None):
  """Writes the new tokens at each row's length (module docstring).

  Args:
    cache: a `KVCache` or `PagedKVCache` (checked by `check`).
    key: `[B, Sq, Hkv, D]`, the new keys.
    value: `[B, Sq, Hkv, Dv]`, the new values.
    q_lengths: `[B]` new tokens per row (default Sq).

  Returns:
    `(new_cache, overflow [B] bool)`: the cache with the tokens written and
    `lengths + q_lengths`, and the rows that hold more tokens than fit (now
    or on an earlier call: past `L`, or through a page-table slot that
    names no page).
  """
  batch, new_len = key.shape[:2]
  positions, valid = query_slots(cache, new_len, q_lengths)  # [B, Sq]
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], positions.shape)
  # Tokens per row: `q_lengths` clipped to the slots (the count of `valid`,
  # without a reduction over it).
  count = (new_len if q_lengths is None else
           jnp.clip(jnp.asarray(q_lengths, jnp.int32), 0, new_len))
  new_lengths = cache.lengths.astype(jnp.int32) + count
  # Every scatter index is unique (a dropped slot gets an index of its own
  # past the end), so XLA may write the slots in parallel, without atomics.
  dropped = jnp.arange(batch * new_len, dtype=jnp.int32).reshape(batch,
                                                                 new_len)

  def scatter(buffer, index, x):
    """`buffer.at[index].set(x)`, `index` `([B, Sq], [B, Sq])`, `x` `[B,
    Sq, ...]`, out-of-range slots dropped."""
    index = tuple(i.reshape(-1) for i in index)
    x = x.reshape((-1,) + x.shape[2:])
    if x.shape[0] == 1:
      # XLA (jax 0.10.2 and 0.11.2) rewrites a scatter of one update as a
      # dynamic-update-slice, and once the buffer is sharded over the slots
      # (a sequence mesh) a device whose shard does not hold the slot
      # writes another slot's token into its last slot. A second update,
      # dropped, keeps it a scatter (`tests/test_context_parallel.py -k
      # one_token`).
      index = tuple(jnp.append(i, buffer.shape[n] + 1)  # Past any index.
                    for n, i in enumerate(index))
      x = jnp.concatenate([x, jnp.zeros_like(x)])
    return buffer.at[index].set(x, mode="drop", unique_indices=True)
  paged = isinstance(cache, PagedKVCache)
  if not paged:
    fits = positions < cache.max_length
    # Out of range (from L on) means dropped: padded slots and overflow
    # write nothing.
    slot = jnp.where(valid & fits, positions, cache.max_length + dropped)
    new_cache = KVCache(scatter(cache.keys, (rows, slot), key),
                        scatter(cache.values, (rows, slot), value),
                        new_lengths)
  else:
    pages, page_size = cache.key_pages.shape[:2]
    max_pages = cache.page_table.shape[1]
    index = positions // page_size
    page = jnp.take_along_axis(cache.page_table.astype(jnp.int32),
                               jnp.minimum(index, max_pages - 1), axis=1)
    fits = (index < max_pages) & (page >= 0) & (page < pages)
    # Dropped: from page P on. Rows write no shared page (the contract).
    page = jnp.where(valid & fits, page, pages + dropped)
    slot = positions % page_size
    new_cache = PagedKVCache(
        scatter(cache.key_pages, (page, slot), key),
        scatter(cache.value_pages, (page, slot), value),
        cache.page_table, new_lengths)
  return new_cache, overflowing_rows(
      new_lengths, max_pages * page_size if paged else cache.max_length,
      cache.page_table if paged else None, pages if paged else None)


def overflowing_rows(lengths, capacity: int, page_table=None,
                     num_pages: int | None = None):
  """The rows that hold more tokens than their cache fits (`[B]` bool).

  The one definition of an overflowing row (module docstring), for the
  cache write and for a kernel that tests it itself (flash's decode
  kernel): more than `capacity` tokens (which covers every new token past
  the end), or, in a paged cache, a token in a page-table slot that names
  no page (which covers every new token that met one). Either way the row
  stays flagged on every later call, new tokens or not: its cache lost
  tokens. One elementwise test and, paged, one reduction over the table,
  which XLA fuses with the lengths' add.

  Args:
    lengths: `[B]` ints, the rows' token counts after the write.
    capacity: tokens a row fits: `L`, or, paged, `max_pages * page_size`
      (the page size is `capacity // max_pages`).
    page_table: `[B, max_pages]` ints, or None for a dense cache.
    num_pages: P, the pages of the pool (with `page_table`).

  Returns:
    `[B]` bool.
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  overflow = lengths > capacity
  if page_table is not None:
    table = jnp.asarray(page_table, jnp.int32)
    max_pages = table.shape[1]
    page_size = capacity // max_pages
    needed = (jnp.arange(max_pages) * page_size)[None, :] < lengths[:, None]
    overflow |= jnp.any(needed & ((table < 0) | (table >= num_pages)),
                        axis=1)
  return overflow


def dense_view(cache) -> tuple[jax.Array, jax.Array]:
  """The cache as `(keys [B, L, Hkv, D], values [B, L, Hkv, Dv])`.

  A paged cache is gathered through its table (`L = max_pages *
  page_size`); an unassigned slot reads page 0 (only past a row's length,
  or in a row `write` flags as overflowing).
  """
  if isinstance(cache, KVCache):
    return cache.keys, cache.values
  batch, max_pages = cache.page_table.shape
  pages = jnp.clip(cache.page_table.astype(jnp.int32), 0,
                   cache.key_pages.shape[0] - 1)

  def gather(store):  # [P, ps, Hkv, X] -> [B, max_pages * ps, Hkv, X]
    return store[pages].reshape((batch, max_pages * store.shape[1]) +
                                store.shape[2:])

  return gather(cache.key_pages), gather(cache.value_pages)
