r"""Greedy generation with a KV cache, checked against a full forward.

  python scripts/generate.py --config=configs/generate.py \
      --config.mechanisms=vanilla,blockwise,flash

Prints prefill and decoding tokens/s (compile time apart) and the logit
check per mechanism and cache kind; fails if a check fails.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from flexible_attention.generation import generate

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs",
                           "generate.py"), "Generation config.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  generate.run_generation(_CONFIG.value)


if __name__ == "__main__":
  flags.FLAGS.logtostderr = True
  app.run(main)
