"""Speed and memory of mechanisms over sequence lengths.

`run_benchmark(config)` (called by `scripts/benchmark.py`) times forward and
forward+backward of each mechanism at each sequence length, after checking the
result against the float32 reference. The mechanisms of one cell are timed
together, their samples taken round-robin (`benchmark_cell`), so the device's
drift during a run falls on all of them alike; the JSON is rewritten after
every cell. Forward+backward is `jax.vjp` of the
forward applied to a cotangent of the output's dtype, so the program's
arguments are exactly q, k, v and dO, and its outputs dq, dk and dv. The check
stays cheap at any length: with default (bottom-right) positions the last
`check_rows` queries of the full problem are exactly the problem of those
queries alone, so the reference runs on `[B, check_rows]` queries against all
keys; gradients are checked the same way, by giving the backward a cotangent
that is zero outside those rows (dq of the rows, dk and dv in full).

Besides the registered mechanisms, a row may be a baseline (`BASELINES`):
cuDNN given the dense mask equivalent to the cell's structure, or JAX's
in-tree Pallas-Triton kernel.

Memory, per row:
- `minimum_bytes`: what a fused forward+backward holds when each of Q, K,
  V, O, dO, dQ, dK, dV (in the cell's dtype) and the float32 log-sum-exp
  `[B, H, S]` has a buffer of its own (per device on a mesh); a program can
  go below it by reusing a dead buffer (e.g. O's) for a later one;
- `program_bytes`: the compiled forward+backward program's arguments, outputs
  and temporaries (XLA's buffer assignment), and `memory_ratio` =
  program_bytes / minimum_bytes;
- with `config.fresh_process_peak`, `fresh_peak_bytes`: the device's
  `peak_bytes_in_use` around one forward+backward in a fresh process
  (`fresh_process_peak`), and `fresh_peak_ratio` over minimum_bytes.

A mechanism whose compiled program would need more memory than the machine
has (`memory_analysis`) is recorded as `skipped: needs ...` and not run, so a
dense mechanism at a long sequence cannot take the process down.

`summarize(rows)` (in the JSON as `summary`, and as markdown from
`summary_table`) puts, per cell, one mechanism's forward+backward time against
the others', `auto` against the fastest row, and the memory ratios.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flexible_attention import timing
from flexible_attention.comparison import plotting
from flexible_attention.comparison.compare import TOLERANCE
from flexible_attention.comparison.compare import format_table
from flexible_attention.comparison.compare import relative_error
from flexible_attention.core.inputs import canonicalize
from flexible_attention.core.reference import reference_attention
from flexible_attention.mechanisms import registry
from flexible_attention.sharding.mesh import make_mesh

# The directory holding the `flexible_attention` package, put on the fresh
# process's PYTHONPATH so that it imports this very copy.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
_FRESH_PEAK_TIMEOUT_S = 600


@dataclasses.dataclass
class BenchmarkRow:
  """One (mechanism, cell) measurement. Bytes are per device."""

  mechanism: str
  sequence_length: int
  status: str
  cell: str | None = None
  served_by: str | None = None
  out_error: float | None = None
  grad_error: float | None = None
  compile_seconds: float | None = None
  forward_ms: float | None = None
  forward_backward_ms: float | None = None
  forward_tflops: float | None = None
  forward_backward_tflops: float | None = None
  # Forward+backward memory (see the module docstring).
  temp_bytes: int | None = None
  minimum_bytes: int | None = None
  program_bytes: int | None = None
  memory_ratio: float | None = None
  fresh_peak_bytes: int | None = None
  fresh_peak_ratio: float | None = None
  devices: int = 1
  # Context parallel rows: per-device TFLOP/s over the single-device
  # TFLOP/s of the same block kernel at the per-device length.
  fraction_of_single_device: float | None = None


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


def _available_bytes() -> int | None:
  device = jax.devices()[0]
  if device.platform == "cpu":
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
      return None
  stats = device.memory_stats() or {}
  return stats.get("bytes_limit")


@dataclasses.dataclass(frozen=True)
class _CellInputs:
  """The arrays every row of a cell runs on (made on the devices)."""

  q: jax.Array  # [B, S, H, D]
  k: jax.Array  # [B, S, Hkv, D]
  v: jax.Array  # [B, S, Hkv, D]
  ct_check: jax.Array  # [B, S, H, D], zero outside the last `rows` queries.
  ct_time: jax.Array  # [B, S, H, D]
  rows: int  # The queries checked against the reference.
  segment_ids: np.ndarray | None  # [B, S] for packed cells.


class _CellCache:
  """One cell's inputs and reference, shared by the cell's rows.

  A cell's rows run back to back, so neither is rebuilt (nor recompiled) per
  row; the previous cell's arrays are dropped before the next cell's are
  made, so at most one cell's are ever alive.
  """

  def __init__(self):
    self._key, self._values = None, {}

  def get(self, key, what: str, build: Callable[[], Any]):
    if key != self._key:
      self._key, self._values = key, {}
    if what not in self._values:
      self._values[what] = build()
    return self._values[what]


_CELL_CACHE = _CellCache()


def _random_inputs(cell: Cell, dtype: str, seed: int, check_rows: int,
                   sharding) -> _CellInputs:
  """The cell's random inputs; the cotangents have the output's dtype."""
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

  return _CellInputs(
      q=normal(keys[0], (b, seq_len, h, d), dtype),
      k=normal(keys[1], (b, seq_len, hkv, d), dtype),
      v=normal(keys[2], (b, seq_len, hkv, d), dtype),
      ct_check=check_cotangent(keys[3]),
      ct_time=normal(keys[4], (b, seq_len, h, d), dtype),
      rows=rows,
      segment_ids=(packed_segment_ids(b, seq_len, seed) if cell.packed
                   else None))


def _reference(cell: Cell, inputs: _CellInputs, logits_soft_cap):
  """The float32 reference on the checked rows, where the inputs live.

  With default (bottom-right) positions the last `rows` queries alone are
  the same problem as within the full sequence.

  Returns:
    `(out [B, rows, H, D], (dq [B, rows, H, D], dk, dv [B, S, Hkv, D]))` for
    the last `rows` queries against all keys, and the checking cotangent.
  """
  rows, segment_ids = inputs.rows, inputs.segment_ids

  def reference(q_rows, k, v):
    ids = None
    if segment_ids is not None:
      ids = (jnp.asarray(segment_ids[:, -rows:]), jnp.asarray(segment_ids))
    canonical = canonicalize(q_rows, k, v, causal=cell.causal,
                             segment_ids=ids)
    return reference_attention(
        canonical.query, canonical.key, canonical.value, None,
        canonical.visibility, sm_scale=cell.head_dim**-0.5,
        softcap=logits_soft_cap).out

  # In place: sequence-sharded K/V stay sharded, so on a mesh the reference
  # runs over the mesh (XLA partitions it) instead of gathering the full
  # float32 K/V and their gradients onto one device.
  f32 = lambda x: x.astype(jnp.float32)
  q_rows, k, v = f32(inputs.q[:, -rows:]), f32(inputs.k), f32(inputs.v)
  ct_rows = f32(inputs.ct_check[:, -rows:])
  loss = lambda q_rows, k, v: jnp.sum(reference(q_rows, k, v) * ct_rows)
  return (jax.jit(reference)(q_rows, k, v),
          jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q_rows, k, v))


class BaselineUnavailable(Exception):
  """A baseline's code is not in this installation (the row says why)."""


