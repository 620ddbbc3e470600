"""`fa.FlexibleAttentionModule`: the seed-compatible facade.

It accepts the arguments of the module this project started from (EasyDeL's
`FlexibleAttentionModule`: `attn_mechanism=`, `num_attention_heads=`,
`head_dims=`, the `block_*` sizes, `shard_attention_computation=`, ...) and
maps them onto `fa.create_attention`. Every argument has a stated meaning:
it reaches the mechanism, or is checked, or is accepted for compatibility
with the reason it cannot change the result (see `__init__`). Nothing that
changes the result is dropped.
"""

from __future__ import annotations

from typing import Any, Callable

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


def _check_bool(name: str, value) -> bool:
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be a bool, got {value!r}.")
  return value


def _canonical_precision(precision):
  """`lax.Precision.DEFAULT` (EasyDeL's `lax.Precision("fastest")`) is the
  backend's default matmul precision, which is what `None` means: it becomes
  None, so that mechanisms without a precision setting accept it."""
  if isinstance(precision, str):
    precision = jax.lax.Precision(precision)
  if precision == jax.lax.Precision.DEFAULT:
    return None
  return precision


class FlexibleAttentionModule(hk.Module):
  """Attention by mechanism name, with the seed project's argument names.

  Builds `fa.create_attention(attn_mechanism, ...)` on each call (inside
  `hk.transform`, like any Haiku module) and returns its
  `fa.AttentionOutput`. Mechanism names may be the aliases EasyDeL configs
  use (`"flash_attn2"`, `"jax_flash_attn2"`, `"sdpa"`, ...:
  `fa.mechanisms.registry.ALIASES`).

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
      shard_attention_computation: bool = True,
      force_float32_tpu: bool = False,
      scan_ring_attention: bool = True,
      sinks: bool = False,
      score_mod: Callable | None = None,
      mask_mod: Callable | None = None,
      name: str | None = None,
      **mechanism_options: Any,
  ):
    """Initialises the module.

    Args:
      num_attention_heads: H.
      head_dims: D.
      attn_mechanism: a name from `fa.available_mechanisms()` or one of the
        aliases of EasyDeL's names (`registry.ALIASES`).
      num_key_value_heads: Hkv (default H).
      attention_dropout: dropout rate (applied with `deterministic=False`).
      sm_scale: softmax scale (default `D ** -0.5`).
      mesh, partition_axis: sharding (see `fa.PartitionAxis`; its
        `attention_dim_axis` must be None or a mesh axis of size 1).
      dtype: compute dtype (q, k, v are cast to it; the output is cast back
        to the query's dtype).
      precision: matmul precision (`jax.lax.Precision` or its string name).
        `Precision.DEFAULT` (which EasyDeL's `"fastest"` is) means the
        backend's default, as `None` does, and is passed as None; any other
        value reaches the mechanism (refused by those without a precision
        setting).
      logits_soft_cap, sliding_window: as `fa.create_attention`.
      block_q ... block_b: tile hints. Tiles never change the result, only
        speed and memory, so the facade passes a mechanism named here the
        fields it reads (`fa.capabilities(name).block_size_fields`, checked
        by it as usual) and leaves out the rest: EasyDeL configs set every
        field (`block_b` and the `*_major` ones, which no mechanism here
        reads) for whichever mechanism. With `"auto"` (and `"sdpa"`) none
        are passed: the mechanism `auto` picks uses its own tiles (name a
        mechanism to set them).
      shard_attention_computation: True (default): with a `mesh`, run the
        attention under `shard_map` as `partition_axis` says. False: run it
        unsharded (`mesh` and `partition_axis` are not passed on; under
        `jit`, XLA partitions it from its inputs' shardings). The result is
        the same either way.
      force_float32_tpu: True: when the attention runs on a TPU, cast q, k
        and v to float32 for it (the output is cast back to the query's
        dtype), as EasyDeL did for its TPU kernels; it overrides `dtype`
        there. No effect on other platforms. Default False.
      scan_ring_attention: accepted for compatibility; no effect. EasyDeL
        chose between a `lax.scan` and an unrolled loop over the ring's
        steps; `ring` here always unrolls them (so that each step's
        transfer overlaps the previous step's compute), which computes the
        same result. Must be a bool.
      sinks: learn one attention-sink logit per query head (an `[H]`
        parameter `"sinks"`, zeros at init; the README's semantics).
      score_mod, mask_mod: user score / mask modifications (as
        `fa.create_attention`; the contract: `core/mods.py`), whose arrays
        each call passes as `mod_args`.
      name: module name.
      **mechanism_options: options of the mechanism itself (e.g. `flash`'s
        `interpret=True`, `ring`'s `layout=`, `ulysses`'
        `local_mechanism=`), passed on to `fa.create_attention`.
    """
    super().__init__(name=name)
    mechanism = registry.resolve_name(attn_mechanism)
    self.shard_attention_computation = _check_bool(
        "shard_attention_computation", shard_attention_computation)
    self.force_float32_tpu = _check_bool("force_float32_tpu",
                                         force_float32_tpu)
    self.scan_ring_attention = _check_bool("scan_ring_attention",
                                           scan_ring_attention)
    self.sinks = _check_bool("sinks", sinks)
    blocks = BlockSizes(
        block_q=block_q, block_k=block_k, block_q_dkv=block_q_dkv,
        block_k_dkv=block_k_dkv, block_q_dq=block_q_dq, block_k_dq=block_k_dq,
        block_k_major=block_k_major, block_q_major_dkv=block_q_major_dkv,
        block_k_major_dkv=block_k_major_dkv,
        block_k_major_dq=block_k_major_dq, block_b=block_b)  # Checks values.
    self.attn_mechanism = mechanism
    self.num_attention_heads = num_attention_heads
    self.head_dims = head_dims
    self.mesh = mesh
    self.block_sizes = blocks
    self.options = dict(
        num_kv_heads=num_key_value_heads, dropout_rate=attention_dropout,
        sm_scale=sm_scale, dtype=dtype,
        precision=_canonical_precision(precision),
        logits_soft_cap=logits_soft_cap, sliding_window=sliding_window,
        score_mod=score_mod, mask_mod=mask_mod, **mechanism_options)
    if shard_attention_computation:
      self.options.update(mesh=mesh, partition_axis=partition_axis)
    elif partition_axis is not None and mesh is None:
      raise ValueError("partition_axis was given without a mesh; pass mesh=.")

  def _platform(self) -> str:
    if self.mesh is not None:
      return self.mesh.devices.flat[0].platform
    return jax.default_backend()

  def _read_block_sizes(self, platform: str) -> BlockSizes:
    """The tile hints the mechanism reads on `platform` (see `__init__`)."""
    if self.attn_mechanism == "auto":
      return BlockSizes()
    record = registry.capabilities(
        self.attn_mechanism,
        None if self.options.get("interpret") else platform)
    return BlockSizes(**{f: getattr(self.block_sizes, f)
                         for f in record.block_size_fields})

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
      mod_args: tuple[Any, ...] = (),
  ) -> AttentionOutput:
    """Runs the chosen mechanism.

    Args:
      query_states: `[B, Sq, H, D]`.
      key_states: `[B, Sk, Hkv, D]`.
      value_states: `[B, Sk, Hkv, D]`.
      bias: float, broadcastable to `[B, H, Sq, Sk]` (EasyDeL's additive
        masks, e.g. `finfo.min` where hidden, work as they are).
      attention_mask: truthy (nonzero = visible); either `[B, Sk]` (a key
        padding mask, as transformer models pass it, read as `[B, 1, 1, Sk]`)
        or broadcastable to `[B, H, Sq, Sk]`.
      causal: causal masking (bottom-right aligned).
      segment_ids: `[B, S]` or a `(q_ids, kv_ids)` pair.
      deterministic: False applies `attention_dropout`.
      query_sequence_length, key_value_sequence_length: optional checks of
        Sq and Sk (the seed API passed them); a mismatch is an error.
      return_weights: also return attention weights (vanilla only).
      mod_args: the arrays of `score_mod` / `mask_mod` (only with a mod).

    Returns:
      `fa.AttentionOutput`.
    """
    for what, given, x, axis in (
        ("query_sequence_length", query_sequence_length, query_states, 1),
        ("key_value_sequence_length", key_value_sequence_length, key_states,
         1)):
      if given is None:
        continue
      if getattr(x, "ndim", 0) != 4:
        raise ValueError(f"{what} was given but the inputs are not "
                         f"[B, S, H, D]: got shape {jnp.shape(x)}.")
      if given != x.shape[axis]:
        raise ValueError(f"{what} = {given} but the inputs have length "
                         f"{x.shape[axis]}.")
    mask = None
    if attention_mask is not None:
      mask = jnp.asarray(attention_mask)
      if mask.ndim == 2:
        mask = mask[:, None, None, :]
      mask = mask != 0 if mask.dtype != jnp.bool_ else mask
    platform = self._platform()
    options = dict(self.options, block_sizes=self._read_block_sizes(platform))
    if self.force_float32_tpu and platform == "tpu":
      options["dtype"] = jnp.float32
    attention = registry.create_attention(
        self.attn_mechanism, num_heads=self.num_attention_heads,
        head_dim=self.head_dims, name="attention", **options)
    sinks = (hk.get_parameter("sinks", [self.num_attention_heads],
                              init=jnp.zeros) if self.sinks else None)  # [H]
    return attention(query_states, key_states, value_states, mask=mask,
                     bias=bias, causal=causal, segment_ids=segment_ids,
                     sinks=sinks, mod_args=mod_args,
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
