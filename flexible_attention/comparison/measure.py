"""Check, then time: one benchmark cell's rows.

`benchmark_cell` compiles each row's forward and forward+backward (a
registered mechanism or a baseline, `baselines.forward_fn`), reads the
program's memory, checks the result against the float32 reference
(`compare.reference_outputs` and `compare.check_against_reference`, the
check of `fa.compare_attentions` too), then times the rows that pass
together, their samples taken round-robin (`timing.median_seconds_each`),
so the device's drift during a run falls on all of them alike.

The check stays cheap at any length: with default (bottom-right) positions
the last `check_rows` queries of the full problem are exactly the problem of
those queries alone, so the reference runs on `[B, check_rows]` queries
against all keys; gradients are checked the same way, by giving the backward
a cotangent that is zero outside those rows (dq of the rows, dk and dv in
full).

A row whose compiled program would need more memory than the machine has
(`memory_analysis`) is recorded as `skipped: needs ...` and not run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flexible_attention import timing
from flexible_attention.comparison import baselines
from flexible_attention.comparison import cells
from flexible_attention.comparison import compare
from flexible_attention.comparison import fresh_peak


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
  # Forward+backward memory (see comparison/benchmark.py's docstring).
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


def _available_bytes() -> int | None:
  device = jax.devices()[0]
  if device.platform == "cpu":
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
      return None
  stats = device.memory_stats() or {}
  return stats.get("bytes_limit")


def _reference(cell: cells.Cell, inputs: cells.CellInputs, logits_soft_cap):
  """The float32 reference of the checked rows, where the inputs live.

  Returns:
    `(out [B, rows, H, D], (dq [B, rows, H, D], dk, dv [B, S, Hkv, D]))` of
    the last `rows` queries against all keys, for the checking cotangent.
  """
  return compare.reference_outputs(
      inputs.q, inputs.k, inputs.v, inputs.ct_check, causal=cell.causal,
      sm_scale=cell.head_dim**-0.5, segment_ids=inputs.segment_ids,
      logits_soft_cap=logits_soft_cap, rows=inputs.rows)


def benchmark_one(name: str, config, cell: cells.Cell | int, *, mesh=None,
                  options=None, label: str | None = None,
                  repeats: int | None = None,
                  warmup: int = 2) -> BenchmarkRow:
  """Checks, then times one mechanism (or baseline) on one cell.

  Args:
    name: a mechanism or a baseline of `baselines.BASELINES`:
      `"cudnn_dense_mask"` (cuDNN given the dense mask equivalent to the
      cell's structure) or `"pallas_in_tree"` (JAX's Pallas-Triton `mha`).
    config: the benchmark config (dtype, check rows, repeats, ...).
    cell: the problem, or a sequence length (sizes from `config`).
    mesh: run on this mesh (inputs sharded over its `sp` axis).
    options: extra module options (e.g. `layout`).
    label: the row's name (default `name`).
    repeats: timed samples (default `config.repeats`).
    warmup: untimed calls before them (after the checked call).
  """
  if isinstance(cell, int):
    cell = cells.config_cell(config, cell)
  return benchmark_cell([name], config, cell, mesh=mesh, options=options,
                        labels=[label] if label else None, repeats=repeats,
                        warmup=warmup)[0]


def benchmark_cell(names: Sequence[str], config, cell: cells.Cell, *,
                   mesh=None, options=None,
                   labels: Sequence[str] | None = None,
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
      row.status = _error_status(e)
    return [row for row, _ in prepared]
  logging.info(
      "%s: inputs, reference, compiling and checking %.1f s (compiling the "
      "forward+backward programs %.1f s), timing %.1f s", cell.name,
      checked - start, sum(row.compile_seconds or 0.0 for row, _ in prepared),
      time.perf_counter() - checked)
  flops = cells.attention_flops(cell.batch, cell.num_heads, cell.seq_len,
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


def _error_status(e: Exception) -> str:
  return f"error: {type(e).__name__}: {str(e)[:300]}"


def _prepare_row(name, config, cell, mesh, options, label):
  """`(row, calls)`: the row compiled and checked, and its forward and
  forward+backward calls `(fn, args)` to time (None when the row ends
  here: refused, unavailable, too large, wrong or failed)."""
  try:
    return _compile_and_check(name, config, cell, mesh, options, label)
  except Exception as e:  # pylint: disable=broad-except
    return BenchmarkRow(mechanism=label, sequence_length=cell.seq_len,
                        cell=cell.name, status=_error_status(e),
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
  inputs = _CELL_CACHE.get(key, "inputs",
                           lambda: cells.random_inputs(*cell_args))
  q, k, v, ct_time = inputs.q, inputs.k, inputs.v, inputs.ct_time
  served = []
  try:
    fwd = baselines.forward_fn(
        name, cell, logits_soft_cap=config.logits_soft_cap,
        segment_ids=inputs.segment_ids, mesh=mesh, options=options,
        served=served)
    compiled_fwd = timing.compile_fn(fwd, q, k, v)
    compiled = timing.compile_fn(baselines.forward_backward_fn(fwd), q, k, v,
                                 ct_time)
  except baselines.BaselineUnavailable as e:
    row.status = f"unavailable: {e}"
    return row, None
  except NotImplementedError as e:
    row.status = f"unsupported: {e}"
    return row, None
  row.served_by = served[-1] if served else None
  row.compile_seconds = compiled.compile_seconds
  row.temp_bytes = compiled.temp_bytes
  # Every array is sharded along the sequence on a mesh.
  row.minimum_bytes = cells.minimum_bytes(cell, config.dtype) // row.devices
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
  reference = _CELL_CACHE.get(
      key, "reference",
      lambda: _reference(cell, inputs, config.logits_soft_cap))
  check = compare.check_against_reference(
      compiled_fwd.fn(q, k, v), compiled.fn(q, k, v, inputs.ct_check),
      reference, config.dtype, rows=inputs.rows)
  row.out_error, row.grad_error = check.out_error, check.grad_error
  if check.failure:
    row.status = check.failure
    return row, None
  return row, [(compiled_fwd.fn, (q, k, v)),
               (compiled.fn, (q, k, v, ct_time))]


def _wants_fresh_peak(config, name: str, cell: cells.Cell) -> bool:
  """Whether the config asks a fresh-process peak of this row."""
  chosen = lambda values, value: not values or value in values
  return (config.fresh_process_peak and
          chosen(cells.config_names(config.peak_mechanisms), name) and
          chosen(config.peak_lengths, cell.seq_len) and
          chosen(config.peak_head_dims, cell.head_dim))


def _measure_fresh_peak(row, name, config, cell, options):
  """Fills the row's fresh-process peak; a failure is logged, not raised."""
  try:
    row.fresh_peak_bytes = fresh_peak.fresh_process_peak(
        name, cell, dtype=config.dtype, seed=config.seed,
        logits_soft_cap=config.logits_soft_cap, options=options)
  except RuntimeError as e:
    logging.warning("%s on %s: no fresh-process peak: %s", name, cell.name, e)
    return
  if row.fresh_peak_bytes is not None:
    row.fresh_peak_ratio = row.fresh_peak_bytes / row.minimum_bytes