def _require_gpu(name: str):
  if jax.default_backend() != "gpu":
    raise NotImplementedError(
        f"{name} runs on GPU only; the backend is {jax.default_backend()}.")


def _cudnn_dense_mask(cell: Cell, segment_ids, logits_soft_cap):
  """cuDNN given the dense `[B, 1, S, S]` mask equivalent to the cell."""
  _require_gpu("cudnn_dense_mask")
  if logits_soft_cap is not None:
    raise NotImplementedError("cudnn_dense_mask has no logits soft cap.")
  mask = None
  if cell.causal or segment_ids is not None:
    # The library's own mask rule (`Visibility.dense`), expanded.
    shape = (cell.batch, cell.seq_len, 1, 1)
    mask = canonicalize(
        jnp.zeros(shape), jnp.zeros(shape), jnp.zeros(shape),
        causal=cell.causal,
        segment_ids=None if segment_ids is None else jnp.asarray(segment_ids)
    ).visibility.dense()  # [B, 1, S, S]
  return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=cell.head_dim**-0.5, implementation="cudnn")


def _pallas_in_tree(cell: Cell, segment_ids, logits_soft_cap):
  """JAX's in-tree Pallas-Triton kernel, `pallas.ops.gpu.attention.mha`.

  It takes `[B, S, H, D]` inputs and `[B, S]` segment ids, with top-left
  causal alignment (the same as ours, since Sq == Sk here).
  """
  try:
    # Optional: JAX may move or drop it; the row then says so.
    from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise BaselineUnavailable(
        f"jax {jax.__version__} has no jax.experimental.pallas.ops.gpu."
        f"attention ({e})") from e
  if not hasattr(attention, "mha"):
    raise BaselineUnavailable(
        f"jax {jax.__version__}'s pallas.ops.gpu.attention has no mha")
  if cell.num_kv_heads != cell.num_heads:
    raise NotImplementedError(
        "pallas_in_tree has no grouped-query attention (H = "
        f"{cell.num_heads}, Hkv = {cell.num_kv_heads}).")
  if logits_soft_cap is not None:
    raise NotImplementedError("pallas_in_tree has no logits soft cap.")
  _require_gpu("pallas_in_tree (Triton lowering)")
  return lambda q, k, v: attention.mha(
      q, k, v, None if segment_ids is None else jnp.asarray(segment_ids),
      sm_scale=cell.head_dim**-0.5, causal=cell.causal)


