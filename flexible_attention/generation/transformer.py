"""A small decoder-only Haiku transformer that decodes with a KV cache.

`Transformer` is the model of the generation job (`generation/generate.py`):
token and position embeddings, `num_layers` pre-norm blocks (self-attention,
then a GELU MLP, each added to the residual stream), a final norm and the
unembedding. One parameter tree serves three ways of running it:

- `mode="full"`: one causal forward over whole sequences, no cache (the
  check's oracle and training's forward);
- `mode="dense"`: the attention is `fa.MultiHeadAttention(..., decode=True,
  max_cache_length=L)`, its dense cache in Haiku state
  (`hk.transform_with_state`): a call appends its tokens to the cache and
  attends to everything cached so far;
- `mode="paged"`: each block's attention projects like `fa.MultiHeadAttention`
  (the same `query`/`key`/`value`/`linear` parameters) and calls
  `fa.create_attention(...)` with an explicit `cache=` (one
  `fa.PagedKVCache`, or any cache, per layer), returning the updated caches.

Positions are learned absolute embeddings (`max_length` of them); the caller
passes each token's position (during decoding, the row's cache length).

Glossary of shapes:
- B: batch size; T: tokens in the call (prompt, chunk or 1 when decoding).
- V: vocabulary size; M: model size (default H * D).
- H, Hkv, D: attention heads, key/value heads, head size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from flexible_attention.mechanisms import registry
from flexible_attention.modules.multi_head import MultiHeadAttention

MODES = ("full", "dense", "paged")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """The model's sizes and how its attention runs.

  Attributes:
    vocab_size: V.
    num_layers: transformer blocks.
    num_heads: H.
    num_kv_heads: Hkv (H % Hkv == 0).
    head_dim: D.
    mlp_size: hidden units of each block's MLP.
    max_length: positions the model embeds; also the dense cache's length L.
    model_size: M (default H * D).
    mechanism: the attention mechanism (`fa.available_mechanisms()`).
    dtype: parameters' and activations' dtype (logits are float32).
    attention_options: extra options of the attention modules, as `(name,
      value)` pairs (e.g. `(("interpret", True),)` for flash on CPU).
  """

  vocab_size: int = 512
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_size: int = 512
  max_length: int = 128
  model_size: int | None = None
  mechanism: str = "vanilla"
  dtype: str = "float32"
  attention_options: tuple[tuple[str, Any], ...] = ()

  @property
  def width(self) -> int:
    """M, the residual stream's size."""
    return self.model_size or self.num_heads * self.head_dim

  def with_mechanism(self, mechanism: str, **options) -> "TransformerConfig":
    return dataclasses.replace(self, mechanism=mechanism,
                               attention_options=tuple(sorted(options.items())))


def _w_init(fan_in: int):
  return hk.initializers.TruncatedNormal(stddev=1.0 / math.sqrt(fan_in))


class CachedSelfAttention(hk.Module):
  """Self-attention with an explicit cache: `fa.MultiHeadAttention`'s
  projections (same parameter names) around `fa.create_attention(...)(q, k,
  v, cache=cache, causal=True)`."""

  def __init__(self, config: TransformerConfig, name: str | None = None):
    super().__init__(name=name)
    self.config = config

  def __call__(self, x: jax.Array, cache) -> tuple[jax.Array, Any]:
    """Attends `x [B, T, M]` (appended to `cache`) to the cached tokens.

    Returns:
      `(out [B, T, M], the updated cache)`.
    """
    c = self.config
    batch, length, _ = x.shape
    project = lambda heads, name: hk.Linear(
        heads * c.head_dim, w_init=_w_init(x.shape[-1]), name=name)(x).reshape(
            batch, length, heads, c.head_dim)
    q = project(c.num_heads, "query")  # [B, T, H, D]
    k = project(c.num_kv_heads, "key")  # [B, T, Hkv, D]
    v = project(c.num_kv_heads, "value")  # [B, T, Hkv, D]
    attention = registry.create_attention(
        c.mechanism, num_heads=c.num_heads, head_dim=c.head_dim,
        num_kv_heads=c.num_kv_heads, name="attention",
        **dict(c.attention_options))
    result = attention(q, k, v, cache=cache, causal=True)
    out = result.attention_outputs.reshape(batch, length,
                                           c.num_heads * c.head_dim)
    out = hk.Linear(c.width, w_init=_w_init(out.shape[-1]), name="linear")(out)
    return out, result.cache


class Transformer(hk.Module):
  """A decoder-only transformer (module docstring): tokens to logits."""

  def __init__(self, config: TransformerConfig, mode: str = "full",
               name: str | None = "transformer"):
    super().__init__(name=name)
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    self.config = config
    self.mode = mode

  def __call__(self, tokens: jax.Array, positions: jax.Array,
               caches: Sequence[Any] | None = None, *,
               last: int | None = None):
    """Runs the model.

    Args:
      tokens: `[B, T]` int token ids.
      positions: `[B, T]` int positions (< max_length).
      caches: `mode="paged"` only: one cache per layer.
      last: compute logits only for the last `last` tokens (default all).

    Returns:
      `logits [B, T or last, V]` float32; with `mode="paged"`, `(logits,
      the updated caches)`.
    """
    c = self.config
    if (caches is None) != (self.mode != "paged"):
      raise ValueError("caches are passed with mode='paged' and only then.")
    dtype = jnp.dtype(c.dtype)
    x = hk.Embed(c.vocab_size, c.width, name="embed")(tokens)
    x = x + hk.Embed(c.max_length, c.width, name="position_embed")(positions)
    x = x.astype(dtype)  # [B, T, M]
    new_caches = []
    for i in range(c.num_layers):
      with hk.experimental.name_scope(f"block_{i}"):
        h = _norm(x, "attention_norm")
        if self.mode == "paged":
          h, cache = CachedSelfAttention(c, name="attention")(h, caches[i])
          new_caches.append(cache)
        else:
          options = dict(c.attention_options)
          if self.mode == "dense":
            options.update(decode=True, max_cache_length=c.max_length)
          h = MultiHeadAttention(
              c.num_heads, c.head_dim, w_init=_w_init(c.width),
              model_size=c.width, mechanism=c.mechanism,
              num_kv_heads=c.num_kv_heads, name="attention", **options)(
                  h, h, h, causal=True)
        x = x + h.astype(dtype)
        h = _norm(x, "mlp_norm")
        h = hk.Linear(c.mlp_size, w_init=_w_init(c.width), name="mlp_in")(h)
        h = hk.Linear(c.width, w_init=_w_init(c.mlp_size), name="mlp_out")(
            jax.nn.gelu(h))
        x = x + h.astype(dtype)
    if last is not None:
      x = x[:, -last:]
    x = _norm(x, "final_norm")
    logits = hk.Linear(c.vocab_size, w_init=_w_init(c.width),
                       name="unembed")(x).astype(jnp.float32)  # [B, T, V]
    return (logits, new_caches) if self.mode == "paged" else logits


def _norm(x, name):
  """LayerNorm computed in float32, returned in x's dtype."""
  return hk.LayerNorm(-1, create_scale=True, create_offset=True, name=name)(
      x.astype(jnp.float32)).astype(x.dtype)
