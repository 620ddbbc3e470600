"""The main comparison job: every mechanism over several meshes.

`run_sweep(config)` is what `scripts/compare_attention.py` calls: for each
mesh of `config.meshes` it runs `compare_attentions`, logs one table per mesh,
and writes all rows as JSON (plus a PNG plot when matplotlib is installed).
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any

from absl import logging
import jax

from flexible_attention.comparison import plotting
from flexible_attention.comparison.compare import ComparisonReport
from flexible_attention.comparison.compare import compare_attentions
from flexible_attention.core.types import BlockSizes
from flexible_attention.sharding.mesh import make_mesh


def _mechanisms(config) -> tuple[str, ...] | None:
  names = tuple(n.strip() for n in config.mechanisms.split(",") if n.strip())
  return names or None


def run_sweep(config) -> list[ComparisonReport]:
  """Runs the comparison of `config` (see configs/compare.py).

  Returns:
    One `ComparisonReport` per mesh; also written to
    `config.output_dir/compare.json` (and `compare.png`).
  """
  blocks = None
  if config.block_q or config.block_k:
    blocks = BlockSizes(block_q=config.block_q, block_k=config.block_k)
  reports = []
  devices = jax.devices()
  logging.info("%d %s devices (%s), jax %s", len(devices),
               jax.default_backend(), devices[0].device_kind, jax.__version__)
  for dims in config.meshes:
    mesh = make_mesh(dims, config.axis_names)
    described = ", ".join(f"{n}={s}" for n, s in mesh.shape.items())
    logging.info("Mesh %s: comparing...", described)
    report = compare_attentions(
        _mechanisms(config), batch_size=config.batch_size,
        sequence_length=config.sequence_length,
        kv_sequence_length=config.kv_sequence_length,
        num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim, dtype=config.dtype, causal=config.causal,
        sliding_window=config.sliding_window,
        logits_soft_cap=config.logits_soft_cap,
        num_segments=config.num_segments, block_sizes=blocks, mesh=mesh,
        repeats=config.repeats)
    logging.info("Mesh %s:\n%s", described, report.table())
    reports.append(report)
  _write(config, reports)
  return reports


def _environment() -> dict[str, Any]:
  devices = jax.devices()
  return dict(backend=jax.default_backend(), device_kind=devices[0].device_kind,
              device_count=len(devices), jax_version=jax.__version__,
              python=platform.python_version())


def _write(config, reports):
  os.makedirs(config.output_dir, exist_ok=True)
  path = os.path.join(config.output_dir, "compare.json")
  with open(path, "w") as f:
    json.dump(dict(environment=_environment(),
                   reports=[r.as_dict() for r in reports]), f, indent=2,
              default=str)
  logging.info("Wrote %s", path)
  if config.plot:
    _plot(reports, os.path.join(config.output_dir, "compare.png"))


def _plot(reports, path):
  plt = plotting.pyplot()
  if plt is None:
    return
  fig, ax = plt.subplots(figsize=(8, 4))
  names = [r.mechanism for r in reports[0].rows]
  width = 0.8 / max(len(reports), 1)
  for i, report in enumerate(reports):
    times = [r.forward_backward_ms or 0.0 for r in report.rows]
    label = ",".join(f"{k}={v}" for k, v in (report.mesh or {}).items()
                     if v > 1) or "1 device"
    ax.bar([x + i * width for x in range(len(names))], times, width,
           label=label)
  ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
  ax.set_ylabel("forward+backward ms (median)")
  ax.set_title("flexible_attention: mechanisms per mesh (0 = not run)")
  ax.legend(fontsize="small")
  plotting.save(plt, fig, path)