# Baselines: rows that call another library directly instead of a
# registered mechanism. Name -> (what serves it, builder of the forward
# `(q, k, v) -> out` from (cell, `[B, S]` segment ids or None, soft cap)).
BASELINES = {
    "cudnn_dense_mask": ("cudnn", _cudnn_dense_mask),
    "pallas_in_tree": ("pallas_in_tree", _pallas_in_tree),
}


def forward_fn(name: str, cell: Cell, *, logits_soft_cap=None,
               segment_ids=None, mesh=None, options=None,
               served=None) -> Callable:
  """The forward `(q, k, v) -> out` of one row.

  Args:
    name: a mechanism or a baseline (`BASELINES`).
    cell: the problem.
    logits_soft_cap: the soft cap of the logits, or None.
    segment_ids: `[B, S]` int document ids (packed cells), or None.
    mesh: run the mechanism on this mesh.
    options: extra module options (e.g. `layout`).
    served: a list to which tracing appends the mechanism that ran.

  Returns:
    `(q [B, S, H, D], k [B, S, Hkv, D], v [B, S, Hkv, D]) -> [B, S, H, D]`.

  Raises:
    BaselineUnavailable: the baseline is not in this installation.
    NotImplementedError: the baseline does not support the cell, a mesh or
      options here (the mechanisms raise it when traced).
  """
  served = [] if served is None else served
  h, d, hkv = cell.num_heads, cell.head_dim, cell.num_kv_heads
  if name in BASELINES:
    if mesh is not None or options:
      raise NotImplementedError(
          f"{name} runs on one device with no options; got mesh={mesh}, "
          f"options={options}.")
    served_by, build = BASELINES[name]
    baseline = build(cell, segment_ids, logits_soft_cap)

    def forward_baseline(q, k, v):
      served.append(served_by)
      return baseline(q, k, v)

    return forward_baseline

  def forward(q, k, v):
    attention = registry.create_attention(
        name, num_heads=h, head_dim=d, num_kv_heads=hkv,
        logits_soft_cap=logits_soft_cap, mesh=mesh, **(options or {}))
    out = attention(q, k, v, causal=cell.causal,
                    segment_ids=segment_ids).attention_outputs
    served.append(attention.selected_mechanism)
    return out

  apply = hk.without_apply_rng(hk.transform(forward)).apply
  return lambda q, k, v: apply({}, q, k, v)


def forward_backward_fn(forward: Callable) -> Callable:
  """`(q, k, v, ct) -> (dq, dk, dv)` of `forward`, through `jax.vjp`.

  The cotangent `ct` `[B, S, H, D]` has the output's dtype, so the program's
  arguments are exactly q, k, v, ct and its outputs dq, dk, dv.
  """

  def forward_backward(q, k, v, ct):
    _, f_vjp = jax.vjp(forward, q, k, v)
    return f_vjp(ct)

  return forward_backward


