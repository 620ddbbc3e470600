"""`fa.FlexibleAttentionModule`: the seed-compatible facade.

It accepts the argument names of the module this project started from
(`attn_mechanism=`, `num_attention_heads=`, `head_dims=`, the `block_*`
sizes, ...) and maps them onto `fa.create_attention`. It adds no behaviour of
its own: every argument either reaches the mechanism or is checked.
"""

from __future__ import annotations

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from flexible_attention.comparison.compare import ComparisonReport
from flexible_attention.comparison.compare import compare_attentions
from flexible_attention.core.types import AttentionOutput
from flexible_attention.core.types import BlockSizes
from flexible_attention.mechanisms import registry
from flexible_attention.sharding.mesh import PartitionAxis
from flexible_attention.sharding.mesh import axis_size
from flexible_attention.sharding.mesh import make_mesh

_BLOCK_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv",
                 "block_q_dq", "block_k_dq", "block_k_major",
                 "block_q_major_dkv", "block_k_major_dkv", "block_k_major_dq",
                 "block_b")


class FlexibleAttentionModule(hk.Module):
  """Attention by mechanism name, with the seed project's argument names.

  Glossary of shapes:
  - B: batch size; Sq, Sk: query and key/value lengths.
  - H: `num_attention_heads`; Hkv: `num_key_value_heads`.
  - D: `head_dims`.
  """

  def __init__(
      self,
      *,
      num_attention_heads: int,
      head_dims: int,
      attn_mechanism: str = "auto",
      num_key_value_heads: int | None = None,
      attention_dropout: float = 0.0,
      sm_scale: float | None = None,
      mesh: jax.sharding.Mesh | None = None,
      partition_axis: PartitionAxis | None = None,
      dtype: Any = None,
      precision: Any = None,
      logits_soft_cap: float | None = None,
      sliding_window: int | tuple[int, int] | None = None,
      block_q: int | None = None,
      block_k: int | None = None,
      block_q_dkv: int | None = None,
      block_k_dkv: int | None = None,
      block_q_dq: int | None = None,
      block_k_dq: int | None = None,
      block_k_major: int | None = None,
      block_q_major_dkv: int | None = None,
      block_k_major_dkv: int | None = None,
      block_k_major_dq: int | None = None,
      block_b: int | None = None,
      name: str | None = None,
  ):
    """Initialises the module.

    Args:
      num_attention_heads: H.
      head_dims: D.
      attn_mechanism: a name from `fa.available_mechanisms()`.
      num_key_value_heads: Hkv (default H).
      attention_dropout: dropout rate (applied with `deterministic=False`).
      sm_scale: softmax scale (default `D ** -0.5`).
      mesh, partition_axis: sharding (see `fa.PartitionAxis`).
      dtype: compute dtype.
      precision: matmul precision.
      logits_soft_cap, sliding_window: as `fa.create_attention`.
      block_q ... block_b: tile sizes, gathered into a `fa.BlockSizes`; a
        mechanism that does not read a given field refuses it.
      name: module name.
    """
    super().__init__(name=name)
    registry.get_mechanism(attn_mechanism)
    blocks = dict(block_q=block_q, block_k=block_k, block_q_dkv=block_q_dkv,
                  block_k_dkv=block_k_dkv, block_q_dq=block_q_dq,
                  block_k_dq=block_k_dq, block_k_major=block_k_major,
                  block_q_major_dkv=block_q_major_dkv,
                  block_k_major_dkv=block_k_major_dkv,
                  block_k_major_dq=block_k_major_dq, block_b=block_b)
    self.attn_mechanism = attn_mechanism
    self.num_attention_heads = num_attention_heads
    self.head_dims = head_dims
    self.options = dict(
        num_kv_heads=num_key_value_heads, dropout_rate=attention_dropout,
        sm_scale=sm_scale, mesh=mesh, partition_axis=partition_axis,
        dtype=dtype, precision=precision, logits_soft_cap=logits_soft_cap,
        sliding_window=sliding_window, block_sizes=BlockSizes(**blocks))

  def __call__(
      self,
      query_states: jax.Array,
      key_states: jax.Array,
      value_states: jax.Array,
      bias: jax.Array | None = None,
      attention_mask: jax.Array | None = None,
      causal: bool = False,
      segment_ids: Any = None,
      deterministic: bool = True,
      *,
      query_sequence_length: int | None = None,
      key_value_sequence_length: int | None = None,
      return_weights: bool = False,
  ) -> AttentionOutput:
    """Runs the chosen mechanism.

    Args:
      query_states: `[B, Sq, H, D]`.
      key_states: `[B, Sk, Hkv, D]`.
      value_states: `[B, Sk, Hkv, D]`.
      bias: float, broadcastable to `[B, H, Sq, Sk]`.
      attention_mask: truthy (nonzero = visible); either `[B, Sk]` (a key
        padding mask, as transformer models pass it, read as `[B, 1, 1, Sk]`)
        or broadcastable to `[B, H, Sq, Sk]`.
      causal: causal masking (bottom-right aligned).
      segment_ids: `[B, S]` or a `(q_ids, kv_ids)` pair.
      deterministic: False applies `attention_dropout`.
      query_sequence_length, key_value_sequence_length: optional checks of
        Sq and Sk (the seed API passed them); a mismatch is an error.
      return_weights: also return attention weights (vanilla only).

    Returns:
      `fa.AttentionOutput`.
    """
    for what, given, axis_len in (
        ("query_sequence_length", query_sequence_length,
         query_states.shape[1]),
        ("key_value_sequence_length", key_value_sequence_length,
         key_states.shape[1])):
      if given is not None and given != axis_len:
        raise ValueError(f"{what} = {given} but the inputs have length "
                         f"{axis_len}.")
    mask = None
    if attention_mask is not None:
      mask = jnp.asarray(attention_mask)
      if mask.ndim == 2:
        mask = mask[:, None, None, :]
      mask = mask != 0 if mask.dtype != jnp.bool_ else mask
    attention = registry.create_attention(
        self.attn_mechanism, num_heads=self.num_attention_heads,
        head_dim=self.head_dims, name="attention", **self.options)
    return attention(query_states, key_states, value_states, mask=mask,
                     bias=bias, causal=causal, segment_ids=segment_ids,
                     deterministic=deterministic,
                     return_weights=return_weights)

  @staticmethod
  def test_attentions(
      axis_dims: tuple[int, ...] = (1, -1, 1, 1),
      axis_names: tuple[str, ...] = ("dp", "fsdp", "tp", "sp"),
      sequence_length: int = 1024,
      num_attention_heads: int = 8,
      num_key_value_heads: int | None = None,
      head_dims: int = 64,
      chunk_size: int | None = None,
      batch_size: int | None = None,
      dtype: str = "float32",
      causal: bool = True,
      mechanisms: tuple[str, ...] | None = None,
      partition_axis: PartitionAxis | None = None,
      repeats: int = 10,
  ) -> ComparisonReport:
    """Compares mechanisms on a mesh built from `axis_dims` (seed API).

    Args:
      axis_dims, axis_names: the mesh (`fa.make_mesh`).
      sequence_length: Sq = Sk.
      num_attention_heads, num_key_value_heads, head_dims: H, Hkv, D.
      chunk_size: tile size (`block_q = block_k`) for the mechanisms that
        tile.
      batch_size: B (default: the number of batch shards of the mesh).
      dtype, causal: the problem.
      mechanisms: names to compare (default: all registered).
      partition_axis: default `fa.PartitionAxis()`.
      repeats: timed calls per measurement.

    Returns:
      A `ComparisonReport`; `print` it for a table.
    """
    mesh = make_mesh(axis_dims, axis_names)
    partition_axis = partition_axis or PartitionAxis()
    if batch_size is None:
      batch_size = axis_size(mesh, partition_axis.batch_axis)
    blocks = None
    if chunk_size is not None:
      blocks = BlockSizes(block_q=chunk_size, block_k=chunk_size)
    return compare_attentions(
        mechanisms, batch_size=batch_size, sequence_length=sequence_length,
        num_heads=num_attention_heads, num_kv_heads=num_key_value_heads,
        head_dim=head_dims, dtype=dtype, causal=causal, block_sizes=blocks,
        mesh=mesh, partition_axis=partition_axis, repeats=repeats)
