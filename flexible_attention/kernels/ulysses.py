"""Ulysses sequence parallelism: trade the sequence shard for a head shard.

Runs inside `jax.shard_map`. Two all-to-alls turn `[B, S/n, H, D]` shards
into `[B, S, H/n, D]` (every device gets the whole sequence for a slice of
the heads), any local kernel attends, and one all-to-all turns the output
back (Jacobs et al., 2023, "DeepSpeed Ulysses"). The positions, segment ids
and kv indices of the sequence are all-gathered (they are `[B, S]` vectors).
It needs the (local) KV head count to be divisible by the axis size: with
fewer KV heads, each is repeated `kv_repeats` times first (query head `h`
then uses repeated head `h // (G / r)`, a copy of its own KV head `h // G`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flexible_attention.core.inputs import AttentionInputs
from flexible_attention.core.types import KernelOutput


def ulysses_attention(inputs: AttentionInputs, dropout=None, *, axis_name,
                      num_shards: int, local_kernel,
                      kv_repeats: int = 1) -> KernelOutput:
  """Attention of sequence shards through a head-sharded local kernel.

  Args:
    inputs: this device's record: `query [B, S/n, H, D]`, `key`/`value`
      `[B, Sk/n, Hkv, D|Dv]`, their mask parts (no bias or dense mask) and
      `sinks [H]` or None (each device passes its heads' slice on), and
      `mods` or None (passed on with the head offset of the device's slice,
      `mod_args` whole).
    dropout: a `Dropout` (batch/head offsets of other axes applied) or None.
    axis_name: the sequence mesh axis.
    num_shards: its size n; `(Hkv * kv_repeats) % n == 0`.
    local_kernel: a pure kernel `(AttentionInputs, Dropout) -> KernelOutput`.
    kv_repeats: r, how many times each KV head is repeated before the
      all-to-all (H must stay a multiple of `Hkv * r`).

  Returns:
    `KernelOutput(out [B, S/n, H, Dv], lse [B, H, S/n] or None, None)`:
    the local kernel's log-sum-exp, when it gives one, sharded back.
  """
  if inputs.bias is not None or inputs.visibility.mask is not None:
    raise NotImplementedError("ulysses: a dense bias or mask is not "
                              "supported.")
  num_heads = inputs.query.shape[2]
  to_heads = lambda x: jax.lax.all_to_all(x, axis_name, split_axis=2,
                                          concat_axis=1, tiled=True)
  gather = lambda x, dim: None if x is None else jax.lax.all_gather(
      x, axis_name, axis=dim, tiled=True)
  vis = inputs.visibility
  repeat = lambda x: x if kv_repeats == 1 else jnp.repeat(
      x, kv_repeats, axis=2)  # [B, S/n, Hkv * r, D]
  local = AttentionInputs(
      query=to_heads(inputs.query), key=to_heads(repeat(inputs.key)),
      value=to_heads(repeat(inputs.value)), bias=None,
      visibility=dataclasses.replace(
          vis, q_positions=gather(vis.q_positions, 1),
          kv_positions=gather(vis.kv_positions, 1),
          kv_indices=gather(vis.kv_indices, 0),
          q_segment_ids=gather(vis.q_segment_ids, 1),
          kv_segment_ids=gather(vis.kv_segment_ids, 1)))
  first_head = jax.lax.axis_index(axis_name) * (num_heads // num_shards)
  if inputs.sinks is not None:
    local = dataclasses.replace(local, sinks=jax.lax.dynamic_slice_in_dim(
        inputs.sinks, first_head, num_heads // num_shards))
  if dropout is not None:
    dropout = dropout.with_offsets(0, first_head)
  if inputs.mods is not None:  # The mods see global head indices.
    local = dataclasses.replace(local, mods=inputs.mods.with_offsets(
        0, first_head))
  result = local_kernel(local, dropout)
  # [B, S, H/n, Dv] -> [B, S/n, H, Dv]
  out = jax.lax.all_to_all(result.out, axis_name, split_axis=1,
                           concat_axis=2, tiled=True)
  lse = result.lse  # [B, H/n, S]
  if lse is not None:
    lse = jax.lax.all_to_all(lse, axis_name, split_axis=2, concat_axis=1,
                             tiled=True)
  return KernelOutput(out, lse, None)