def benchmark_one(name: str, config, cell: Cell | int, *, mesh=None,
                  options=None, label: str | None = None,
                  repeats: int | None = None,
                  warmup: int = 2) -> BenchmarkRow:
  """Checks, then times one mechanism (or baseline) on one cell.

  Args:
    name: a mechanism or a baseline of `BASELINES`: `"cudnn_dense_mask"`
      (cuDNN given the dense mask equivalent to the cell's structure) or
      `"pallas_in_tree"` (JAX's Pallas-Triton `mha`).
    config: the benchmark config (dtype, check rows, repeats, ...).
    cell: the problem, or a sequence length (sizes from `config`).
    mesh: run on this mesh (inputs sharded over its `sp` axis).
    options: extra module options (e.g. `layout`).
    label: the row's name (default `name`).
    repeats: timed samples (default `config.repeats`).
    warmup: untimed calls before them (after the checked call).
  """
  if isinstance(cell, int):
    cell = config_cell(config, cell)
  return benchmark_cell([name], config, cell, mesh=mesh, options=options,
                        labels=[label] if label else None, repeats=repeats,
                        warmup=warmup)[0]


def benchmark_cell(names: Sequence[str], config, cell: Cell, *, mesh=None,
                   options=None, labels: Sequence[str] | None = None,
                   repeats: int | None = None,
                   warmup: int = 2) -> list[BenchmarkRow]:
  """Checks, then times several mechanisms (or baselines) on one cell.

  Each is compiled and checked against the reference first; those that pass
  are then timed together, their samples taken round-robin
  (`timing.median_seconds_each`), so the ratios between them are not skewed
  by the device's drift during the run. Arguments as `benchmark_one`'s;
  one row per name, in order.
  """
  labels = list(labels) if labels else list(names)
  start = time.perf_counter()
  prepared = [_prepare_row(name, config, cell, mesh, options, label)
              for name, label in zip(names, labels)]
  checked = time.perf_counter()
  timed = [(row, calls) for row, calls in prepared if calls is not None]
  try:
    seconds = timing.median_seconds_each(
        [call for _, calls in timed for call in calls],
        repeats=repeats or config.repeats, warmup=warmup)
  except Exception as e:  # pylint: disable=broad-except
    for row, _ in timed:
      row.status = f"error: {type(e).__name__}: {str(e)[:300]}"
    return [row for row, _ in prepared]
  logging.info(
      "%s: inputs, reference, compiling and checking %.1f s (compiling the "
      "forward+backward programs %.1f s), timing %.1f s", cell.name,
      checked - start, sum(row.compile_seconds or 0.0 for row, _ in prepared),
      time.perf_counter() - checked)
  flops = attention_flops(cell.batch, cell.num_heads, cell.seq_len,
                          cell.seq_len, cell.head_dim, cell.causal)
  for n, (row, _) in enumerate(timed):
    row.forward_ms = 1e3 * seconds[2 * n]
    row.forward_backward_ms = 1e3 * seconds[2 * n + 1]
    row.forward_tflops = flops / (row.forward_ms * 1e-3) / 1e12
    row.forward_backward_tflops = (3.5 * flops /
                                   (row.forward_backward_ms * 1e-3) / 1e12)
  for name, (row, calls) in zip(names, prepared):
    if calls is not None and mesh is None and _wants_fresh_peak(
        config, name, cell):
      _measure_fresh_peak(row, name, config, cell, options)
  return [row for row, _ in prepared]


def _prepare_row(name, config, cell, mesh, options, label):
  """`(row, calls)`: the row compiled and checked, and its forward and
  forward+backward calls `(fn, args)` to time (None when the row ends
  here: refused, unavailable, too large, wrong or failed)."""
  try:
    return _compile_and_check(name, config, cell, mesh, options, label)
  except Exception as e:  # pylint: disable=broad-except
    return BenchmarkRow(mechanism=label, sequence_length=cell.seq_len,
                        cell=cell.name,
                        status=f"error: {type(e).__name__}: {str(e)[:300]}",
                        devices=1 if mesh is None else mesh.size), None


