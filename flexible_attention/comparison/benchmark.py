"""Speed and memory of mechanisms over sequence lengths.

`run_benchmark(config)` (called by `scripts/benchmark.py`) times forward and
forward+backward of each mechanism at each sequence length, after checking the
result against the float32 reference. The mechanisms of one cell are timed
together, their samples taken round-robin (`measure.benchmark_cell`), so the
device's drift during a run falls on all of them alike; the JSON is rewritten
after every cell. Forward+backward is `jax.vjp` of the forward applied to a
cotangent of the output's dtype, so the program's arguments are exactly q, k,
v and dO, and its outputs dq, dk and dv. The check stays cheap at any length:
only the last `check_rows` queries are checked (see `measure`).

The jobs, one module each:
- `cells`: the problems (a config's sequence lengths or the standard grid)
  and the inputs they run on;
- `baselines`: what a row runs, a registered mechanism or a baseline
  (`BASELINES`: cuDNN given the dense mask equivalent to the cell's
  structure, or JAX's in-tree Pallas-Triton kernel);
- `measure`: check against the reference, then time (and `fresh_peak`, the
  peak memory in a fresh process);
- `report`: tables, the summary, the JSON and the plots.

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
  (`fresh_peak.fresh_process_peak`), and `fresh_peak_ratio` over
  minimum_bytes.

A mechanism whose compiled program would need more memory than the machine
has (`memory_analysis`) is recorded as `skipped: needs ...` and not run, so a
dense mechanism at a long sequence cannot take the process down.

`report.summarize(rows)` (in the JSON as `summary`, and as markdown from
`report.summary_table`) puts, per cell, one mechanism's forward+backward time
against the others', `auto` against the fastest row, and the memory ratios.
"""

from __future__ import annotations

from absl import logging
import jax

from flexible_attention.comparison import cells
from flexible_attention.comparison import decode
from flexible_attention.comparison import measure
from flexible_attention.comparison import report
from flexible_attention.comparison.measure import BenchmarkRow
from flexible_attention.mechanisms import registry
from flexible_attention.sharding.mesh import make_mesh


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

  def add(row):
    _log_row(row)
    rows.append(row)
    if on_row:
      on_row(rows)

  for local in config.local_lengths:
    single = measure.benchmark_one(config.block_mechanism, config, local,
                                   label=f"{config.block_mechanism} x1")
    add(single)
    for layout in config.layouts:
      row = measure.benchmark_one(
          "ring", config, n * local, mesh=mesh,
          options={**ring_options, "layout": layout},
          label=f"ring {layout} x{n}")
      if row.forward_backward_tflops and single.forward_backward_tflops:
        row.fraction_of_single_device = (
            row.forward_backward_tflops / n / single.forward_backward_tflops)
      add(row)
  for length in config.longest_lengths:
    row = measure.benchmark_one(
        "ring", config, length, mesh=mesh,
        options={**ring_options, "layout": "zigzag"},
        label=f"ring zigzag x{n} (longest)", repeats=1, warmup=0)
    add(row)
    if row.status != "ok":
      break
  return rows


def _log_row(row: BenchmarkRow):
  logging.info("%s at S = %d: %s", row.mechanism, row.sequence_length, row)


def run_benchmark(config) -> list[BenchmarkRow]:
  """Runs `config` (see configs/benchmark.py); writes JSON; returns rows
  (the decode variant's are `decode.DecodeRow`s, see comparison/decode.py)."""
  names = (cells.config_names(config.mechanisms) or
           list(registry.available_mechanisms()))
  device = jax.devices()[0]
  logging.info("Benchmark on %s (%s), jax %s", device.device_kind,
               jax.default_backend(), jax.__version__)
  if config.get("decode"):
    return decode.run_decode_benchmark(config)
  rows = []
  if config.get("context_parallel"):
    rows = run_context_parallel(config,
                                lambda rows: report.write_json(config, rows))
  grid = [cells.config_cell(config, s) for s in config.sequence_lengths]
  if config.get("standard_grid"):
    grid = cells.standard_grid(config)
  baselines = cells.config_names(config.baselines)
  packed_baselines = cells.config_names(config.packed_baselines)
  for i, cell in enumerate(grid):
    logging.info("Cell %d/%d: %s", i + 1, len(grid), cell)
    cell_names = names + baselines + (packed_baselines if cell.packed
                                      else [])
    for row in measure.benchmark_cell(cell_names, config, cell):
      _log_row(row)
      rows.append(row)
    # After every cell, so that a cut-short run keeps them.
    report.write_json(config, rows)
  logging.info("Results:\n%s", report.table(rows))
  logging.info("Summary:\n%s",
               report.summary_table(rows, **report.summary_names(config)))
  path = report.write_json(config, rows)
  logging.info("Wrote %s", path)
  report.plot_json(path)
  return rows
