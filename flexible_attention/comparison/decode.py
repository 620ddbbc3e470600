"""The decode benchmark: one decoding call against a full KV cache.

`run_decode_benchmark(config)` (called by `scripts/benchmark.py` for
`--config=configs/benchmark.py:decode`) times the call a decoding loop makes:
`new_tokens` queries (1, or a few for speculative verification) whose keys
and values are appended to a cache of `L - new_tokens` tokens per row, so that
they attend to L tokens. A cell is (B, L, H/Hkv, D, dtype, cache kind, new
tokens); the cache kinds are `dense` (`fa.KVCache`) and `paged<size>`
(`fa.PagedKVCache` of that page size, each row's pages a random permutation
of the pool, `allocate_pages`).

Each row is one program `(cache, q, k, v) -> (out, cache)` jitted with the
cache donated and fed back (`donate_argnums`), so the in-place write of the
new keys and values is what is timed, as in a decoding loop; it returns the
cache with the lengths it was given, so every call sees the same state. The
rows:
- a registered mechanism (`create_attention(...)(q, k, v, cache=cache,
  causal=True)` inside `hk.transform`);
- `xla_decode`, the hand-written XLA baseline: the new keys and values
  scattered into the cache, an einsum of q against the whole cache (a paged
  cache gathered through its table first), a length mask, softmax, an einsum
  with V.

Each row's output is checked against the float32 reference of the cell
(computed from the cell's arrays, a few rows at a time) and its cache write
read back (the new keys and values at each row's slots) before any row is
timed; the rows that pass are timed together with those of the cells that
differ only in the cache kind (`timing.median_seconds_each`, round-robin,
median of `repeats`: paged against dense under the same device drifts;
each cell apart where their caches do not fit in memory together, and each
row's `timed_with` names the cells it was timed with), each as
`calls_per_program` calls inside one jitted loop (`looped`: a decoding
loop's `lax.fori_loop`, the cache carried, each call's queries depending on
the previous output), the time divided by the calls; with 1, one program
dispatch per call, whose host-side dispatch can take longer than a small
call's device time (an H200 trace of B = 8, L = 4k: 44 us of kernels in
51-61 us per dispatched call, `benchmarks/decode_trace.py`). A row reports microseconds per call, the
bytes of K and V the call must read (`2 * B * L * Hkv * D * itemsize`) over
its time in TB/s, and that as a fraction of the card's peak HBM bandwidth
(`PEAK_HBM_TBPS`; none for an unknown card). A cell whose cache does not fit
`memory_fraction` of the device's memory (`bytes_limit`) is skipped, and so is
a row whose compiled program would not.

Glossary of shapes:
- B: batch size; L: tokens per row the call attends to; n: new tokens.
- H, Hkv: query and key/value heads; D: head size.
- P: pages in a paged cache's pool; page_size: tokens per page.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
import haiku as hk
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from flexible_attention import timing
from flexible_attention.comparison import report
from flexible_attention.comparison.cells import config_names
from flexible_attention.comparison.compare import TOLERANCE
from flexible_attention.comparison.compare import format_table
from flexible_attention.comparison.compare import format_value
from flexible_attention.comparison.compare import relative_error
from flexible_attention.core.cache import KVCache
from flexible_attention.core.cache import PagedKVCache
from flexible_attention.core.cache import allocate_pages
from flexible_attention.core.inputs import canonicalize
from flexible_attention.core.reference import reference_attention
from flexible_attention.mechanisms import registry

# Peak HBM bandwidth in TB/s, by a substring of `device.device_kind`.
PEAK_HBM_TBPS = (("H200", 4.8), ("H100 80GB HBM3", 3.35), ("H100 SXM", 3.35))

BASELINES = ("xla_decode",)


def peak_bandwidth_tbps(device_kind: str) -> float | None:
  """The card's peak HBM bandwidth in TB/s, or None when unknown."""
  for name, tbps in PEAK_HBM_TBPS:
    if name in device_kind:
      return tbps
  return None


def page_size_of(cache_kind: str) -> int | None:
  """`None` for `"dense"`, the page size for `"paged<size>"`."""
  if cache_kind == "dense":
    return None
  if cache_kind.startswith("paged") and cache_kind[5:].isdigit():
    return int(cache_kind[5:])
  raise ValueError(f"a cache kind is 'dense' or 'paged<page size>', got "
                   f"{cache_kind!r}.")