def _compile_and_check(name, config, cell, mesh, options, label):
  row = BenchmarkRow(mechanism=label, sequence_length=cell.seq_len,
                     status="ok", devices=1 if mesh is None else mesh.size,
                     cell=cell.name)
  sharding = None
  if mesh is not None:
    sharding = NamedSharding(mesh, P(None, "sp", None, None))
  cell_args = (cell, config.dtype, config.seed, config.check_rows, sharding)
  key = cell_args + (config.logits_soft_cap,)
  inputs = _CELL_CACHE.get(key, "inputs", lambda: _random_inputs(*cell_args))
  q, k, v, ct_time = inputs.q, inputs.k, inputs.v, inputs.ct_time
  served = []
  try:
    fwd = forward_fn(name, cell, logits_soft_cap=config.logits_soft_cap,
                     segment_ids=inputs.segment_ids, mesh=mesh,
                     options=options, served=served)
    compiled_fwd = timing.compile_fn(fwd, q, k, v)
    compiled = timing.compile_fn(forward_backward_fn(fwd), q, k, v, ct_time)
  except BaselineUnavailable as e:
    row.status = f"unavailable: {e}"
    return row, None
  except NotImplementedError as e:
    row.status = f"unsupported: {e}"
    return row, None
  row.served_by = served[-1] if served else None
  row.compile_seconds = compiled.compile_seconds
  row.temp_bytes = compiled.temp_bytes
  # Every array is sharded along the sequence on a mesh.
  row.minimum_bytes = minimum_bytes(cell, config.dtype) // row.devices
  row.program_bytes = compiled.total_bytes
  if row.program_bytes is not None:
    row.memory_ratio = row.program_bytes / row.minimum_bytes
  available = _available_bytes()
  if (available and compiled.total_bytes and
      compiled.total_bytes > config.memory_fraction * available):
    row.status = (f"skipped: needs {compiled.total_bytes / 2**30:.1f} GiB, "
                  f"the device has {available / 2**30:.1f} GiB")
    return row, None

  # Check the last `rows` queries (and dk, dv in full) against the reference.
  rows = inputs.rows
  ref_out, ref_grads = _CELL_CACHE.get(
      key, "reference",
      lambda: _reference(cell, inputs, config.logits_soft_cap))
  out = compiled_fwd.fn(q, k, v)
  dq, dk, dv = compiled.fn(q, k, v, inputs.ct_check)
  row.out_error = relative_error(out[:, -rows:], ref_out)
  row.grad_error = max(relative_error(dq[:, -rows:], ref_grads[0]),
                       relative_error(dk, ref_grads[1]),
                       relative_error(dv, ref_grads[2]))
  worst = max(row.out_error, row.grad_error)
  if not np.isfinite(worst) or worst > TOLERANCE[np.dtype(config.dtype).name]:
    row.status = f"error: differs from the reference ({worst:.1e}); not timed"
    return row, None
  return row, [(compiled_fwd.fn, (q, k, v)),
               (compiled.fn, (q, k, v, ct_time))]


def _names(text: str) -> list[str]:
  """The names of a comma-separated config string."""
  return [n.strip() for n in text.split(",") if n.strip()]


def _wants_fresh_peak(config, name: str, cell: Cell) -> bool:
  """Whether the config asks a fresh-process peak of this row."""
  chosen = lambda values, value: not values or value in values
  return (config.fresh_process_peak and
          chosen(_names(config.peak_mechanisms), name) and
          chosen(config.peak_lengths, cell.seq_len) and
          chosen(config.peak_head_dims, cell.head_dim))


def _measure_fresh_peak(row, name, config, cell, options):
  """Fills the row's fresh-process peak; a failure is logged, not raised."""
  try:
    row.fresh_peak_bytes = fresh_process_peak(
        name, cell, dtype=config.dtype, seed=config.seed,
        logits_soft_cap=config.logits_soft_cap, options=options)
  except RuntimeError as e:
    logging.warning("%s on %s: no fresh-process peak: %s", name, cell.name, e)
    return
  if row.fresh_peak_bytes is not None:
    row.fresh_peak_ratio = row.fresh_peak_bytes / row.minimum_bytes


