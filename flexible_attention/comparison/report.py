"""The benchmark's reports: tables, summary, JSON and plots.

`summarize(rows)` (in the JSON as `summary`, and as markdown from
`summary_table`) puts, per cell, one mechanism's forward+backward time against
the others', `auto` against the fastest row, and the memory ratios. `table`
is the log's fixed-width table of the rows; `write_json` writes the rows so
far with the machine they ran on; `plot` and `plot_json` draw forward+backward
TFLOP/s against the sequence length.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
from typing import Any, Sequence

from absl import logging
import jax

from flexible_attention.comparison import plotting
from flexible_attention.comparison.cells import config_names
from flexible_attention.comparison.compare import format_table
from flexible_attention.comparison.compare import format_value
from flexible_attention.comparison.measure import BenchmarkRow

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
  fmt = format_value
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


def summary_names(config) -> dict[str, Any]:
  """`summarize`'s `subject` and `versus` from a benchmark config."""
  return dict(subject=config.summary_subject,
              versus=config_names(config.summary_versus))


def table(rows: list[BenchmarkRow]) -> str:
  """A fixed-width text table."""
  fmt = format_value
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


def output_path(config) -> str:
  """`config.output_dir/config.output_name.json`, the name's `{device}` and
  `{count}` filled with the device kind and count (the folder made)."""
  device = jax.devices()[0]
  os.makedirs(config.output_dir, exist_ok=True)
  slug = re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-")
  name = config.output_name.format(device=slug, count=jax.device_count())
  return os.path.join(config.output_dir, name + ".json")


def environment() -> dict[str, Any]:
  """The machine a run is on: device kind and count, jax, python."""
  device = jax.devices()[0]
  return dict(
      device_kind=device.device_kind, backend=jax.default_backend(),
      device_count=jax.device_count(), jax_version=jax.__version__,
      python=platform.python_version(), cpu_count=os.cpu_count(),
      machine=platform.machine())


def write_probe_rows(path: str | None, rows: list[dict], **extra) -> None:
  """Writes a probe's rows so far (`benchmarks/*_probe.py`, `flash_ab.py`)
  as JSON at `path` (nothing when None): the device kind, the jax version,
  `extra` and the rows. Probes call it after every cell, so a run stopped
  by its time limit keeps the cells it finished."""
  if path is None:
    return
  with open(path, "w") as f:
    json.dump(dict(device=jax.devices()[0].device_kind,
                   jax=jax.__version__, **extra, rows=rows), f, indent=1)


def write_json(config, rows: Sequence[BenchmarkRow]) -> str:
  """Writes the rows so far and their summary as JSON; returns the path
  (`output_path`)."""
  path = output_path(config)
  with open(path, "w") as f:
    json.dump(dict(environment=environment(), config=config.to_dict(),
                   rows=[dataclasses.asdict(r) for r in rows],
                   summary=summarize(rows, **summary_names(config))),
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
  """Plots a results JSON written by `write_json` next to it; returns the
  PNG's path."""
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
