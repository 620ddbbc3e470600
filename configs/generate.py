"""Config of scripts/generate.py: greedy decoding with a KV cache, checked.

Two variants, chosen with ml_collections' `path:argument` syntax:

- `--config=configs/generate.py` (`cpu`, the default): a 2-layer model (B=2,
  H=4, Hkv=2, D=32, float32), a 96-token prompt, 32 new tokens, L=128,
  `vanilla` and `blockwise`, dense and paged caches; under a minute on two
  CPU cores. `--config.mechanisms=flash` runs flash's kernels in Pallas'
  interpreter.
- `--config=configs/generate.py:gpu`: sized for one H200: B=8, a 32k-token
  cache (prompt 32256 + 512 new tokens), H=32, Hkv=8, D=128, M=4096, MLP
  16384, 4 layers, vocabulary 32000, bfloat16, `flash`, dense and paged
  (page size 16), prefilled in chunks of 4608 tokens; also reports the
  share of a decoding step spent in attention (`attention_fraction`).

Fields:
- `mechanisms`, `caches`: comma-separated mechanism names and cache kinds
  (`dense`: Haiku state; `paged`: explicit `fa.PagedKVCache`s).
- `check_mechanism`: the mechanism of the full causal forward the decoded
  logits are checked against (no cache).
- `prompt_length`: T (0: `cache_length - new_tokens`); `new_tokens`: N;
  `cache_length`: L (also the model's number of positions).
- `page_size`, `page_order` (`contiguous` or `shuffled` page ids).
- `prefill_chunk`: prefill in chunks of this many tokens (0: whole prompt).
- `interpret`: run Pallas mechanisms in the interpreter (default: on CPU).
- `mesh_shape`: the `(dp, fsdp, tp, sp)` sizes of the device mesh the
  attention layers are sharded over (`fa.make_mesh`), e.g. `1,1,2,4`: heads
  over tp, the cache's length over sp (a decoding step's one query per row
  is given to every sp device, which reads its shard of the cache; the
  shards merge by their lse). Empty: no mesh. The check's full forward runs
  unsharded. On CPU, give the devices with
  `XLA_FLAGS=--xla_force_host_platform_device_count=8`.
- `attention_fraction`, `repeats`: time a step and its attention calls
  alone (median of `repeats`).
- `output_path`: also write the results as JSON there (empty: no file).
"""

import ml_collections
from ml_collections import config_dict


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
  if variant not in ("cpu", "gpu"):
    raise ValueError("configs/generate.py: the variant must be cpu or gpu, "
                     f"got {variant!r}.")
  config = ml_collections.ConfigDict()
  config.mechanisms = "vanilla,blockwise"
  config.caches = "dense,paged"
  config.check_mechanism = "vanilla"
  config.batch_size = 2
  config.prompt_length = 96
  config.new_tokens = 32
  config.cache_length = 128
  config.page_size = 16
  config.page_order = "shuffled"
  config.prefill_chunk = 0
  config.vocab_size = 512
  config.num_layers = 2
  config.num_heads = 4
  config.num_kv_heads = 2
  config.head_dim = 32
  config.model_size = config_dict.placeholder(int)  # Default: H * D.
  config.mlp_size = 512
  config.dtype = "float32"
  config.interpret = config_dict.placeholder(bool)  # Default: on CPU.
  config.mesh_shape = ""  # E.g. "1,1,2,4"; empty: no mesh.
  config.attention_fraction = False
  config.repeats = 20
  config.seed = 0
  config.output_path = ""
  if variant == "gpu":
    config.mechanisms = "flash"
    config.check_mechanism = "auto"
    config.batch_size = 8
    config.prompt_length = 0  # cache_length - new_tokens.
    config.new_tokens = 512
    config.cache_length = 32768
    config.prefill_chunk = 4608  # 7 chunks of the 32256-token prompt.
    config.vocab_size = 32000
    config.num_layers = 4
    config.num_heads = 32
    config.num_kv_heads = 8
    config.head_dim = 128
    config.mlp_size = 16384
    config.dtype = "bfloat16"
    config.attention_fraction = True
    config.output_path = "benchmarks/results/{device}-generate.json"
  config.lock()
  return config
