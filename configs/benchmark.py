"""Config of scripts/benchmark.py: speed and memory, checked before timed.

Three variants, chosen with ml_collections' `path:argument` syntax:

- `--config=configs/benchmark.py` (`cpu`, the default): the CPU measurement
  of the core issue, B=1, H=4, D=64, float32, causal, vanilla vs blockwise;
  e.g. `--config.sequence_lengths='(8192, 32768)'`.
- `--config=configs/benchmark.py:gpu`: the standard GPU grid of BENCH.md,
  B*S = 16k tokens, H*D = 2048, S in {512, ..., 16k}, D in {64, 128, 256},
  causal and not, bfloat16; plus grouped-query (H=32, Hkv=8, D=128, causal)
  and packed documents (segment ids, documents of 64..2048 tokens, causal).
  Every mechanism of a cell runs back to back (`auto` included), then the
  baselines: JAX's in-tree Pallas-Triton kernel (`pallas_in_tree`) on every
  cell, and cuDNN given the equivalent dense mask (`cudnn_dense_mask`) on
  packed documents. The D = 128 cells at S = 16k also get a fresh-process
  peak for flash and the baselines. Split a long sweep with e.g.
  `--config.grid_head_dims='(128,)'`.
- `--config=configs/benchmark.py:decode`: one decoding call against a full
  KV cache (flexible_attention/comparison/decode.py): B in {1, 8, 64}, L in
  {4k, 32k, 128k} tokens per row, H/Hkv in {32/8, 8/8}, D in {128, 64},
  bfloat16, dense and paged caches (page sizes 16 and 128), 1 and 4 new
  tokens; rows `mechanisms` and the hand-written XLA decode (`baselines`:
  `xla_decode`). Reports microseconds per call, K/V bytes read per second
  and the fraction of the card's peak HBM bandwidth, each call timed inside
  a jitted loop of `calls_per_program` calls, as a decoding loop runs it
  (1: one dispatch per call). Split a sweep with
  e.g. `--config.decode_heads='((32, 8),)' --config.decode_head_dims='(128,)'`
  or `--config.decode_caches=dense`. `decode_cpu`: the same on tiny cells,
  float32, `vanilla` and `blockwise` (seconds on a CPU).
- `--config=configs/benchmark.py:context_parallel`: ring attention over all
  devices (`num_devices=-1`) against its block kernel on one device, bf16,
  H*D = 2048 (H = 16, D = 128), causal, forward+backward. The block kernel
  is `block_mechanism`: `flash` (default, GPU) or `blockwise`.

Rows and baselines:
- `mechanisms`: registered mechanisms, comma-separated (empty: all);
  `baselines`: baselines run on every cell, `packed_baselines`: only on
  packed cells (`baselines.BASELINES`: `cudnn_dense_mask`, `pallas_in_tree`).

Memory (each row has `minimum_bytes`, `program_bytes` and `memory_ratio`,
see flexible_attention/comparison/benchmark.py):
- `fresh_process_peak`: also measure `peak_bytes_in_use` around one
  forward+backward in a fresh process (`fresh_peak_bytes`,
  `fresh_peak_ratio`; None on backends without memory statistics, e.g. CPU),
  for the rows of `peak_mechanisms` (comma-separated), `peak_lengths` and
  `peak_head_dims` (each empty: all). Two fresh processes a row (compile,
  then measure with the executable loaded from a persistent compilation
  cache), about 10-20 s of device time.

Summary (JSON key `summary`, and a markdown table in the log), per cell:
`summary_subject`'s forward+backward speed against each of `summary_versus`
(comma-separated), `auto` against the fastest row, and the subject's memory
ratios.
"""

import ml_collections
from ml_collections import config_dict


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
  variants = ("cpu", "gpu", "context_parallel", "decode", "decode_cpu")
  if variant not in variants:
    raise ValueError(f"configs/benchmark.py: the variant must be one of "
                     f"{variants}, got {variant!r}.")
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
  config.baselines = ""  # Comma-separated; on every cell.
  config.packed_baselines = ""  # Comma-separated; on packed cells only.
  config.fresh_process_peak = False
  config.peak_mechanisms = ""  # Empty: every row.
  config.peak_lengths = ()  # Empty: every length.
  config.peak_head_dims = ()  # Empty: every head dimension.
  config.summary_subject = "blockwise"
  config.summary_versus = "vanilla"
  if variant == "gpu":
    config.mechanisms = "flash,cudnn,blockwise,vanilla,auto"
    config.baselines = "pallas_in_tree"
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
    config.fresh_process_peak = True
    config.peak_mechanisms = "flash,cudnn,cudnn_dense_mask,pallas_in_tree"
    config.peak_lengths = (16384,)
    config.peak_head_dims = (128,)
    config.summary_subject = "flash"
    config.summary_versus = "cudnn,cudnn_dense_mask,pallas_in_tree"
  elif variant == "context_parallel":
    config.mechanisms = "blockwise"
    config.sequence_lengths = ()  # Only the context-parallel sweep.
    config.context_parallel = True
    config.num_devices = -1
    config.block_mechanism = "flash"
    config.local_lengths = (4096, 16384, 65536)
    config.layouts = ("zigzag", "contiguous")
    config.longest_lengths = (1048576, 2097152, 4194304)
    config.num_heads = 16
    config.head_dim = 128
    config.dtype = "bfloat16"
    config.check_rows = 16
    config.repeats = 3
    config.output_name = "{device}-x{count}-context-parallel"
  elif variant in ("decode", "decode_cpu"):
    config.decode = True
    config.sequence_lengths = ()  # Only the decode cells.
    config.mechanisms = "flash,auto,vanilla"
    config.baselines = "xla_decode"
    config.decode_batches = (1, 8, 64)
    config.decode_lengths = (4096, 32768, 131072)
    config.decode_heads = ((32, 8), (8, 8))  # (H, Hkv) pairs.
    config.decode_head_dims = (128, 64)
    config.decode_caches = "dense,paged16,paged128"  # paged<page size>.
    config.decode_new_tokens = (1, 4)
    config.page_order = "shuffled"  # Or contiguous page ids per row.
    config.interpret = config_dict.placeholder(bool)  # Default: on CPU.
    config.dtype = "bfloat16"
    config.repeats = 20
    # Calls timed inside one jitted loop, as a decoding loop runs them (1:
    # one program dispatch per call, which the host's dispatch can outlast
    # on calls of tens of microseconds).
    config.calls_per_program = 16
    config.output_name = "{device}-decode"
    if variant == "decode_cpu":
      config.mechanisms = "vanilla,blockwise"
      config.decode_batches = (1, 4)
      config.decode_lengths = (200, 1024)
      config.decode_heads = ((4, 2),)
      config.decode_head_dims = (32,)
      config.decode_caches = "dense,paged16"
      config.dtype = "float32"
      config.repeats = 5
      config.calls_per_program = 2
      config.output_name = "cpu-decode"
  config.lock()
  return config
