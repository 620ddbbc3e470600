"""Config of the standard GPU grid (BENCH.md) for scripts/benchmark.py.

  python scripts/benchmark.py --config=configs/benchmark_gpu.py

B*S = 16k tokens, H*D = 2048, S in {512, ..., 16k}, D in {64, 128, 256},
causal and not, bfloat16; plus grouped-query (H=32, Hkv=8, D=128, causal)
and packed documents (segment ids, documents of 64..2048 tokens, causal),
where cuDNN is given the equivalent dense mask. One command runs every
mechanism of a cell back to back (cuDNN and XLA baselines included); split a
long sweep with e.g. `--config.grid_head_dims='(128,)'`.
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
  config.mechanisms = "flash,cudnn,blockwise,vanilla"
  config.standard_grid = True
  config.grid_tokens = 16384
  config.grid_hidden = 2048
  config.grid_lengths = (512, 1024, 2048, 4096, 8192, 16384)
  config.grid_head_dims = (64, 128, 256)
  config.grid_extra_lengths = (16384,)
  config.packed_baselines = "cudnn_dense_mask"
  config.sequence_lengths = ()
  config.dtype = "bfloat16"
  config.check_rows = 64
  config.repeats = 20
  config.output_name = "{device}"
  config.lock()
  return config
