"""Config of the context-parallel benchmark (scripts/benchmark.py).

  python scripts/benchmark.py --config=configs/context_parallel.py

Ring attention over all devices (`num_devices=-1`) against its block kernel
on one device, bf16, H*D = 2048 (H = 16, D = 128), causal, forward+backward.
"""

import importlib.util
import os

_SPEC = importlib.util.spec_from_file_location(
    "benchmark_config", os.path.join(os.path.dirname(__file__),
                                     "benchmark.py"))
_BASE = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_BASE)


def get_config():
  config = _BASE.get_config()
  config.unlock()
  config.mechanisms = "blockwise"
  config.sequence_lengths = ()  # Only the context-parallel sweep below.
  config.context_parallel = True
  config.num_devices = -1
  config.block_mechanism = "blockwise"
  config.local_lengths = (4096, 16384, 65536)
  config.layouts = ("zigzag", "contiguous")
  config.longest_lengths = (1048576, 2097152, 4194304)
  config.batch_size = 1
  config.num_heads = 16
  config.head_dim = 128
  config.dtype = "bfloat16"
  config.check_rows = 16
  config.repeats = 3
  config.output_name = "{device}-x{count}-context-parallel"
  config.lock()
  return config
