"""Config of scripts/benchmark.py (speed and memory over sequence lengths).

The default is the CPU measurement of the core issue: B=1, H=4, D=64,
float32, causal; e.g. `--config.sequence_lengths='(8192, 32768)'`.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mechanisms = "vanilla,blockwise"  # Comma-separated; empty: all.
  config.sequence_lengths = (512, 1024, 2048)
  config.batch_size = 1
  config.num_heads = 4
  config.num_kv_heads = config_dict.placeholder(int)  # Default: num_heads.
  config.head_dim = 64
  config.dtype = "float32"
  config.causal = True
  config.logits_soft_cap = config_dict.placeholder(float)
  config.check_rows = 128  # Queries checked against the reference.
  config.repeats = 5
  # Programs needing more than this fraction of device memory are skipped.
  config.memory_fraction = 0.8
  config.seed = 0
  config.output_dir = "benchmarks/results"
  config.output_name = "cpu"
  config.lock()
  return config
