r"""Peak device memory of one forward+backward, in a fresh process.

  python -m flexible_attention.comparison.fresh_peak compile '<spec JSON>'
  python -m flexible_attention.comparison.fresh_peak measure '<spec JSON>'

`fresh_process_peak` (which the benchmark calls, `comparison/measure.py`)
runs this module twice, as above. The spec names one benchmark row:
`mechanism` (or baseline), `cell` (the fields of `cells.Cell`), `dtype`,
`seed`, `logits_soft_cap` and `options`. Both modes compile the row's
forward+backward (`baselines.forward_backward_fn`) before any array exists.
`compile` stops there: run with a persistent compilation cache
(`JAX_COMPILATION_CACHE_DIR`), it fills the cache, so that `measure`, in the
next fresh process, loads the executable instead of compiling it (compiling
allocates device buffers of its own, e.g. XLA's autotuning). `measure` then
puts q, k, v and the cotangent on the device straight from host memory (so
no other buffer is ever allocated), runs the program once and prints one
JSON line: `{"peak_bytes_in_use": ..., "compile_peak_bytes": ...}`, the
device's peak after the run and after compiling (0 when loaded from the
cache; both null where the backend keeps no memory statistics, e.g. CPU).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from absl import app
from absl import logging
import jax
import numpy as np

from flexible_attention import timing
from flexible_attention.comparison import baselines
from flexible_attention.comparison import cells

_MODES = ("compile", "measure")
# The directory holding the `flexible_attention` package, put on the fresh
# process's PYTHONPATH so that it imports this very copy.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
_TIMEOUT_S = 600


def fresh_process_peak(name: str, cell: cells.Cell, *, dtype: str,
                       seed: int = 0, logits_soft_cap: float | None = None,
                       options: dict[str, Any] | None = None) -> int | None:
  """Peak device bytes of one forward+backward, in a fresh process.

  Runs `python -m flexible_attention.comparison.fresh_peak` (this module)
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
    _run("compile", spec, env)
    peaks = json.loads(_run("measure", spec, env))
  peak, compile_peak = peaks["peak_bytes_in_use"], peaks["compile_peak_bytes"]
  if compile_peak:  # The executable was not loaded from the cache.
    logging.warning("%s on %s: the measuring process compiled (no cache "
                    "hit); its peak of %d bytes may be compiling's (%d).",
                    name, cell.name, peak, compile_peak)
  return peak


def _run(mode: str, spec: str, env: dict[str, str]) -> str:
  """Runs `fresh_peak <mode> <spec>`; returns its last line of output."""
  command = [sys.executable, "-m", "flexible_attention.comparison.fresh_peak",
             mode, spec]
  try:
    result = subprocess.run(command, env=env, capture_output=True, text=True,
                            timeout=_TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired as e:
    raise RuntimeError(
        f"fresh_peak {mode} timed out after {_TIMEOUT_S} s") from e
  if result.returncode != 0:
    raise RuntimeError(f"fresh_peak {mode}: exit status {result.returncode}: "
                       f"{result.stderr.strip()[-1000:]}")
  return (result.stdout.strip().splitlines() or [""])[-1]


def measure(spec: dict[str, Any], *, run: bool = True) -> dict[str, Any]:
  """Compiles and (if `run`) runs one forward+backward; returns the peaks.

  What the fresh process does (see the module docstring).
  """
  cell = cells.Cell(**spec["cell"])
  dtype = np.dtype(spec["dtype"])
  segment_ids = None
  if cell.packed:
    segment_ids = cells.packed_segment_ids(cell.batch, cell.seq_len,
                                           spec["seed"])
  forward = baselines.forward_fn(
      spec["mechanism"], cell, logits_soft_cap=spec["logits_soft_cap"],
      segment_ids=segment_ids, options=spec["options"])
  q_shape = (cell.batch, cell.seq_len, cell.num_heads, cell.head_dim)
  kv_shape = (cell.batch, cell.seq_len, cell.num_kv_heads, cell.head_dim)
  shapes = [jax.ShapeDtypeStruct(s, dtype)
            for s in (q_shape, kv_shape, kv_shape, q_shape)]  # q, k, v, ct
  compiled = timing.compile_fn(baselines.forward_backward_fn(forward),
                               *shapes)
  compile_peak = timing.peak_device_bytes()
  if not run:
    return dict(compile_peak_bytes=compile_peak)
  rng = np.random.default_rng(spec["seed"])
  q, k, v, ct = (
      jax.device_put(rng.standard_normal(s.shape, np.float32).astype(dtype))
      for s in shapes)
  jax.block_until_ready(compiled.fn(q, k, v, ct))
  return dict(peak_bytes_in_use=timing.peak_device_bytes(),
              compile_peak_bytes=compile_peak)


def main(argv):
  if len(argv) != 3 or argv[1] not in _MODES:
    raise app.UsageError(
        f"Expected a mode ({' or '.join(_MODES)}) and the spec as JSON; got "
        f"{argv[1:]}.")
  peaks = measure(json.loads(argv[2]), run=argv[1] == "measure")
  print(json.dumps(peaks), flush=True)


if __name__ == "__main__":
  app.run(main)
