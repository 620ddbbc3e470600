r"""Compares every attention mechanism over several device meshes.

  python scripts/compare_attention.py --config=configs/compare.py \
      --config.sequence_length=1024

On a CPU-only machine the script gives JAX 8 virtual CPU devices (unless
XLA_FLAGS already sets a count), so the meshes of the default config exist.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                 ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags

from flexible_attention.comparison import sweep
from flexible_attention.sharding import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs",
                           "compare.py"), "Comparison config.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  distributed.initialize()  # --coordinator_address etc. for multi-process.
  sweep.run_sweep(_CONFIG.value)


if __name__ == "__main__":
  flags.FLAGS.logtostderr = True
  app.run(main)