def fresh_process_peak(name: str, cell: Cell, *, dtype: str, seed: int = 0,
                       logits_soft_cap: float | None = None,
                       options: dict[str, Any] | None = None) -> int | None:
  """Peak device bytes of one forward+backward, in a fresh process.

  Runs `python -m flexible_attention.comparison.fresh_peak` (see there)
  twice, with this environment and this copy of the package first on
  PYTHONPATH: `compile` fills a fresh persistent compilation cache, then
  `measure` loads the executable from it (so no compile-time allocation,
  e.g. XLA's autotuning buffers, counts), runs it once and reads the
  device's `peak_bytes_in_use`. Both run with
  `XLA_PYTHON_CLIENT_PREALLOCATE=false`: this process may hold its
  preallocated pool, and `peak_bytes_in_use` counts the buffers either way.

  Args:
    name: a mechanism or a baseline.
    cell: the problem.
    dtype: the inputs' dtype.
    seed: seed of the packed documents' lengths.
    logits_soft_cap: the soft cap of the logits, or None.
    options: extra module options (JSON-serialisable).

  Returns:
    The peak bytes in use after one forward+backward (where only q, k, v
    and the cotangent were ever allocated besides the program's buffers), or
    None where the backend has no memory statistics (e.g. CPU).

  Raises:
    RuntimeError: a process failed (e.g. out of memory) or timed out.
  """
  spec = json.dumps(dict(mechanism=name, cell=dataclasses.asdict(cell),
                         dtype=dtype, seed=seed,
                         logits_soft_cap=logits_soft_cap,
                         options=options or {}))
  with tempfile.TemporaryDirectory() as cache_dir:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    env["PYTHONPATH"] = os.pathsep.join(
        [_PACKAGE_PARENT] + [p for p in [env.get("PYTHONPATH")] if p])
    _run_fresh_peak("compile", spec, env)
    peaks = json.loads(_run_fresh_peak("measure", spec, env))
  peak, compile_peak = peaks["peak_bytes_in_use"], peaks["compile_peak_bytes"]
  if compile_peak:  # The executable was not loaded from the cache.
    logging.warning("%s on %s: the measuring process compiled (no cache "
                    "hit); its peak of %d bytes may be compiling's (%d).",
                    name, cell.name, peak, compile_peak)
  return peak


