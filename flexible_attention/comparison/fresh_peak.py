r"""Peak device memory of one forward+backward, in a fresh process.

  python -m flexible_attention.comparison.fresh_peak compile '<spec JSON>'
  python -m flexible_attention.comparison.fresh_peak measure '<spec JSON>'

The spec names one benchmark row: `mechanism` (or baseline), `cell` (the
fields of `benchmark.Cell`), `dtype`, `seed`, `logits_soft_cap` and
`options`. Both modes compile the row's forward+backward
(`benchmark.forward_backward_fn`) before any array exists. `compile` stops
there: run with a persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`),
it fills the cache, so that `measure`, in the next fresh process, loads the
executable instead of compiling it (compiling allocates device buffers of its
own, e.g. XLA's autotuning). `measure` then puts q, k, v and the cotangent on
the device straight from host memory (so no other buffer is ever allocated),
runs the program once and prints one JSON line:
`{"peak_bytes_in_use": ..., "compile_peak_bytes": ...}`, the device's peak
after the run and after compiling (0 when loaded from the cache; both null
where the backend keeps no memory statistics, e.g. CPU).
`benchmark.fresh_process_peak` runs both.
"""

import json
from typing import Any

from absl import app
import jax
import numpy as np

from flexible_attention import timing
from flexible_attention.comparison import benchmark

_MODES = ("compile", "measure")


def measure(spec: dict[str, Any], *, run: bool = True) -> dict[str, Any]:
  """Compiles and (if `run`) runs one forward+backward; returns the peaks."""
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
