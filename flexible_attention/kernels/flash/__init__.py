"""flash: the project's own fused attention kernels, in Pallas (GPU).

FlashAttention-2's algorithm (Dao, 2023, https://arxiv.org/abs/2307.08691)
with every feature of the library's semantics evaluated inside the kernels:
causal, sliding window, segment ids, kv lengths and explicit positions from
O(B * S) vectors, with fully invisible tiles skipped; grouped-query heads
read through the launch's index maps (K/V never repeated); soft cap, bias
(and its gradient), a dense mask when one is passed, and dropout with the
library's hash. Any Sq, Sk and head sizes up to 256 (padded inside).

Two backends, neither importing the other, under one launch policy:

- `triton_common`, `triton_fwd`, `triton_bwd`: the Pallas kernels lowered
  through Triton, which serve every call (any GPU; Pallas' interpreter with
  `interpret=True`, how CI runs them on CPU);
- `mosaic_common`, `mosaic_fwd`, `mosaic_dq`, `mosaic_bwd`: Mosaic GPU
  kernels for Hopper (TMA, warp-specialised `wgmma`; the forward a
  persistent kernel), the forward, dQ and dK/dV of the calls they serve
  (dropout too, through the library's hash: `mosaic_common.TileDropout`;
  sinks in the forward; not a bias or dense mask); `mosaic_schedule`:
  which tiles their programs run, in what order (the bounds table's rows,
  the persistent forward's `WorkOrder`); `mosaic_numerics`: their exact
  number formats (the fused backward's int32 fixed point, conversions
  without `cvt`); `mosaic_mods`:
  the score / mask mods the Mosaic kernels evaluate (`mod_args` read per
  program), with `mosaic_mod_rows` (the kernels' reads of the program
  values) and `mosaic_jvp` (the mods' derivatives in equations Mosaic GPU
  lowers);
  `mod_lowering` and `mod_tables`: the Triton kernels' mods and the
  mask_mod's tile tables;
- `launch`: the launch records, the per-GPU defaults, the checks, and which
  backend serves each kernel of a call (its docstring says which path
  serves what);
- `structure`: the one static record of a call (`Static`), padding, the
  structure vectors and the tile-skipping bounds both backends read;
- `interface`: `prepare`, the `custom_vjp`, `flash_attention` and the
  un-differentiated `forward_pass` / `backward_pass`;
- `triton_decode`, `mosaic_decode`, `decode_launch`, `decode`: the decode
  kernels (split-KV over a paged or dense KV cache, all query heads of a
  KV head in one program; Mosaic GPU on Hopper, Triton elsewhere), their
  launches, and `cache_attention`, which serves a KV-cache call with them,
  or with the general kernels when the call has more new tokens, a bias, a
  dense mask or dropout (`decode.cache_call_reason`).
"""

# pylint: disable=g-importing-member
from flexible_attention.kernels.flash.decode import cache_attention
from flexible_attention.kernels.flash.decode import decode_attention
from flexible_attention.kernels.flash.decode import dense_as_pages
from flexible_attention.kernels.flash.decode_launch import decode_launch
from flexible_attention.kernels.flash.decode_launch import (
    decode_unsupported_reason)
from flexible_attention.kernels.flash.decode_launch import (
    mosaic_decode_launch)
from flexible_attention.kernels.flash.interface import Prepared
from flexible_attention.kernels.flash.interface import backward_pass
from flexible_attention.kernels.flash.interface import flash_attention
from flexible_attention.kernels.flash.interface import forward_pass
from flexible_attention.kernels.flash.interface import prepare
from flexible_attention.kernels.flash.launch import BACKENDS
from flexible_attention.kernels.flash.launch import TILE_FIELDS
from flexible_attention.kernels.flash.launch import Launch
from flexible_attention.kernels.flash.launch import LaunchConfig
from flexible_attention.kernels.flash.launch import block_size_reason
from flexible_attention.kernels.flash.launch import check_block_size
from flexible_attention.kernels.flash.launch import check_launch_config
from flexible_attention.kernels.flash.launch import default_launch_config
from flexible_attention.kernels.flash.launch import head_dim_reason
from flexible_attention.kernels.flash.launch import hopper_launch_config
from flexible_attention.kernels.flash.launch import launch_config
from flexible_attention.kernels.flash.launch import mosaic_dkv_launch
from flexible_attention.kernels.flash.launch import mosaic_dq_launch
from flexible_attention.kernels.flash.launch import mosaic_launch
from flexible_attention.kernels.flash.structure import MAX_HEAD_DIM
from flexible_attention.kernels.flash.triton_decode import DecodeLaunch

__all__ = (
    "BACKENDS",
    "DecodeLaunch",
    "Launch",
    "LaunchConfig",
    "MAX_HEAD_DIM",
    "Prepared",
    "TILE_FIELDS",
    "backward_pass",
    "block_size_reason",
    "check_block_size",
    "check_launch_config",
    "cache_attention",
    "decode_attention",
    "decode_launch",
    "mosaic_decode_launch",
    "decode_unsupported_reason",
    "default_launch_config",
    "dense_as_pages",
    "flash_attention",
    "forward_pass",
    "head_dim_reason",
    "hopper_launch_config",
    "launch_config",
    "mosaic_dkv_launch",
    "mosaic_dq_launch",
    "mosaic_launch",
    "prepare",
)
