"""`ulysses`: sequence parallelism by all-to-all over heads."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from flexible_attention.kernels import ulysses as ulysses_kernel
from flexible_attention.mechanisms import base
from flexible_attention.mechanisms import registry
from flexible_attention.sharding import shard as shard_lib
from flexible_attention.sharding.mesh import axis_size
from flexible_attention.sharding.mesh import shared_sequence_axis


@dataclasses.dataclass(frozen=True)
class UlyssesConfig(base.AttentionConfig):
  """`ulysses`'s options: the common ones plus its local mechanism's.

  Attributes:
    local_mechanism: the mechanism that attends the whole sequence for each
      device's slice of heads (default `"blockwise"`); not a
      context-parallel one (`ring`, `ulysses`).
    local_options: that mechanism's own options (a mapping, e.g.
      `{"interpret": True}` or `{"launch": ...}` for `flash`); the common
      ones (heads, window, soft cap, block sizes...) are `ulysses`' own.
  """

  local_mechanism: str = "blockwise"
  local_options: Any = ()

  def __post_init__(self):
    super().__post_init__()
    local_cls = registry.get_mechanism(self.local_mechanism)
    if local_cls.sequence_parallel:
      raise ValueError(
          f"ulysses: local_mechanism must attend a whole sequence on one "
          f"device, not the context-parallel {self.local_mechanism!r}.")
    try:
      options = registry.Options(self.local_options)
    except (TypeError, ValueError):
      raise TypeError(f"ulysses: local_options must be a mapping of "
                      f"{self.local_mechanism!r}'s options, got "
                      f"{self.local_options!r}.") from None
    own = local_cls.config_class.own_fields()
    unknown = set(options) - set(own)
    if unknown:
      raise TypeError(
          f"ulysses: local_options {sorted(unknown)} are not options of "
          f"local_mechanism {self.local_mechanism!r}; its own options: "
          f"{sorted(own) or 'none'}.")
    object.__setattr__(self, "local_options", options)
    self.local_config()  # Checks the options' values now.

  def local_config(self) -> base.AttentionConfig:
    """The local mechanism's config: the common options and its own."""
    config_class = registry.get_mechanism(self.local_mechanism).config_class
    return dataclasses.replace(self.for_mechanism(config_class),
                               **self.local_options)


@registry.register_mechanism("ulysses")
class UlyssesAttention(base.AttentionModule):
  """DeepSpeed-Ulysses context parallelism.

  On a sequence-sharded mesh: all-to-all from sequence shards to head shards,
  the local mechanism on the whole sequence, all-to-all back. The heads of
  each head shard are split over the n sequence shards: with fewer KV heads
  than that (Hkv = 2, n = 8), each KV head is repeated r times, the least r
  making Hkv * r divisible by n (K/V then travel r times), which needs the
  query heads divisible by Hkv * r. Without a sequence axis it is its local
  mechanism; so it is for queries the sequence axis does not divide
  (decoding), which stay whole on every device: the local mechanism attends
  them to the device's key shard and the shards merge by their lse
  (`sharding/shard.py`). Dense masks and biases are not supported; the
  features of the local mechanism are (score / mask mods see global head
  indices and positions).
  """

  config_class = UlyssesConfig
  sequence_parallel = True
  capabilities = registry.Capabilities(
      mask=False, bias=False, sharded_sequence=True, sinks=True,
      score_mod=True, mask_mod=True,
      block_size_fields=("block_q", "block_k", "block_q_dkv", "block_k_dkv"),
      notes=("all-to-all seq->heads; KV heads repeated to fill the sequence "
             "axis; H divisible by it."))

  @classmethod
  def make_kernel(cls, config, request):
    local_cls = registry.get_mechanism(config.local_mechanism)
    local_config = config.local_config()
    local_request = dataclasses.replace(
        request, sequence_sharded=False,
        options=local_config.request_options())
    reason = local_cls.unsupported_reason(local_request)
    if reason is not None:
      raise NotImplementedError(f"ulysses' local mechanism: {reason}")
    local_kernel = local_cls.make_kernel(local_config, local_request)
    if not request.sequence_sharded or shard_lib.splits_keys(
        config.mesh, config.partition_axis, request.dims.q_len):
      # No all-to-all: the whole sequence is local, or the queries are whole
      # on every device and the keys split (`shard.splits_keys`).
      return local_kernel
    axes = config.partition_axis
    axis_name = shared_sequence_axis("ulysses", axes)
    num_shards = axis_size(config.mesh, axes.key_sequence_axis)
    head_shards = axis_size(config.mesh, axes.head_axis)
    heads = request.dims.num_heads // head_shards
    kv_heads = request.dims.num_kv_heads // head_shards
    # Fewer KV heads than sequence shards: repeat each KV head r times (the
    # least r making them divisible), if the query heads allow it.
    repeats = num_shards // math.gcd(kv_heads, num_shards)
    if heads % (kv_heads * repeats):
      raise ValueError(
          f"ulysses splits the heads of each head shard over the {num_shards} "
          f"shards of the sequence axis {axes.key_sequence_axis!r}: the KV "
          f"heads ({kv_heads}, repeated {repeats}x to "
          f"{kv_heads * repeats}) must divide the query heads ({heads}); "
          "use ring, or fewer sequence shards.")
    return functools.partial(
        ulysses_kernel.ulysses_attention, axis_name=axis_name,
        num_shards=num_shards, local_kernel=local_kernel, kv_repeats=repeats)
