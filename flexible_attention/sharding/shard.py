"""Running a pure attention kernel under `jax.shard_map`.

Batch and heads are embarrassingly parallel for attention: each device runs
the unchanged kernel on its batch rows and heads. A batch that the batch
axes do not divide is sharded over those that do and replicated over the
rest (`batch_axes`). Dropout stays bit-identical
to the unsharded call because each shard offsets its local batch and head
indices by its position on the mesh before hashing (and positions, which the
hash also uses, are global).

Sequence axes (context parallelism) are handled in one of two ways:
- kernels that are sequence-parallel themselves (`ring`) receive their local
  query and key shards and communicate along the key sequence axis;
- every other kernel gets its query shard and all of the keys: K/V and the
  parts of the mask that belong to keys are all-gathered over the key
  sequence axis inside the `shard_map` (exact and simple, but each device
  then holds the whole K/V);
- unless the query sequence axis does not divide the queries (one new token
  per row when decoding): then every device gets all the queries and its
  key shard only, and the partial results are merged over the key sequence
  axis by their log-sum-exps (`core/merge.py`; the sinks once, after), so
  each device reads only its part of the keys (of a KV cache). The
  sequence-parallel mechanisms (`ring`, `ulysses`) then give their kernel
  no steps over the axis (`splits_keys`): `ring`'s block kernel or
  `ulysses`' local mechanism on the device's key shard.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from flexible_attention.core import merge
from flexible_attention.core.dropout import Dropout
from flexible_attention.core.inputs import AttentionInputs
from flexible_attention.core.masks import Visibility
from flexible_attention.core.mods import Mods
from flexible_attention.core.types import KernelOutput
from flexible_attention.sharding import layouts
from flexible_attention.sharding.mesh import PartitionAxis
from flexible_attention.sharding.mesh import axis_names_of
from flexible_attention.sharding.mesh import axis_size
from flexible_attention.sharding.mesh import spec_entry
from flexible_attention.sharding.mesh import validate_partition

Kernel = Callable[[AttentionInputs, Dropout | None], KernelOutput]


def batch_axes(mesh: Mesh, axes: PartitionAxis, batch: int
              ) -> tuple[str, ...] | None:
  """The mesh axes of `axes.batch_axis` that shard a batch of `batch` rows.

  In order, each axis whose size divides the rows each shard still holds
  shards them; the batch is replicated over the other axes (every device of
  those computes the same rows). E.g. B = 2 on `dp = 2, fsdp = 4`: sharded
  over `dp`, replicated over `fsdp`; B = 1: replicated over both.
  """
  chosen, shards = [], 1
  for name in axis_names_of(axes.batch_axis):
    if batch % (shards * mesh.shape[name]) == 0:
      chosen.append(name)
      shards *= mesh.shape[name]
  return tuple(chosen) or None


def effective_partition(mesh: Mesh, axes: PartitionAxis, batch: int
                       ) -> PartitionAxis:
  """`axes` with the batch axis narrowed to `batch_axes`."""
  return dataclasses.replace(axes, batch_axis=batch_axes(mesh, axes, batch))


def check_partition(mesh: Mesh, axes: PartitionAxis, inputs: AttentionInputs):
  """Validates a mesh/partition for a call; returns whether a sequence axis
  is sharded (size > 1). Any batch size is accepted (`batch_axes`)."""
  validate_partition(mesh, axes)
  dims = inputs.dims
  if axis_size(mesh, axes.attention_dim_axis) > 1:
    raise NotImplementedError(
        f"partition_axis.attention_dim_axis={axes.attention_dim_axis!r} "
        "shards the head size D, which attention contracts over; leave it "
        "None or map it to a mesh axis of size 1.")
  # A query sequence the axis does not divide splits the keys instead
  # (`run_sharded`).
  for what, size, field in (
      ("number of KV heads Hkv", dims.num_kv_heads, "head_axis"),
      ("key sequence length Sk", dims.kv_len, "key_sequence_axis")):
    names = getattr(axes, field)
    shards = axis_size(mesh, names)
    if size % shards:
      raise ValueError(f"the {what} = {size} is not divisible by the {shards} "
                       f"shards of {field} {names!r}.")
  q_shards = axis_size(mesh, axes.query_sequence_axis)
  kv_shards = axis_size(mesh, axes.key_sequence_axis)
  return q_shards > 1 or kv_shards > 1


def _permute_axis(x, perm, axis):
  return None if x is None else x.take(perm, axis=axis)


def permute_inputs(inputs: AttentionInputs, layout: str, q_shards: int,
                   kv_shards: int) -> AttentionInputs:
  """Reorders the tokens of a natural-order record into `layout`.

  Positions, segment ids and kv indices move with their tokens, so the
  permuted record describes exactly the same attention.
  """
  if layout == "contiguous":
    return inputs
  dims = inputs.dims
  q_perm = layouts.layout_permutation(layout, dims.q_len, q_shards)
  kv_perm = layouts.layout_permutation(layout, dims.kv_len, kv_shards)
  vis = inputs.visibility

  def broadcastable(x):  # [B|1, H|1, Sq|1, Sk|1]
    if x is None:
      return None
    if x.shape[2] > 1:
      x = x.take(q_perm, axis=2)
    return x.take(kv_perm, axis=3) if x.shape[3] > 1 else x

  return AttentionInputs(
      query=inputs.query.take(q_perm, axis=1),
      key=inputs.key.take(kv_perm, axis=1),
      value=inputs.value.take(kv_perm, axis=1),
      bias=broadcastable(inputs.bias),
      visibility=dataclasses.replace(
          vis, q_positions=vis.q_positions.take(q_perm, axis=1),
          kv_positions=vis.kv_positions.take(kv_perm, axis=1),
          kv_indices=vis.kv_indices.take(kv_perm, axis=0),
          q_segment_ids=_permute_axis(vis.q_segment_ids, q_perm, 1),
          kv_segment_ids=_permute_axis(vis.kv_segment_ids, kv_perm, 1),
          mask=broadcastable(vis.mask)),
      sinks=inputs.sinks, mods=inputs.mods)


def unpermute_output(result: KernelOutput, layout: str, q_shards: int,
                     kv_shards: int) -> KernelOutput:
  """Puts a kernel's output for a permuted record back in natural order."""
  if layout == "contiguous":
    return result
  q_len = result.out.shape[1]
  inverse = np.argsort(layouts.layout_permutation(layout, q_len, q_shards))
  weights = result.weights
  if weights is not None:
    kv_inverse = np.argsort(layouts.layout_permutation(
        layout, weights.shape[3], kv_shards))
    weights = weights.take(inverse, axis=2).take(kv_inverse, axis=3)
  return KernelOutput(
      result.out.take(inverse, axis=1),
      None if result.lse is None else result.lse.take(inverse, axis=2),
      weights)