def _run_fresh_peak(mode: str, spec: str, env: dict[str, str]) -> str:
  """Runs `fresh_peak <mode> <spec>`; returns its last line of output."""
  command = [sys.executable, "-m", "flexible_attention.comparison.fresh_peak",
             mode, spec]
  try:
    result = subprocess.run(command, env=env, capture_output=True, text=True,
                            timeout=_FRESH_PEAK_TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired as e:
    raise RuntimeError(
        f"fresh_peak {mode} timed out after {_FRESH_PEAK_TIMEOUT_S} s") from e
  if result.returncode != 0:
    raise RuntimeError(f"fresh_peak {mode}: exit status {result.returncode}: "
                       f"{result.stderr.strip()[-1000:]}")
  return (result.stdout.strip().splitlines() or [""])[-1]


# What the summary compares `flash` with by default (the fused-kernels issue).
_VERSUS = ("cudnn", "cudnn_dense_mask", "pallas_in_tree")


def _ratio(numerator, denominator) -> float | None:
  if numerator is None or not denominator:
    return None
  return numerator / denominator


def summarize(rows: Sequence[BenchmarkRow], *, subject: str = "flash",
              versus: Sequence[str] = _VERSUS) -> list[dict[str, Any]]:
  """Per cell, `subject` against the other rows, by forward+backward time.

  Args:
    rows: benchmark rows (one per mechanism or baseline and cell).
    subject: the row name measured.
    versus: the row names it is compared with.

  Returns:
    One dict per cell, in the rows' order, with
    - `subject`, `subject_ms`: its name and forward+backward ms;
    - `speed_vs`: `{name: name's ms / subject's ms}` for each of `versus`
      (> 1: the subject is faster), None where either was not timed;
    - `fastest`, `fastest_ms`: the fastest timed row other than `auto`;
    - `auto_served_by`, `auto_vs_fastest`: fastest_ms / auto's ms (1: auto
      is as fast as the fastest row);
    - `memory_ratio`, `fresh_peak_ratio`: the subject's (bytes over the
      minimum).
  """
  by_cell: dict[str, dict[str, BenchmarkRow]] = {}
  for row in rows:
    by_cell.setdefault(row.cell or str(row.sequence_length), {})[
        row.mechanism] = row
  summary = []
  for cell, named in by_cell.items():
    ms = lambda name: getattr(named.get(name), "forward_backward_ms", None)
    timed = {n: ms(n) for n in named if n != "auto" and ms(n) is not None}
    fastest = min(timed, key=timed.get) if timed else None
    mine = named.get(subject)
    summary.append(dict(
        cell=cell, subject=subject, subject_ms=ms(subject),
        speed_vs={n: _ratio(ms(n), ms(subject)) for n in versus},
        fastest=fastest, fastest_ms=timed.get(fastest),
        auto_served_by=getattr(named.get("auto"), "served_by", None),
        auto_vs_fastest=_ratio(timed.get(fastest), ms("auto")),
        memory_ratio=getattr(mine, "memory_ratio", None),
        fresh_peak_ratio=getattr(mine, "fresh_peak_ratio", None)))
  return summary


def summary_table(rows: Sequence[BenchmarkRow], *, subject: str = "flash",
                  versus: Sequence[str] = _VERSUS) -> str:
  """`summarize(rows, ...)` as a markdown table.

  A `subject / name` column is a speed ratio: name's forward+backward time
  over the subject's.
  """
  fmt = lambda x, f: "-" if x is None else f.format(x)
  header = (["cell", f"{subject} fwd+bwd ms"] +
            [f"{subject} / {n}" for n in versus] +
            ["fastest", "auto (served by) / fastest",
             f"{subject} program / minimum",
             f"{subject} fresh peak / minimum"])
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for s in summarize(rows, subject=subject, versus=versus):
    auto = fmt(s["auto_vs_fastest"], "{:.2f}")
    if s["auto_served_by"]:
      auto += f" ({s['auto_served_by']})"
    cells = ([s["cell"], fmt(s["subject_ms"], "{:.2f}")] +
             [fmt(s["speed_vs"][n], "{:.2f}") for n in versus] +
             [s["fastest"] or "-", auto, fmt(s["memory_ratio"], "{:.2f}"),
              fmt(s["fresh_peak_ratio"], "{:.2f}")])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def table(rows: list[BenchmarkRow]) -> str:
  """A fixed-width text table."""
  fmt = lambda x, f: "-" if x is None else f.format(x)
  header = ("mechanism", "cell", "status", "out err", "grad err", "fwd ms",
            "fwd+bwd ms", "TFLOP/s", "x single", "temp MiB", "prog/min",
            "peak/min")
  lines = [header] + [
      (r.mechanism, r.cell or str(r.sequence_length),
       r.status if len(r.status) < 50 else r.status[:47] + "...",
       fmt(r.out_error, "{:.1e}"), fmt(r.grad_error, "{:.1e}"),
       fmt(r.forward_ms, "{:.1f}"), fmt(r.forward_backward_ms, "{:.1f}"),
       fmt(r.forward_backward_tflops, "{:.3f}"),
       fmt(r.fraction_of_single_device, "{:.2f}"),
       fmt(None if r.temp_bytes is None else r.temp_bytes / 2**20, "{:.1f}"),
       fmt(r.memory_ratio, "{:.2f}"), fmt(r.fresh_peak_ratio, "{:.2f}"))
      for r in rows]
  return format_table(lines)


def run_context_parallel(config, on_row=None) -> list[BenchmarkRow]:
  """Ring attention across devices vs its block kernel on one device.

  For each per-device length `s` of `config.local_lengths`: the block
  kernel (`config.block_mechanism`) on one device at `s`, then `ring` over
  `n` devices at `n * s` for each of `config.layouts`, reporting each ring
  row's per-device throughput as a fraction of the single-device one. Then
  `ring` (zigzag) at each of `config.longest_lengths` until one fails (one
  timed call each, no warm-up beyond the checked call).

  The ring's block kernel is the block mechanism: `blockwise` or `flash`.
  `on_row(rows)`, if given, is called with the rows so far after each one.
  """
  n = jax.device_count() if config.num_devices == -1 else config.num_devices
  mesh = make_mesh((1, 1, 1, n), devices=jax.devices()[:n])
  ring_options = {"block_kernel": config.block_mechanism}
  rows = []
  for local in config.local_lengths:
    single = benchmark_one(config.block_mechanism, config, local,
                           label=f"{config.block_mechanism} x1")
    _log_row(single)
    rows.append(single)
    if on_row:
      on_row(rows)
    for layout in config.layouts:
      row = benchmark_one("ring", config, n * local, mesh=mesh,
                          options={**ring_options, "layout": layout},
                          label=f"ring {layout} x{n}")
      if row.forward_backward_tflops and single.forward_backward_tflops:
        row.fraction_of_single_device = (
            row.forward_backward_tflops / n / single.forward_backward_tflops)
      _log_row(row)
      rows.append(row)
      if on_row:
        on_row(rows)
  for length in config.longest_lengths:
    row = benchmark_one("ring", config, length, mesh=mesh,
                        options={**ring_options, "layout": "zigzag"},
                        label=f"ring zigzag x{n} (longest)", repeats=1,
                        warmup=0)
    _log_row(row)
    rows.append(row)
    if on_row:
      on_row(rows)
    if row.status != "ok":
      break
  return rows


def _log_row(row: BenchmarkRow):
  logging.info("%s at S = %d: %s", row.mechanism, row.sequence_length, row)


def _summary_names(config) -> dict[str, Any]:
  return dict(subject=config.summary_subject,
              versus=_names(config.summary_versus))


def _write(config, rows) -> str:
  """Writes the rows so far and their summary as JSON; returns the path."""
  device = jax.devices()[0]
  os.makedirs(config.output_dir, exist_ok=True)
  slug = re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-")
  name = config.output_name.format(device=slug, count=jax.device_count())
  path = os.path.join(config.output_dir, name + ".json")
  environment: dict[str, Any] = dict(
      device_kind=device.device_kind, backend=jax.default_backend(),
      device_count=jax.device_count(), jax_version=jax.__version__,
      python=platform.python_version(), cpu_count=os.cpu_count(),
      machine=platform.machine())
  with open(path, "w") as f:
    json.dump(dict(environment=environment, config=config.to_dict(),
                   rows=[dataclasses.asdict(r) for r in rows],
                   summary=summarize(rows, **_summary_names(config))),
              f, indent=2, default=str)
  return path


def plot(rows: list[BenchmarkRow], path: str, title: str = ""):
  """Forward+backward TFLOP/s against S, one line per mechanism and one
  panel per cell kind (head size, mask, heads), as a PNG (needs
  matplotlib; logs and returns otherwise)."""
  plt = plotting.pyplot()
  if plt is None:
    return
  panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
  for row in rows:
    if row.forward_backward_tflops is None or row.cell is None:
      continue
    kind = row.cell.split(" ", 1)[1] if " " in row.cell else row.cell
    panels.setdefault(kind, {}).setdefault(row.mechanism, []).append(
        (row.sequence_length, row.forward_backward_tflops))
  if not panels:
    logging.info("No timed rows: no plot.")
    return
  columns = min(len(panels), 3)
  lines = -(-len(panels) // columns)
  fig, axes = plt.subplots(lines, columns, figsize=(4.5 * columns,
                                                    3.2 * lines),
                           squeeze=False)
  for ax in axes.flat[len(panels):]:
    ax.set_visible(False)
  for ax, (kind, series) in zip(axes.flat, panels.items()):
    for mechanism, points in sorted(series.items()):
      points.sort()
      ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
              label=mechanism)
    ax.set_xscale("log", base=2)
    ax.set_title(kind, fontsize="medium")
    ax.set_xlabel("S")
    ax.set_ylabel("fwd+bwd TFLOP/s")
    ax.legend(fontsize="x-small")
  if title:
    fig.suptitle(title)
  plotting.save(plt, fig, path)


def plot_json(path: str) -> str:
  """Plots a results JSON written by `run_benchmark` next to it; returns
  the PNG's path."""
  with open(path) as f:
    results = json.load(f)
  fields = {f.name for f in dataclasses.fields(BenchmarkRow)}
  rows = [BenchmarkRow(**{k: v for k, v in r.items() if k in fields})
          for r in results["rows"]]
  env = results.get("environment", {})
  png = os.path.splitext(path)[0] + ".png"
  plot(rows, png, f"{env.get('device_kind', '')}, jax "
                  f"{env.get('jax_version', '')}")
  return png


def run_benchmark(config) -> list[BenchmarkRow]:
  """Runs `config` (see configs/benchmark.py); writes JSON; returns rows."""
  names = _names(config.mechanisms) or list(registry.available_mechanisms())
  device = jax.devices()[0]
  logging.info("Benchmark on %s (%s), jax %s", device.device_kind,
               jax.default_backend(), jax.__version__)
  rows = []
  if config.get("context_parallel"):
    rows = run_context_parallel(config, lambda rows: _write(config, rows))
  cells = [config_cell(config, s) for s in config.sequence_lengths]
  if config.get("standard_grid"):
    cells = standard_grid(config)
  baselines = _names(config.baselines)
  packed_baselines = _names(config.packed_baselines)
  for i, cell in enumerate(cells):
    logging.info("Cell %d/%d: %s", i + 1, len(cells), cell)
    cell_names = names + baselines + (packed_baselines if cell.packed
                                      else [])
    for row in benchmark_cell(cell_names, config, cell):
      _log_row(row)
      rows.append(row)
    _write(config, rows)  # After every cell: a cut-short run keeps them.
  logging.info("Results:\n%s", table(rows))
  logging.info("Summary:\n%s", summary_table(rows, **_summary_names(config)))
  path = _write(config, rows)
  logging.info("Wrote %s", path)
  plot_json(path)
  return rows
