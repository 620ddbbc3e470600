r"""Peak device memory of one forward+backward, in a fresh process.

  python -m flexible_attention.comparison.fresh_peak '<spec JSON>'

The spec names one benchmark row: `mechanism` (or baseline), `cell` (the
fields of `benchmark.Cell`), `dtype`, `seed`, `logits_soft_cap` and
`options`. The process compiles the row's forward+backward
(`benchmark.forward_backward_fn`) before any array exists, puts q, k, v and
the cotangent on the device straight from host memory (so no other buffer
was ever allocated), runs it once and prints one JSON line:
`{"peak_bytes_in_use": ..., "compile_peak_bytes": ...}`, the device's peak
after the run and after compiling (both null where the backend keeps no
memory statistics, e.g. CPU). `benchmark.fresh_process_peak` launches it.
"""

import json
from typing import Any

from absl import app
import jax
import numpy as np

from flexible_attention.comparison import benchmark
from flexible_attention.comparison import timing


def measure(spec: dict[str, Any]) -> dict[str, int | None]:
  """Compiles and runs one forward+backward; returns the peaks (bytes)."""
  cell = benchmark.Cell(**spec["cell"])
  dtype = np.dtype(spec["dtype"])
  segment_ids = None
  if cell.packed:
    segment_ids = benchmark.packed_segment_ids(cell.batch, cell.seq_len,
                                               spec["seed"])
  forward = benchmark.forward_fn(
      spec["mechanism"], cell, logits_soft_cap=spec["logits_soft_cap"],
      segment_ids=segment_ids, options=spec["options"])
  q_shape = (cell.batch, cell.seq_len, cell.num_heads, cell.head_dim)
  kv_shape = (cell.batch, cell.seq_len, cell.num_kv_heads, cell.head_dim)
  shapes = [jax.ShapeDtypeStruct(s, dtype)
            for s in (q_shape, kv_shape, kv_shape, q_shape)]  # q, k, v, ct
  compiled = timing.compile_fn(benchmark.forward_backward_fn(forward),
                               *shapes)
  compile_peak = timing.peak_device_bytes()
  rng = np.random.default_rng(spec["seed"])
  q, k, v, ct = (
      jax.device_put(rng.standard_normal(s.shape, np.float32).astype(dtype))
      for s in shapes)
  jax.block_until_ready(compiled.fn(q, k, v, ct))
  return dict(peak_bytes_in_use=timing.peak_device_bytes(),
              compile_peak_bytes=compile_peak)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("Expected one argument, the spec as JSON; got "
                         f"{argv[1:]}.")
  print(json.dumps(measure(json.loads(argv[1]))), flush=True)


if __name__ == "__main__":
  app.run(main)
