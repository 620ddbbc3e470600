"""Running a pure attention kernel under `jax.shard_map`.

Batch and heads are embarrassingly parallel for attention: each device runs
the unchanged kernel on its batch rows and heads. Dropout stays bit-identical
to the unsharded call because each shard offsets its local batch and head
indices by its position on the mesh before hashing.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from flexible_attention.core.dropout import Dropout
from flexible_attention.core.inputs import AttentionInputs
from flexible_attention.core.masks import Visibility
from flexible_attention.core.types import KernelOutput
from flexible_attention.sharding.mesh import PartitionAxis
from flexible_attention.sharding.mesh import axis_names_of
from flexible_attention.sharding.mesh import axis_size
from flexible_attention.sharding.mesh import validate_partition

Kernel = Callable[[AttentionInputs, Dropout | None], KernelOutput]


def _spec_axes(axes):
  names = axis_names_of(axes)
  if not names:
    return None
  return names[0] if len(names) == 1 else names


def check_partition(mesh: Mesh, axes: PartitionAxis, inputs: AttentionInputs):
  """Validates a mesh/partition for a call; returns whether a sequence axis
  is sharded (size > 1)."""
  validate_partition(mesh, axes)
  dims = inputs.dims
  if axis_size(mesh, axes.attention_dim_axis) > 1:
    raise NotImplementedError(
        f"partition_axis.attention_dim_axis={axes.attention_dim_axis!r} "
        "shards the head size D, which attention contracts over; leave it "
        "None or map it to a mesh axis of size 1.")
  batch_shards = axis_size(mesh, axes.batch_axis)
  if dims.batch % batch_shards:
    raise ValueError(
        f"batch size B = {dims.batch} is not divisible by the "
        f"{batch_shards} shards of batch_axis {axes.batch_axis!r}.")
  head_shards = axis_size(mesh, axes.head_axis)
  if dims.num_kv_heads % head_shards:
    raise ValueError(
        f"the number of KV heads Hkv = {dims.num_kv_heads} is not divisible "
        f"by the {head_shards} shards of head_axis {axes.head_axis!r}.")
  q_shards = axis_size(mesh, axes.query_sequence_axis)
  kv_shards = axis_size(mesh, axes.key_sequence_axis)
  return q_shards > 1 or kv_shards > 1


def shard_kernel(kernel: Kernel, mesh: Mesh, axes: PartitionAxis,
                 inputs: AttentionInputs, dropout: Dropout | None, *,
                 return_lse: bool, return_weights: bool) -> KernelOutput:
  """Runs `kernel(inputs, dropout)` with batch and heads sharded on `mesh`.

  Args:
    kernel: a pure function of `(AttentionInputs, Dropout | None)`.
    mesh: the device mesh.
    axes: the `PartitionAxis`; its sequence axes must have size 1 here
      (`check_partition` first).
    inputs: the canonical record of the whole problem.
    dropout: the call's `Dropout` or `None`.
    return_lse: whether the kernel returns a log-sum-exp.
    return_weights: whether the kernel returns weights.

  Returns:
    The kernel's `KernelOutput` as global arrays.
  """
  dims = inputs.dims
  batch, heads = _spec_axes(axes.batch_axis), _spec_axes(axes.head_axis)

  def broadcastable(x):  # [B|1, H|1, Sq|1, Sk|1]
    if x is None:
      return None
    return P(batch if x.shape[0] > 1 else None,
             heads if x.shape[1] > 1 else None, None, None)

  vis = inputs.visibility
  per_row = lambda x: None if x is None else P(batch, None)
  in_specs = (
      AttentionInputs(
          query=P(batch, None, heads, None), key=P(batch, None, heads, None),
          value=P(batch, None, heads, None),
          bias=broadcastable(inputs.bias),
          visibility=Visibility(
              q_positions=P(batch, None), kv_positions=P(batch, None),
              kv_indices=P(None), q_segment_ids=per_row(vis.q_segment_ids),
              kv_segment_ids=per_row(vis.kv_segment_ids),
              kv_lengths=None if vis.kv_lengths is None else P(batch),
              mask=broadcastable(vis.mask), causal=vis.causal,
              window=vis.window)),
      None if dropout is None else Dropout(
          seed=P(), batch_offset=P(), head_offset=P(), rate=dropout.rate))
  out_specs = KernelOutput(
      out=P(batch, None, heads, None),
      lse=P(batch, heads, None) if return_lse else None,
      weights=P(batch, heads, None, None) if return_weights else None)
  local_batch = dims.batch // axis_size(mesh, axes.batch_axis)
  local_heads = dims.num_heads // axis_size(mesh, axes.head_axis)

  def local(inputs, dropout):
    if dropout is not None:
      b = jax.lax.axis_index(batch) if batch else 0
      h = jax.lax.axis_index(heads) if heads else 0
      dropout = dropout.with_offsets(b * local_batch, h * local_heads)
    return kernel(inputs, dropout)

  return jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                       out_specs=out_specs, check_vma=False)(inputs, dropout)