def _tokens(n: int) -> str:
  return f"{n // 1024}k" if n % 1024 == 0 else str(n)


@dataclasses.dataclass(frozen=True)
class DecodeCell:
  """One decoding problem: a cache of L tokens per row after the call."""

  batch: int
  length: int  # L: the call's keys, new tokens included.
  num_heads: int
  num_kv_heads: int
  head_dim: int
  dtype: str
  cache: str  # "dense" or "paged<page size>".
  new_tokens: int

  @property
  def page_size(self) -> int | None:
    return page_size_of(self.cache)

  @property
  def pages_per_row(self) -> int:
    return -(-self.length // self.page_size)

  @property
  def name(self) -> str:
    return (f"B{self.batch} L{_tokens(self.length)} H{self.num_heads}/"
            f"{self.num_kv_heads} D{self.head_dim} {self.cache} "
            f"new{self.new_tokens}")

  @property
  def kv_bytes(self) -> int:
    """The K and V bytes a call must read: `2 * B * L * Hkv * D * size`."""
    return (2 * self.batch * self.length * self.num_kv_heads * self.head_dim *
            jnp.dtype(self.dtype).itemsize)

  @property
  def cache_bytes(self) -> int:
    """The cache's buffers (a paged pool rounds rows up to whole pages)."""
    if self.page_size is None:
      return self.kv_bytes
    return self.kv_bytes * self.pages_per_row * self.page_size // self.length


def decode_cells(config) -> list[DecodeCell]:
  """The cells of a decode config: every combination of its lists."""
  return [DecodeCell(batch=b, length=length, num_heads=h, num_kv_heads=hkv,
                     head_dim=d, dtype=config.dtype, cache=kind,
                     new_tokens=n)
          for (h, hkv), d, b, length, kind, n in itertools.product(
              config.decode_heads, config.decode_head_dims,
              config.decode_batches, config.decode_lengths,
              config_names(config.decode_caches), config.decode_new_tokens)]


@dataclasses.dataclass
class DecodeRow:
  """One (row, cell) measurement of the decode benchmark."""

  mechanism: str
  cell: str
  status: str
  batch: int = 0
  length: int = 0
  num_heads: int = 0
  num_kv_heads: int = 0
  head_dim: int = 0
  cache: str = ""
  new_tokens: int = 0
  served_by: str | None = None
  out_error: float | None = None
  compile_seconds: float | None = None
  microseconds: float | None = None
  kv_bytes: int | None = None
  tb_per_second: float | None = None
  fraction_of_peak: float | None = None
  # The cells whose rows were timed round-robin with this one (its own
  # included): `benchmark_decode_cells`.
  timed_with: list[str] | None = None


# --- The cell's arrays -------------------------------------------------------


def _random(seed: int, shape, dtype):
  """Standard normal `shape` in `dtype`: from numpy when small (no compile),
  else made on the device a slice of the leading axis at a time (so a large
  cache never needs a float32 copy of itself)."""
  size = int(np.prod(shape))
  if size <= 1 << 22:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(
        shape, np.float32), dtype)
  per_slice = size // shape[0]
  make = lambda k: jax.random.normal(k, shape[1:], jnp.float32).astype(dtype)
  batch_size = max(1, min(shape[0], (1 << 26) // max(per_slice, 1)))
  keys = jax.random.split(jax.random.PRNGKey(seed), shape[0])
  return jax.jit(lambda keys: jax.lax.map(make, keys, batch_size=batch_size))(
      keys)


def cell_inputs(cell: DecodeCell, *, seed: int = 0,
                page_order: str = "shuffled"):
  """`(cache, q, k, v)` of a cell, on the device.

  The cache holds `L - n` random tokens per row (all slots random; a paged
  row's pages from `allocate_pages`); `q [B, n, H, D]`, `k, v [B, n, Hkv,
  D]` are the call's new tokens.
  """
  dtype = jnp.dtype(cell.dtype)
  kq, kk, kv, kck, kcv = (seed * 5 + i for i in range(5))
  b, n, hkv, d = cell.batch, cell.new_tokens, cell.num_kv_heads, cell.head_dim
  q = _random(kq, (b, n, cell.num_heads, d), dtype)
  k, v = _random(kk, (b, n, hkv, d), dtype), _random(kv, (b, n, hkv, d), dtype)
  lengths = jnp.full((b,), cell.length - n, jnp.int32)
  if cell.page_size is None:
    cache = KVCache(_random(kck, (b, cell.length, hkv, d), dtype),
                    _random(kcv, (b, cell.length, hkv, d), dtype), lengths)
  else:
    pages = (b * cell.pages_per_row, cell.page_size, hkv, d)
    table = allocate_pages(b, cell.pages_per_row, order=page_order, seed=seed)
    cache = PagedKVCache(_random(kck, pages, dtype), _random(kcv, pages, dtype),
                         jnp.asarray(table), lengths)
  return cache, q, k, v


def _dense_rows(cache, rows: slice, length: int):
  """Keys and values `[rows, L, Hkv, D]` of some rows of either cache."""
  if isinstance(cache, KVCache):
    return cache.keys[rows], cache.values[rows]
  table = cache.page_table[rows]
  gather = lambda pages: pages[table].reshape(
      (table.shape[0], -1) + pages.shape[2:])[:, :length]
  return gather(cache.key_pages), gather(cache.value_pages)


def _slots(cache, positions):
  """The keys and values `[B, n, Hkv, D]` at `positions [B, n]`."""
  if isinstance(cache, KVCache):
    rows = jnp.arange(positions.shape[0])[:, None]
    return cache.keys[rows, positions], cache.values[rows, positions]
  page_size = cache.key_pages.shape[1]
  page = jnp.take_along_axis(cache.page_table, positions // page_size, axis=1)
  slot = positions % page_size
  return cache.key_pages[page, slot], cache.value_pages[page, slot]


def reference_output(cell: DecodeCell, cache, q, k, v) -> np.ndarray:
  """The float32 reference output `[B, n, H, D]` of the call, computed a
  few rows at a time from the cache before the call and the new tokens."""
  per_row = cell.length * cell.num_kv_heads * cell.head_dim
  step = max(1, (1 << 27) // per_row)
  n = cell.new_tokens

  @jax.jit
  def rows_out(keys, values, q, k, v):
    f32 = lambda x: x.astype(jnp.float32)
    keys = f32(keys).at[:, -n:].set(f32(k))
    values = f32(values).at[:, -n:].set(f32(v))
    inputs = canonicalize(f32(q), keys, values, causal=True)
    return reference_attention(inputs.query, inputs.key, inputs.value,
                               inputs.bias, inputs.visibility,
                               sm_scale=cell.head_dim**-0.5).out

  outs = []
  for start in range(0, cell.batch, step):
    rows = slice(start, min(start + step, cell.batch))
    keys, values = _dense_rows(cache, rows, cell.length)
    outs.append(np.asarray(rows_out(keys, values, q[rows], k[rows], v[rows])))
  return np.concatenate(outs)


# --- What a row runs ---------------------------------------------------------


def xla_decode(cache, q, k, v, *, sm_scale: float):
  """The hand-written XLA decode: write, gather (paged), einsum, mask,
  softmax, einsum.

  Args:
    cache: a `KVCache` or `PagedKVCache`.
    q: `[B, n, H, D]`; k, v: `[B, n, Hkv, D]`, the new tokens.
    sm_scale: the logits' scale.

  Returns:
    `(out [B, n, H, D], the cache with the new tokens and lengths)`.
  """
  batch, n, heads, dim = q.shape
  kv_heads = k.shape[2]
  positions = cache.lengths[:, None] + jnp.arange(n, dtype=jnp.int32)  # [B, n]
  if isinstance(cache, KVCache):
    rows = jnp.arange(batch)[:, None]
    keys = cache.keys.at[rows, positions].set(k)
    values = cache.values.at[rows, positions].set(v)
    new_cache = KVCache(keys, values, cache.lengths + n)
  else:
    page_size = cache.key_pages.shape[1]
    page = jnp.take_along_axis(cache.page_table, positions // page_size, 1)
    slot = positions % page_size
    key_pages = cache.key_pages.at[page, slot].set(k)
    value_pages = cache.value_pages.at[page, slot].set(v)
    new_cache = PagedKVCache(key_pages, value_pages, cache.page_table,
                             cache.lengths + n)
    keys, values = _dense_rows(new_cache, slice(None),
                               cache.page_table.shape[1] * page_size)
  length = keys.shape[1]
  qg = q.reshape(batch, n, kv_heads, heads // kv_heads, dim)
  logits = jnp.einsum("bnkgd,blkd->bkgnl", qg, keys,
                      preferred_element_type=jnp.float32) * sm_scale
  visible = jnp.arange(length)[None, None, :] <= positions[:, :, None]
  logits = jnp.where(visible[:, None, None], logits, -jnp.inf)  # [B,K,G,n,L]
  probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
  out = jnp.einsum("bkgnl,blkd->bnkgd", probs, values,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, n, heads, dim).astype(q.dtype), new_cache


def step_fn(name: str, cell: DecodeCell, *, options=None,
            served: list[str] | None = None) -> Callable:
  """The program a row times: `(cache, q, k, v) -> (out, cache)`, the cache
  returned with the lengths it came with (every call sees one state).

  Args:
    name: a registered mechanism or a baseline of `BASELINES`.
    cell: the problem.
    options: the mechanism's module options (e.g. `interpret`).
    served: a list to which tracing appends the mechanism that ran.
  """
  if name == "xla_decode":
    def step(cache, q, k, v):
      out, new = xla_decode(cache, q, k, v, sm_scale=cell.head_dim**-0.5)
      return out, new._replace(lengths=cache.lengths)
    return step
  if name in BASELINES:
    raise ValueError(f"unknown baseline {name!r}")

  def forward(cache, q, k, v):
    attention = registry.create_attention(
        name, num_heads=cell.num_heads, head_dim=cell.head_dim,
        num_kv_heads=cell.num_kv_heads, **(options or {}))
    result = attention(q, k, v, cache=cache, causal=True)
    if served is not None:
      served.append(attention.selected_mechanism)
    return (result.attention_outputs,
            result.cache._replace(lengths=cache.lengths))

  apply = hk.without_apply_rng(hk.transform(forward)).apply
  return lambda cache, q, k, v: apply({}, cache, q, k, v)


def looped(step: Callable, calls: int) -> Callable:
  """`step` run `calls` times in one program, as a jitted decoding loop runs
  it (`lax.fori_loop`, the cache carried): `(cache, q, k, v) -> (out,
  cache)` of the last call. Each call's queries depend on the previous
  call's output (`q + 0 * out`, which XLA does not fold for floats), so no
  part of a call is hoisted out of the loop."""
  def program(cache, q, k, v):
    def body(_, carry):
      cache, out = carry
      out, cache = step(cache, q + 0 * out.astype(q.dtype), k, v)
      return cache, out
    cache, out = lax.fori_loop(0, calls, body, (cache, jnp.zeros_like(q)))
    return out, cache
  return program


class FedBack:
  """A jitted `(cache, *args) -> (out, cache)` with its cache fed back:
  each call runs it on the holder's cache, keeps the returned cache there
  and returns the output (for `timing.median_seconds_each`)."""

  def __init__(self, holder: dict[str, Any], fn: Callable, *args):
    self.holder, self.fn, self.args = holder, fn, args

  def __call__(self):
    out, self.holder["cache"] = self.fn(self.holder["cache"], *self.args)
    return out


# --- Check, then time --------------------------------------------------------


def _available_bytes() -> int | None:
  device = jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except (NotImplementedError, RuntimeError):
    stats = {}
  if "bytes_limit" in stats:
    return stats["bytes_limit"]
  if device.platform == "cpu":
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
      return None
  return None


def _error(e: Exception) -> str:
  return f"error: {type(e).__name__}: {str(e)[:300]}"


def _mechanism_options(config, name: str) -> dict[str, Any]:
  interpret = config.get("interpret")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if interpret and name in ("flash", "splash"):
    return {"interpret": True}
  return {}


def benchmark_decode_cells(names: Sequence[str], config,
                           cells: Sequence[DecodeCell]) -> list[DecodeRow]:
  """Checks each of `names` on each of `cells`, then times every checked
  row of every cell together: one row per (cell, name), cell by cell.

  The cells are the ones whose ratios a target compares
  (`run_decode_benchmark` passes those that differ only in the cache kind):
  timed round-robin in one `timing.median_seconds_each`, each sample of a
  paged row has a dense one beside it, under the same device drifts. Every
  cell's cache stays on the device until the timing ends, so a row is
  skipped when its program and the other cells' caches do not fit
  `memory_fraction` of the device's memory together (a cell whose own cache
  does not fit is skipped whole). A timed row's `timed_with` names the
  cells that had rows in its timing.
  """
  available = _available_bytes()
  budget = None if available is None else config.memory_fraction * available
  group_bytes = sum(cell.cache_bytes for cell in cells)
  all_rows, timed = [], []
  for cell in cells:
    rows, checked = _checked_programs(
        names, config, cell, available, budget,
        others=group_bytes - cell.cache_bytes)
    all_rows.extend(rows)
    timed.extend((row, cell, program) for row, program in checked)
  if not timed:
    return all_rows
  calls = config.calls_per_program
  try:
    seconds = timing.median_seconds_each(
        [(program, ()) for _, _, program in timed], repeats=config.repeats,
        warmup=2)
  except Exception as e:  # pylint: disable=broad-except
    for row, _, _ in timed:
      row.status = _error(e)
    return all_rows
  peak = peak_bandwidth_tbps(jax.devices()[0].device_kind)
  together = list(dict.fromkeys(cell.name for _, cell, _ in timed))
  for (row, cell, _), s in zip(timed, seconds):
    s /= calls
    row.microseconds = 1e6 * s
    row.tb_per_second = cell.kv_bytes / s / 1e12
    row.timed_with = together
    if peak:
      row.fraction_of_peak = row.tb_per_second / peak
  return all_rows


def benchmark_decode_cell(names: Sequence[str], config,
                          cell: DecodeCell) -> list[DecodeRow]:
  """Checks, then times each of `names` on `cell`; one row per name."""
  return benchmark_decode_cells(names, config, [cell])


def _checked_programs(names, config, cell: DecodeCell, available, budget,
                      others: int):
  """`(rows, checked)`: a row per name with its status, and `(row, program)`
  for each row that passed its check: `program()` runs the row's timed
  program (`calls_per_program` calls) on the cell's cache, fed back.
  `others`: bytes of the other caches kept on the device meanwhile."""
  rows = [DecodeRow(mechanism=name, cell=cell.name, status="ok",
                    batch=cell.batch, length=cell.length,
                    num_heads=cell.num_heads, num_kv_heads=cell.num_kv_heads,
                    head_dim=cell.head_dim, cache=cell.cache,
                    new_tokens=cell.new_tokens, kv_bytes=cell.kv_bytes)
          for name in names]
  if budget is not None and cell.cache_bytes > budget:
    for row in rows:
      row.status = (f"skipped: the cache needs {cell.cache_bytes / 2**30:.1f}"
                    f" GiB, the device has {available / 2**30:.1f} GiB")
    return rows, []
  build = lambda: cell_inputs(cell, seed=config.seed,
                              page_order=config.page_order)
  cache, q, k, v = build()
  reference = reference_output(cell, cache, q, k, v)
  positions = cache.lengths[:, None] + jnp.arange(cell.new_tokens)
  tolerance = TOLERANCE[jnp.dtype(cell.dtype).name]
  holder = {"cache": cache}
  checked = []
  for row in rows:
    served = []
    try:
      start = time.perf_counter()
      lowered = jax.jit(step_fn(row.mechanism, cell,
                                options=_mechanism_options(config,
                                                           row.mechanism),
                                served=served),
                        donate_argnums=(0,)).lower(holder["cache"], q, k, v)
      compiled = lowered.compile()
      row.compile_seconds = time.perf_counter() - start
    except NotImplementedError as e:
      row.status = f"unsupported: {e}"
      continue
    except Exception as e:  # pylint: disable=broad-except
      row.status = _error(e)
      continue
    row.served_by = served[-1] if served else None
    needed = _program_bytes(compiled)
    if budget is not None and needed is not None and needed + others > budget:
      row.status = (f"skipped: needs {needed / 2**30:.1f} GiB beside the "
                    f"other timed caches' {others / 2**30:.1f}, the device "
                    f"has {available / 2**30:.1f} GiB")
      continue
    try:
      out, holder["cache"] = compiled(holder["cache"], q, k, v)
      row.out_error = relative_error(out, reference)
      wrote = bool(_wrote(holder["cache"], positions, k, v))
    except Exception as e:  # pylint: disable=broad-except
      row.status = _error(e)
      holder["cache"] = build()[0]  # The donated cache may be gone.
      continue
    if not wrote:
      row.status = ("error: the cache does not hold the new keys and values "
                    "at each row's slots afterwards; not timed")
      holder["cache"] = build()[0]
    elif not (np.isfinite(row.out_error) and row.out_error <= tolerance):
      row.status = (f"error: differs from the reference (relative error "
                    f"{row.out_error:.1e} > {tolerance:.0e}); not timed")
    else:
      checked.append((row, compiled))
  calls = config.calls_per_program
  programs = []
  for row, compiled in checked:
    if calls > 1:  # The checked step, `calls` times in one program.
      try:
        compiled = jax.jit(looped(step_fn(
            row.mechanism, cell, options=_mechanism_options(
                config, row.mechanism)), calls), donate_argnums=(0,)).lower(
                    holder["cache"], q, k, v).compile()
      except Exception as e:  # pylint: disable=broad-except
        row.status = _error(e)
        continue
    programs.append((row, FedBack(holder, compiled, q, k, v)))
  return rows, programs


@jax.jit
def _wrote(cache, positions, k, v) -> jax.Array:
  """Whether `cache` holds `k`, `v` at `positions [B, n]` and the lengths
  it held before the call (`positions[:, 0]`)."""
  keys, values = _slots(cache, positions)
  return (jnp.array_equal(keys, k) & jnp.array_equal(values, v) &
          jnp.array_equal(cache.lengths, positions[:, 0]))


def _program_bytes(compiled) -> int | None:
  """Temporaries and arguments of a compiled program (its outputs alias
  the donated cache)."""
  try:
    analysis = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if analysis is None:
    return None
  return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes)


# --- The run and its report ---------------------------------------------------


def timing_groups(cells: Sequence[DecodeCell],
                  budget: float | None) -> list[list[DecodeCell]]:
  """The cells timed together: those that differ only in the cache kind
  (dense against paged is a target), in the order of `cells`; one by one
  where their caches do not fit `budget` bytes together."""
  groups = {}
  for cell in cells:
    groups.setdefault(dataclasses.replace(cell, cache=""), []).append(cell)
  out = []
  for group in groups.values():
    if budget is None or sum(cell.cache_bytes for cell in group) <= budget:
      out.append(group)
    else:
      out.extend([cell] for cell in group)
  return out


def run_decode_benchmark(config) -> list[DecodeRow]:
  """Runs the decode variant of configs/benchmark.py; writes JSON (after
  every group of cells) and logs a table; returns the rows."""
  device = jax.devices()[0]
  peak = peak_bandwidth_tbps(device.device_kind)
  logging.info("Decode benchmark on %s (%s, peak %s TB/s), jax %s",
               device.device_kind, jax.default_backend(), peak,
               jax.__version__)
  names = config_names(config.mechanisms) + config_names(config.baselines)
  available = _available_bytes()
  groups = timing_groups(decode_cells(config), None if available is None
                         else config.memory_fraction * available)
  rows = []
  path = None
  for i, group in enumerate(groups):
    start = time.perf_counter()
    group_rows = benchmark_decode_cells(names, config, group)
    logging.info("Cells %d/%d %s (%.1f s):\n%s", i + 1, len(groups),
                 ", ".join(cell.name for cell in group),
                 time.perf_counter() - start, table(group_rows))
    rows.extend(group_rows)
    path = write_json(config, rows)
  logging.info("Decode results:\n%s", table(rows))
  logging.info("Wrote %s", path)
  return rows


def table(rows: Sequence[DecodeRow]) -> str:
  """A fixed-width table: time, K/V read rate and share of the peak."""
  fmt = format_value
  lines = [("cell", "row", "status", "out err", "us", "TB/s", "% peak")]
  for r in rows:
    status = r.status if len(r.status) <= 40 else r.status[:37] + "..."
    name = r.mechanism + (f" ({r.served_by})" if r.served_by and
                          r.served_by != r.mechanism else "")
    lines.append((r.cell, name, status, fmt(r.out_error, "{:.1e}"),
                  fmt(r.microseconds, "{:.1f}"),
                  fmt(r.tb_per_second, "{:.3f}"),
                  fmt(None if r.fraction_of_peak is None else
                      100 * r.fraction_of_peak, "{:.0f}")))
  return format_table(lines)


def write_json(config, rows: Sequence[DecodeRow]) -> str:
  """Writes the rows so far with the machine and config; returns the path
  (`report.output_path`)."""
  path = report.output_path(config)
  environment = report.environment()
  environment["peak_hbm_tbps"] = peak_bandwidth_tbps(
      environment["device_kind"])
  with open(path, "w") as f:
    json.dump(dict(environment=environment, config=config.to_dict(),
                   rows=[dataclasses.asdict(r) for r in rows]),
              f, indent=2, default=str)
  return path
