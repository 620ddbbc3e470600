r"""Times mechanisms over sequence lengths after checking them.

  python scripts/benchmark.py --config=configs/benchmark.py \
      --config.sequence_lengths='(512, 1024, 2048, 8192, 32768)'

Writes JSON (and a PNG plot with matplotlib) to the config's output_dir.
`--plot_from=results.json` only re-plots an earlier run's JSON.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from flexible_attention.comparison import benchmark
from flexible_attention.comparison import report
from flexible_attention.sharding import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs",
                           "benchmark.py"), "Benchmark config.")
_PLOT_FROM = flags.DEFINE_string(
    "plot_from", None, "Only plot this results JSON (PNG next to it).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _PLOT_FROM.value:
    report.plot_json(_PLOT_FROM.value)
    return
  distributed.initialize()  # --coordinator_address etc. for multi-process.
  benchmark.run_benchmark(_CONFIG.value)


if __name__ == "__main__":
  flags.FLAGS.logtostderr = True
  app.run(main)
