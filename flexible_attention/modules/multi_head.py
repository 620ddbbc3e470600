"""`fa.MultiHeadAttention`: a drop-in for `hk.MultiHeadAttention`."""

from __future__ import annotations

import math
import warnings
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from flexible_attention.mechanisms import registry


class MultiHeadAttention(hk.Module):
  """Multi-headed attention with a choice of attention mechanism.

  A drop-in replacement for `hk.MultiHeadAttention`: the same constructor and
  call arguments, the same parameters (`query`, `key`, `value` and `linear`,
  each with `w` and `b`), so checkpoints load unchanged, and the same output
  for the same parameters with `mechanism="vanilla"` (up to floating-point
  rounding). It adds `mechanism=` (default `"auto"`), `num_kv_heads=`
  (grouped-query attention: the `key`/`value` projections then have
  `num_kv_heads * key_size` outputs) and the attention options of
  `fa.create_attention`.

  Leading dimensions of key, value, mask and bias broadcast against the
  query's as in Haiku; float64 inputs (with `jax_enable_x64`) are computed in
  float64 by the mechanisms that can (`vanilla`, `blockwise`; `auto` picks
  them) and refused clearly by the others. The differences from Haiku (the
  README lists the same):

  - a query whose mask hides every key gets zeros (Haiku's `-1e30` logits
    average the values uniformly instead);
  - logits are `(q . k) * K ** -0.5` accumulated in float32 (float64 for
    float64 inputs), where Haiku computes `(q . k) / sqrt(K)` and the softmax
    in the inputs' dtype: rounding-level differences in float32, smaller
    errors than Haiku's in bfloat16 / float16;
  - the default `mechanism="auto"` may run another algorithm than Haiku's
    dense one (cuDNN, the fused kernels, blockwise): the same function up to
    rounding; `mechanism="vanilla"` is the dense one;
  - key, value, mask or bias leading dimensions that do not broadcast to
    the query's (e.g. larger ones, on which Haiku fails in a final reshape)
    are a `ValueError` before anything runs.

  Glossary of shapes:
  - T: query sequence length; T': key/value sequence length.
  - D: embedding size.
  - H: number of query heads; Hkv: number of key/value heads.
  - K: key size; V: value size.
  """

  def __init__(
      self,
      num_heads: int,
      key_size: int,
      w_init_scale: float | None = None,
      *,
      w_init: hk.initializers.Initializer | None = None,
      with_bias: bool = True,
      b_init: hk.initializers.Initializer | None = None,
      value_size: int | None = None,
      model_size: int | None = None,
      mechanism: str = "auto",
      num_kv_heads: int | None = None,
      sinks: bool = False,
      name: str | None = None,
      **attention_options: Any,
  ):
    """Initialises the module.

    Args:
      num_heads: H.
      key_size: K, the size of queries and keys per head.
      w_init_scale: DEPRECATED (as in Haiku): use `w_init`.
      w_init: initialiser of the projection weights (required unless
        `w_init_scale` is given).
      with_bias: whether the projections have biases.
      b_init: initialiser of the biases (default zeros).
      value_size: V (default K).
      model_size: output size (default K * H).
      mechanism: attention mechanism name (`fa.available_mechanisms()`).
      num_kv_heads: Hkv (default H).
      sinks: learn one attention-sink logit per query head: an `[H]`
        parameter `"sinks"` (initialised to zeros) whose `exp` joins each
        head's softmax denominator (the README's semantics). Off, the
        parameter tree is Haiku's.
      name: module name.
      **attention_options: options of `fa.create_attention` (`sm_scale`,
        `dropout_rate`, `logits_soft_cap`, `sliding_window`, `dtype`,
        `precision`, `block_sizes`, `mesh`, `partition_axis`, `decode`,
        `max_cache_length`, `score_mod`, `mask_mod`, ...).
    """
    super().__init__(name=name)
    if w_init_scale is not None:
      warnings.warn("w_init_scale is deprecated; please pass an explicit "
                    "weight initialiser instead.", DeprecationWarning)
    if w_init and w_init_scale:
      raise ValueError("Please provide only `w_init`, not `w_init_scale`.")
    if w_init is None and w_init_scale is None:
      raise ValueError("Please provide a weight initializer: `w_init`.")
    if w_init is None:
      w_init = hk.initializers.VarianceScaling(w_init_scale)
    self.num_heads = num_heads
    self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    self.key_size = key_size
    self.value_size = value_size or key_size
    self.model_size = model_size or key_size * num_heads
    self.w_init = w_init
    self.with_bias = with_bias
    self.b_init = b_init
    registry.get_mechanism(mechanism)  # Fails early on an unknown name.
    self.mechanism = mechanism
    if not isinstance(sinks, bool):
      raise TypeError(f"sinks must be a bool, got {sinks!r}.")
    self.sinks = sinks
    self.attention_options = attention_options

  def __call__(
      self,
      query: jax.Array,
      key: jax.Array,
      value: jax.Array,
      mask: jax.Array | None = None,
      *,
      bias: jax.Array | None = None,
      causal: bool = False,
      segment_ids: Any = None,
      kv_lengths: jax.Array | None = None,
      q_positions: jax.Array | None = None,
      kv_positions: jax.Array | None = None,
      deterministic: bool = True,
      mod_args: tuple[Any, ...] = (),
  ) -> jax.Array:
    """Computes (optionally masked) multi-head attention.

    Broadcasts over zero or more leading batch dimensions `[...]` (the
    query's), as Haiku does: the leading dimensions of key, value, mask,
    bias and the per-row arguments may be 1 or missing (key/value) where
    the query's are larger.

    Args:
      query: `[..., T, D_q]` embeddings to compute queries from.
      key: `[..., T', D_k]` embeddings to compute keys from.
      value: `[..., T', D_v]` embeddings to compute values from.
      mask: optional truthy mask `[..., H|1, T, T']` (rank of the logits, as
        in Haiku): nonzero = visible.
      bias: optional float `[..., H|1, T, T']` added to the logits.
      causal, segment_ids, kv_lengths, q_positions, kv_positions,
        deterministic: as `fa.AttentionModule.__call__`, with the batch axis
        `B` = the flattened leading dimensions (`[...]`, `[..., T]`,
        `[..., T']`).
      mod_args: the arrays of the `score_mod` / `mask_mod` options (only
        with a mod); their `batch` index is the row of the flattened
        leading dimensions.

    Returns:
      `[..., T, model_size]`.
    """
    if getattr(query, "ndim", 0) < 2:
      raise ValueError("query must be [..., T, D_q] (rank >= 2), got shape "
                       f"{jnp.shape(query)}.")
    *leading, q_len, _ = query.shape
    leading = tuple(leading)
    batch = math.prod(leading)
    rank = len(leading) + 3  # Rank of Haiku's logits [..., H, T, T'].

    def check_leading(what, lead):
      """`lead` broadcasts to the query's leading dimensions."""
      try:
        ok = jnp.broadcast_shapes(tuple(lead), leading) == leading
      except ValueError:
        ok = False
      if not ok:
        raise ValueError(
            f"the leading dimensions of {what}, {tuple(lead)}, must "
            f"broadcast to the query's, {leading}.")

    for what, x in (("key", key), ("value", value)):
      if getattr(x, "ndim", 0) < 2:
        raise ValueError(f"{what} must be [..., T', D] (rank >= 2), got "
                         f"shape {jnp.shape(x)}.")
      check_leading(what, x.shape[:-2])

    def flat(x, trailing: int, what: str):
      """`[*lead, *rest]` (lead broadcasting to the query's) ->
      `[B|1, *rest]`, where `rest` are the last `trailing` axes."""
      if x is None:
        return None
      x = jnp.asarray(x)
      lead, rest = x.shape[:x.ndim - trailing], x.shape[x.ndim - trailing:]
      check_leading(what, lead)
      if all(d == 1 for d in lead):
        return x.reshape((1,) + rest)
      x = jnp.broadcast_to(x, leading + rest)
      return x.reshape((batch,) + rest)

    def flat_logits(x, what):  # [..., H|1, T, T'] -> [B|1, H|1, T, T'].
      if x is None:
        return None
      if x.ndim != rank:
        raise ValueError(f"{what} dimensionality {x.ndim} must match logits "
                         f"dimensionality {rank}.")
      return flat(x, 3, what)

    def flat_rows(x, trailing, what):  # Per-row arguments: always [B, ...].
      if x is None:
        return None
      x = jnp.asarray(x)
      if x.ndim != len(leading) + trailing:
        raise ValueError(f"{what} must have the query's leading dimensions "
                         f"{leading} then {trailing} more, got shape "
                         f"{x.shape}.")
      x = flat(x, trailing, what)
      return jnp.broadcast_to(x, (batch,) + x.shape[1:])

    def flat_heads(x):  # [..., T', H, K] -> [B, T', H, K].
      # Fewer leading dimensions than the query's broadcast, as in einsum.
      x = x.reshape((1,) * (len(leading) + 3 - x.ndim) + x.shape)
      return flat_rows(x, 3, "key/value")

    query_heads = flat_heads(self._projection(
        query, self.num_heads, self.key_size, "query"))  # [B, T, H, K]
    key_heads = flat_heads(self._projection(
        key, self.num_kv_heads, self.key_size, "key"))  # [B, T', Hkv, K]
    value_heads = flat_heads(self._projection(
        value, self.num_kv_heads, self.value_size,
        "value"))  # [B, T', Hkv, V]
    if mask is not None:
      mask = flat_logits(jnp.asarray(mask), "Mask") != 0
    if segment_ids is not None:
      segment_ids = (tuple(flat_rows(s, 1, "segment_ids") for s in
                           segment_ids)
                     if isinstance(segment_ids, (tuple, list)) else
                     flat_rows(segment_ids, 1, "segment_ids"))
    options = dict(sm_scale=self.key_size**-0.5)
    options.update(self.attention_options)
    attention = registry.create_attention(
        self.mechanism, num_heads=self.num_heads, head_dim=self.key_size,
        num_kv_heads=self.num_kv_heads, value_dim=self.value_size,
        name="attention", **options)
    attn = attention(
        query_heads, key_heads, value_heads, mask=mask,
        bias=flat_logits(bias, "Bias"), causal=causal,
        segment_ids=segment_ids,
        kv_lengths=flat_rows(kv_lengths, 0, "kv_lengths"),
        q_positions=flat_rows(q_positions, 1, "q_positions"),
        kv_positions=flat_rows(kv_positions, 1, "kv_positions"),
        sinks=(hk.get_parameter("sinks", [self.num_heads], init=jnp.zeros)
               if self.sinks else None),  # [H]
        mod_args=mod_args,
        deterministic=deterministic).attention_outputs  # [B, T, H, V]
    attn = attn.reshape((*leading, q_len, self.num_heads * self.value_size))
    final_projection = hk.Linear(self.model_size, w_init=self.w_init,
                                 with_bias=self.with_bias, b_init=self.b_init)
    return final_projection(attn)  # [..., T, model_size]

  @hk.transparent
  def _projection(self, x, num_heads: int, head_size: int, name: str):
    y = hk.Linear(num_heads * head_size, w_init=self.w_init,
                  with_bias=self.with_bias, b_init=self.b_init, name=name)(x)
    return y.reshape((*x.shape[:-1], num_heads, head_size))  # [..., T, H, K]
