"""Config of scripts/compare_attention.py (the main comparison job).

Override any field on the command line, e.g.
`--config.sequence_length=2048 --config.mechanisms=vanilla,blockwise`.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Comma-separated mechanism names; empty: every registered mechanism.
  config.mechanisms = ""
  config.batch_size = 8
  config.sequence_length = 256
  config.kv_sequence_length = config_dict.placeholder(int)  # Default: Sq.
  config.num_heads = 8
  config.num_kv_heads = config_dict.placeholder(int)  # Default: num_heads.
  config.head_dim = 64
  config.dtype = "float32"
  config.causal = True
  config.sliding_window = config_dict.placeholder(int)
  config.logits_soft_cap = config_dict.placeholder(float)
  config.num_segments = 0  # > 1 packs each row into that many segments.
  config.block_q = config_dict.placeholder(int)
  config.block_k = config_dict.placeholder(int)
  # Meshes to compare on, as sizes of `axis_names`; -1 takes the remaining
  # devices. Default: one device; batch-sharded; head-sharded; dp x tp x sp;
  # sequence-sharded (context parallel: ring, ulysses, all-gather others).
  config.axis_names = ("dp", "fsdp", "tp", "sp")
  config.meshes = ((1, 1, 1, 1), (1, -1, 1, 1), (1, 1, -1, 1), (2, 1, 2, -1),
                   (1, 1, 1, -1))
  config.repeats = 3
  config.output_dir = "outputs/compare"
  config.plot = True  # A PNG next to the JSON when matplotlib is installed.
  config.lock()
  return config