def splits_keys(mesh: Mesh, axes: PartitionAxis, q_len: int) -> bool:
  """Whether a call of `q_len` queries splits the keys rather than the
  queries over the sequence axes: when the query sequence axis does not
  divide them (e.g. decoding a token per row). Every device then holds all
  the queries and its shard of the keys, and the shards' results merge by
  their lse (`shard_kernel`'s `split_keys`); a sequence-parallel
  mechanism's kernel runs no steps over the axis there."""
  return q_len % axis_size(mesh, axes.query_sequence_axis) != 0


def run_sharded(kernel: Kernel, mesh: Mesh, axes: PartitionAxis,
                inputs: AttentionInputs, dropout: Dropout | None, *,
                layout: str, return_weights: bool,
                gather_keys: bool, return_lse: bool = False) -> KernelOutput:
  """`shard_kernel` on the tokens permuted into `layout` (the kernel's
  token layout on a sequence mesh), the output put back in natural order."""
  q_shards = axis_size(mesh, axes.query_sequence_axis)
  kv_shards = axis_size(mesh, axes.key_sequence_axis)
  split_keys = splits_keys(mesh, axes, inputs.dims.q_len)
  axes = effective_partition(mesh, axes, inputs.dims.batch)
  if split_keys:
    layout = "contiguous"  # Only the keys are split: nothing to balance.
  inputs = permute_inputs(inputs, layout, q_shards, kv_shards)
  result = shard_kernel(kernel, mesh, axes, inputs, dropout,
                        return_weights=return_weights, gather_keys=gather_keys,
                        return_lse=return_lse, split_keys=split_keys)
  return unpermute_output(result, layout, q_shards, kv_shards)


