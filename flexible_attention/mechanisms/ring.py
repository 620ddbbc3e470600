"""`ring`: context parallelism, the sequence sharded over a mesh axis."""

from __future__ import annotations

import dataclasses
import functools

from flexible_attention.kernels import blockwise as blockwise_kernel
from flexible_attention.kernels import flash as flash_kernel
from flexible_attention.kernels import ring as ring_kernel
from flexible_attention.mechanisms import base
from flexible_attention.mechanisms import registry
from flexible_attention.sharding import layouts
from flexible_attention.sharding import shard as shard_lib
from flexible_attention.sharding.mesh import axis_size
from flexible_attention.sharding.mesh import shared_sequence_axis


BLOCK_KERNELS = ("blockwise", "flash")
_BLOCK_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv")


@dataclasses.dataclass(frozen=True)
class RingAttentionConfig(base.InterpretConfig):
  """`ring`'s options: the common ones plus layout and block kernel.

  Attributes:
    layout: token layout on a sequence-sharded mesh (`"zigzag"`, default,
      `"striped"` or `"contiguous"`). Natural-order inputs are permuted into
      it and the output back, which balances causal work across devices; the
      result never depends on it. Inputs already in a balanced layout (with
      explicit positions) want `"contiguous"`.
    block_kernel: the kernel of each ring step: `"blockwise"` (pure JAX,
      any platform; default) or `"flash"` (the fused Pallas kernels of
      mechanism `flash`; GPU, or any platform with `interpret=True`).
    interpret: run the `flash` block kernel in Pallas' interpreter.
  """

  layout: str = "zigzag"
  block_kernel: str = "blockwise"

  def __post_init__(self):
    super().__post_init__()
    if self.layout not in layouts.LAYOUTS:
      raise ValueError(f"ring: layout must be one of {layouts.LAYOUTS}, got "
                       f"{self.layout!r}.")
    if self.block_kernel not in BLOCK_KERNELS:
      raise ValueError(f"ring: block_kernel must be one of {BLOCK_KERNELS}, "
                       f"got {self.block_kernel!r}.")
    if self.block_kernel == "flash":
      for field in _BLOCK_FIELDS:
        flash_kernel.check_block_size(field, getattr(self.block_sizes, field))
    elif self.interpret:
      raise ValueError("ring: interpret=True applies to block_kernel='flash' "
                       "only.")


@registry.register_mechanism("ring")
class RingAttention(base.AttentionModule):
  """Ring attention over the mesh axis that shards the sequence.

  Each device keeps its query shard; K/V shards (with their positions,
  segment ids and kv indices) travel around the ring with `lax.ppermute`
  while each device attends to the block in hand, merging through the
  float32 log-sum-exp; the backward pass is a second ring that brings each
  block's dK/dV home. The per-block kernel is `block_kernel`: the
  blockwise one (default) or the fused `flash` kernels (on GPU). The
  `fa.BlockSizes` fields `block_q`/`block_k` (forward) and
  `block_q_dkv`/`block_k_dkv` (backward; with `flash`, its dK/dV kernel,
  the dQ kernel keeping its default tiles) apply per block. On a mesh
  without a sequence axis (or without a mesh) it is that kernel on one
  device.

  The query and key sequences must be sharded over the same mesh axis. Queries
  that axis does not divide (decoding) stay whole on every device, which
  attends them to its key shard with the block kernel alone (with `flash` and
  a cache, flash's cache kernel: its decode kernel); the shards merge by their
  lse (`sharding/shard.py`). Dense masks and biases are not supported (the
  structured mask is, and score / mask mods: each block's key positions
  travel with it, so the mods see global positions; with `flash`, within its
  kernels' limits, and a float `mod_args` leaf of more than H elements is
  refused in the backward whether or not it is differentiated).
  """

  config_class = RingAttentionConfig
  sequence_parallel = True
  capabilities = registry.Capabilities(
      mask=False, bias=False, sharded_sequence=True, sinks=True,
      score_mod=True, mask_mod=True, block_size_fields=_BLOCK_FIELDS,
      notes=("K/V travel by ppermute; zigzag layout balances causal work; "
             "block kernel blockwise or flash (GPU)."))

  @classmethod
  def platforms(cls, request):
    options = request.options
    if options.get("block_kernel") == "flash" and not options.get(
        "interpret"):
      return ("gpu",)
    return super().platforms(request)

  @classmethod
  def unsupported_reason(cls, request):
    reason = super().unsupported_reason(request)
    if reason is None and request.options.get("block_kernel") == "flash":
      return flash_kernel.head_dim_reason(request.dims, "ring")
    return reason

  @classmethod
  def token_layout(cls, config):
    return config.layout

  @classmethod
  def make_kernel(cls, config, request):
    axis_name, num_shards = None, 1
    if request.sequence_sharded and not shard_lib.splits_keys(
        config.mesh, config.partition_axis, request.dims.q_len):
      axes = config.partition_axis
      axis_name = shared_sequence_axis("ring", axes)
      num_shards = axis_size(config.mesh, axes.key_sequence_axis)
    # Else no ring: the queries are whole on every device and the block
    # kernel attends them to the device's key shard (`shard.splits_keys`).
    if (config.block_kernel == "flash" and num_shards == 1
        and "cache" in request.features):
      # No ring steps over a cache: flash's own cache kernel (its decode
      # kernel where it serves the call) is the block kernel.
      return functools.partial(
          flash_kernel.cache_attention, sm_scale=config.scale,
          softcap=config.logits_soft_cap, precision=config.precision,
          block_sizes=config.block_sizes, interpret=config.interpret)
    if config.block_kernel == "flash":
      block_kernel = ring_kernel.flash_block_kernel(
          sm_scale=config.scale, softcap=config.logits_soft_cap,
          precision=config.precision, block_sizes=config.block_sizes,
          interpret=config.interpret)
    else:
      block_kernel = ring_kernel.blockwise_block_kernel(
          blockwise_kernel.tile_config(
              config.block_sizes, sm_scale=config.scale,
              softcap=config.logits_soft_cap, precision=config.precision))
    return functools.partial(
        ring_kernel.ring_attention, axis_name=axis_name,
        num_shards=num_shards, block_kernel=block_kernel)
