"""Public value types: block sizes, the attention output and the KV cache."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes for the mechanisms that tile the attention matrix.

  Every field is optional: `None` lets the mechanism pick its default. Block
  sizes never change the result, only speed and memory. A mechanism reads only
  some fields (see `fa.capabilities(name).block_size_fields`); setting a field
  that the chosen mechanism does not read is an error, never silently ignored.

  The names follow JAX's Pallas TPU flash attention so that configs written
  for it carry over: `block_q`/`block_k` tile the forward pass,
  `block_q_dkv`/`block_k_dkv` the dK/dV backward pass, `block_q_dq`/
  `block_k_dq` the dQ backward pass; the `*_major` and `block_b` fields are the
  TPU kernel's outer tiles.
  """

  block_q: int | None = None
  block_k: int | None = None
  block_q_dkv: int | None = None
  block_k_dkv: int | None = None
  block_q_dq: int | None = None
  block_k_dq: int | None = None
  block_k_major: int | None = None
  block_q_major_dkv: int | None = None
  block_k_major_dkv: int | None = None
  block_k_major_dq: int | None = None
  block_b: int | None = None

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value is None:
        continue
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"BlockSizes.{field.name} must be a positive int or None, "
            f"got {value!r}.")

  def set_fields(self) -> tuple[str, ...]:
    """Names of the fields that are not `None`."""
    return tuple(f.name for f in dataclasses.fields(self)
                 if getattr(self, f.name) is not None)


class AttentionOutput(NamedTuple):
  """What every attention module returns (a pytree).

  Attributes:
    attention_outputs: `[B, Sq, H, Dv]`, in the query's dtype.
    attention_weights: `[B, H, Sq, Sk]` probabilities actually applied to the
      values (after dropout), or `None` unless `return_weights=True`.
    cache: the updated cache (`KVCache` or `PagedKVCache`, the kind the
      call was given) when the call was given one, else `None`.
    lse: `[B, H, Sq]` float32 log-sum-exp of each query's visible logits
      (-inf for a query that sees no key) when `return_lse=True`, else
      `None`; `fa.merge_attention` combines calls over disjoint keys by it.
  """

  attention_outputs: jax.Array
  attention_weights: jax.Array | None = None
  cache: Any = None
  lse: jax.Array | None = None


class KVCache(NamedTuple):
  """A key/value cache for incremental decoding (a pytree).

  Attributes:
    keys: `[B, L, Hkv, D]` where `L` is the maximum cache length.
    values: `[B, L, Hkv, Dv]`.
    lengths: `[B]` int32, how many slots of each row hold valid entries.
  """

  keys: jax.Array
  values: jax.Array
  lengths: jax.Array

  @property
  def max_length(self) -> int:
    return self.keys.shape[1]


def init_cache(batch_size: int, max_length: int, num_kv_heads: int,
               head_dim: int, dtype=jnp.float32, *,
               value_dim: int | None = None) -> KVCache:
  """Returns an empty `KVCache` (all lengths zero).

  Args:
    batch_size: B.
    max_length: L, the number of slots per row.
    num_kv_heads: Hkv.
    head_dim: D, the key size.
    dtype: dtype of the stored keys and values.
    value_dim: Dv, the value size (defaults to `head_dim`).

  Returns:
    A `KVCache` with `keys [B, L, Hkv, D]`, `values [B, L, Hkv, Dv]` zeros and
    `lengths [B]` zeros.
  """
  for name, value in (("batch_size", batch_size), ("max_length", max_length),
                      ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"init_cache: {name} must be a positive int, "
                       f"got {value!r}.")
  value_dim = head_dim if value_dim is None else value_dim
  return KVCache(
      keys=jnp.zeros((batch_size, max_length, num_kv_heads, head_dim), dtype),
      values=jnp.zeros((batch_size, max_length, num_kv_heads, value_dim),
                       dtype),
      lengths=jnp.zeros((batch_size,), jnp.int32))


class KernelOutput(NamedTuple):
  """What every pure attention kernel returns.

  Attributes:
    out: `[B, Sq, H, Dv]`.
    lse: `[B, H, Sq]` float32 log-sum-exp of the visible logits (`-inf` for a
      query that sees no key), or `None` for kernels that cannot report it.
    weights: `[B, H, Sq, Sk]` applied probabilities, or `None`.
  """

  out: jax.Array
  lse: jax.Array | None = None
  weights: jax.Array | None = None