def shard_kernel(kernel: Kernel, mesh: Mesh, axes: PartitionAxis,
                 inputs: AttentionInputs, dropout: Dropout | None, *,
                 return_weights: bool, gather_keys: bool,
                 return_lse: bool = False,
                 split_keys: bool = False) -> KernelOutput:
  """Runs `kernel(inputs, dropout)` sharded over `mesh`.

  Args:
    kernel: a pure function of `(AttentionInputs, Dropout | None)`.
    mesh: the device mesh.
    axes: the `PartitionAxis` (validated with `check_partition`), whose
      batch axes divide the batch (`effective_partition`).
    inputs: the canonical record of the whole problem.
    dropout: the call's `Dropout` or `None`.
    return_weights: whether the kernel returns weights.
    gather_keys: all-gather K/V over the key sequence axis before calling the
      kernel (for kernels that are not sequence-parallel themselves).
    return_lse: whether the kernel's log-sum-exp comes back (else it is
      dropped).
    split_keys: give every device all the queries (replicated over the
      query sequence axis) and its shard of the keys, and merge the partial
      results over the key sequence axis (the kernel must return its lse).

  Returns:
    The kernel's `KernelOutput` as global arrays.
  """
  dims = inputs.dims
  batch, heads = spec_entry(axes.batch_axis), spec_entry(axes.head_axis)
  q_seq = None if split_keys else spec_entry(axes.query_sequence_axis)
  kv_seq = spec_entry(axes.key_sequence_axis)
  kv_shards = axis_size(mesh, axes.key_sequence_axis)
  gather = gather_keys and not split_keys and kv_shards > 1
  merge_keys = split_keys and kv_shards > 1  # Else the keys are whole.

  def broadcastable(x):  # [B|1, H|1, Sq|1, Sk|1]
    if x is None:
      return None
    return P(batch if x.shape[0] > 1 else None,
             heads if x.shape[1] > 1 else None,
             q_seq if x.shape[2] > 1 else None,
             kv_seq if x.shape[3] > 1 and (split_keys or not gather_keys)
             else None)

  vis = inputs.visibility
  q_rows = lambda x: None if x is None else P(batch, q_seq)
  kv_rows = lambda x: None if x is None else P(batch, kv_seq)
  in_specs = (
      AttentionInputs(
          query=P(batch, q_seq, heads, None),
          key=P(batch, kv_seq, heads, None),
          value=P(batch, kv_seq, heads, None),
          bias=broadcastable(inputs.bias),
          visibility=Visibility(
              q_positions=P(batch, q_seq), kv_positions=P(batch, kv_seq),
              kv_indices=P(kv_seq), q_segment_ids=q_rows(vis.q_segment_ids),
              kv_segment_ids=kv_rows(vis.kv_segment_ids),
              kv_lengths=None if vis.kv_lengths is None else P(batch),
              mask=broadcastable(vis.mask), causal=vis.causal,
              window=vis.window),
          sinks=None if inputs.sinks is None else P(heads),
          mods=_replicated(inputs.mods)),
      None if dropout is None else Dropout(
          seed=P(), batch_offset=P(), head_offset=P(), rate=dropout.rate))
  out_specs = KernelOutput(
      out=P(batch, q_seq, heads, None),
      lse=P(batch, heads, q_seq) if return_lse else None,
      weights=(P(batch, heads, q_seq, kv_seq if split_keys else None)
               if return_weights else None))
  local_batch = dims.batch // axis_size(mesh, axes.batch_axis)
  local_heads = dims.num_heads // axis_size(mesh, axes.head_axis)

  def local(inputs, dropout):
    b = jax.lax.axis_index(batch) if batch else 0
    h = jax.lax.axis_index(heads) if heads else 0
    if dropout is not None:
      dropout = dropout.with_offsets(b * local_batch, h * local_heads)
    if inputs.mods is not None:  # Global batch and head indices.
      inputs = dataclasses.replace(inputs, mods=inputs.mods.with_offsets(
          b * local_batch, h * local_heads))
    if gather:
      inputs = _gather_keys(inputs, kv_seq)
    if merge_keys:
      shard = dataclasses.replace(inputs, sinks=None, key_shard=True)
      result = _merge_key_shards(kernel(shard, dropout), inputs.sinks, kv_seq)
    else:
      result = kernel(inputs, dropout)
    return result if return_lse else result._replace(lse=None)

  # Under `jit`: an eagerly evaluated `shard_map` cannot run a custom_vjp
  # with symbolic zeros (flash's), so op-by-op calls would fail there; under
  # an outer `jit` this one is inlined.
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                               out_specs=out_specs, check_vma=False))(
                                   inputs, dropout)


def _merge_key_shards(result: KernelOutput, sinks, axis) -> KernelOutput:
  """The attention of a device's queries to every key shard of `axis`,
  from its `result` over its own shard (computed without the sinks, which
  enter once, here): the devices' outputs and lses merged by `merge`'s
  rule (every device gets the same result); the weights of its keys
  rescaled from its shard's normaliser to the whole's."""
  if result.lse is None:
    raise NotImplementedError(
        "a query sequence the mesh's sequence axis does not divide is "
        "attended to key shards merged by their log-sum-exps; this "
        "mechanism's kernel returns no lse.")
  gather = lambda x: jax.lax.all_gather(x, axis)  # [n, ...]
  out, lse = merge.merge_stacked(gather(result.out), gather(result.lse))
  if sinks is not None:
    out, lse = merge.merge_sinks(out, lse, sinks)
  weights = result.weights
  if weights is not None:  # [B, H, Sq, Sk / n]
    weights = weights * merge.part_weights(result.lse, lse)[..., None]
  return KernelOutput(out.astype(result.out.dtype), lse, weights)


def _replicated(mods: Mods | None) -> Mods | None:
  """The spec of a call's mods: replicated (`mod_args` whole on every
  device, indexed by global batch/head indices and positions; shard_map
  sums their gradients over the devices)."""
  if mods is None:
    return None
  return dataclasses.replace(mods, args=jax.tree.map(lambda _: P(), mods.args),
                             batch_offset=P(), head_offset=P())


def _gather_keys(inputs: AttentionInputs, axis) -> AttentionInputs:
  """All-gathers K/V and their mask parts over the key sequence axis."""
  gather = lambda x, dim: None if x is None else jax.lax.all_gather(
      x, axis, axis=dim, tiled=True)
  vis = inputs.visibility
  return dataclasses.replace(
      inputs, key=gather(inputs.key, 1), value=gather(inputs.value, 1),
      visibility=dataclasses.replace(
          vis, kv_positions=gather(vis.kv_positions, 1),
          kv_indices=gather(vis.kv_indices, 0),
          kv_segment_ids=gather(vis.kv_segment_ids, 1)))
