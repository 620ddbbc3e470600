"""Public value types: block sizes and the attention and kernel outputs
(the KV caches are in `core/cache.py`)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax


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
    cache: the updated cache (`fa.KVCache` or `fa.PagedKVCache`, the kind
      the call was given) when the call was given one, else `None`.
    lse: `[B, H, Sq]` float32 log-sum-exp of each query's visible logits
      (-inf for a query that sees no key) when `return_lse=True`, else
      `None`; `fa.merge_attention` combines calls over disjoint keys by it.
  """

  attention_outputs: jax.Array
  attention_weights: jax.Array | None = None
  cache: Any = None
  lse: jax.Array | None = None


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
