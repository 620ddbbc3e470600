"""`ring`: context parallelism, the sequence sharded over a mesh axis."""

from __future__ import annotations

import dataclasses
import functools

from flexible_attention.kernels import ring as ring_kernel
from flexible_attention.mechanisms import base
from flexible_attention.mechanisms import blockwise
from flexible_attention.mechanisms import registry
from flexible_attention.sharding import layouts
from flexible_attention.sharding.mesh import axis_names_of
from flexible_attention.sharding.mesh import axis_size


@dataclasses.dataclass(frozen=True)
class RingAttentionConfig(base.AttentionConfig):
  """`ring`'s options: the common ones plus `layout`.

  Attributes:
    layout: token layout on a sequence-sharded mesh (`"zigzag"`, default,
      `"striped"` or `"contiguous"`). Natural-order inputs are permuted into
      it and the output back, which balances causal work across devices; the
      result never depends on it. Inputs already in a balanced layout (with
      explicit positions) want `"contiguous"`.
  """

  layout: str = "zigzag"

  def __post_init__(self):
    if self.layout not in layouts.LAYOUTS:
      raise ValueError(f"ring: layout must be one of {layouts.LAYOUTS}, got "
                       f"{self.layout!r}.")


@registry.register_mechanism("ring")
class RingAttention(base.AttentionModule):
  """Ring attention over the mesh axis that shards the sequence.

  Each device keeps its query shard; K/V shards (with their positions,
  segment ids and kv indices) travel around the ring with `lax.ppermute`
  while each device attends to the block in hand, merging through the
  float32 log-sum-exp; the backward pass is a second ring that brings each
  block's dK/dV home. The per-block kernel is the blockwise one (its
  `fa.BlockSizes` fields apply per block). On a mesh without a sequence axis
  (or without a mesh) it is the blockwise kernel on one device.

  The query and key sequences must be sharded over the same mesh axis.
  Dense masks and biases are not supported (the structured mask is).
  """

  config_class = RingAttentionConfig
  sequence_parallel = True
  capabilities = registry.Capabilities(
      mask=False, bias=False, sharded_sequence=True,
      block_size_fields=("block_q", "block_k", "block_q_dkv", "block_k_dkv"),
      notes="K/V travel by ppermute; zigzag layout balances causal work.")

  @classmethod
  def token_layout(cls, config):
    return config.layout

  @classmethod
  def make_kernel(cls, config, request):
    axis_name, num_shards = None, 1
    if request.sequence_sharded:
      axes = config.partition_axis
      if axis_names_of(axes.query_sequence_axis) != axis_names_of(
          axes.key_sequence_axis):
        raise NotImplementedError(
            "ring: the query and key sequences must be sharded over the same "
            f"mesh axis, got query_sequence_axis="
            f"{axes.query_sequence_axis!r}, key_sequence_axis="
            f"{axes.key_sequence_axis!r}.")
      names = axis_names_of(axes.key_sequence_axis)
      axis_name = names[0] if len(names) == 1 else names
      num_shards = axis_size(config.mesh, axes.key_sequence_axis)
    return functools.partial(
        ring_kernel.ring_attention, axis_name=axis_name,
        num_shards=num_shards,
        block_kernel=ring_kernel.blockwise_block_kernel(
            blockwise.tile_config(config)))
