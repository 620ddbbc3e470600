"""The one dropout keep-mask of the library.

Whether attention probability `p[b, h, i, j]` is kept is a pure function of
(seed, batch row, query head, query position, key position), computed with
32-bit unsigned integer arithmetic only (multiply, xor, shift). That makes it
usable unchanged inside Pallas kernels, and it makes dropout bit-identical
across mechanisms, block sizes, shardings and token layouts: no mechanism
draws random numbers of its own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)
_M1 = np.uint32(0x85EBCA6B)
_M2 = np.uint32(0xC2B2AE35)


def _fmix32(h):
  """MurmurHash3's 32-bit finaliser: a bijection that avalanches all bits."""
  h = h ^ (h >> 16)
  h = h * _M1
  h = h ^ (h >> 13)
  h = h * _M2
  return h ^ (h >> 16)


def _u32(x):
  return jnp.asarray(x).astype(jnp.uint32)


def mix(h, coordinate):
  """The running hash `h` (uint32) with one more integer coordinate: one
  multiply-add and MurmurHash3's finaliser.

  `dropout_bits` is `mix(mix(mix(mix(mix(seed[0], seed[1]), batch), head),
  q_pos), kv_pos)`: kernels mix what a program or a row shares once and
  broadcast it, so an element costs one `mix`."""
  return _fmix32((h ^ _u32(coordinate)) * _GOLDEN + _M2)


def dropout_bits(seed, batch, head, q_pos, kv_pos):
  """Hashes the coordinates of attention probabilities to uint32 words.

  Args:
    seed: uint32 `[2]`, from `seed_from_key`.
    batch, head, q_pos, kv_pos: integer arrays broadcastable to each other:
      the global batch row, the query head, and the query and key positions.

  Returns:
    uint32 array of the broadcast shape, uniformly distributed. For a fixed
    row (seed, batch, head, q_pos) the words are a bijection of `kv_pos`,
    finalised once (the last `mix`).
  """
  h = mix(_u32(seed[0]), seed[1])
  for coordinate in (batch, head, q_pos, kv_pos):
    h = mix(h, coordinate)
  return h


def keep_threshold(rate: float) -> np.uint32:
  """The uint32 threshold under which a probability is dropped."""
  return np.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))


def dropout_keep(seed, batch, head, q_pos, kv_pos, rate: float):
  """The keep decisions (bool) for `rate` at the given coordinates."""
  return dropout_bits(seed, batch, head, q_pos, kv_pos) >= keep_threshold(rate)


def seed_from_key(key) -> jax.Array:
  """Turns a JAX PRNG key (typed or raw) into the hash's uint32 `[2]` seed."""
  return jax.random.bits(key, (2,), jnp.uint32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Dropout:
  """Dropout as kernels see it.

  Attributes:
    seed: uint32 `[2]`.
    batch_offset: int32 scalar, the global index of the kernel's first batch
      row (non-zero inside a batch-sharded `shard_map`).
    head_offset: int32 scalar, the global index of the kernel's first query
      head (non-zero inside a head-sharded `shard_map`).
    rate: static float in (0, 1).
  """

  seed: jax.Array
  batch_offset: jax.Array
  head_offset: jax.Array
  rate: float = dataclasses.field(metadata=dict(static=True))

  def keep(self, batch, head, q_pos, kv_pos):
    """Keep decisions at local batch/head indices and positions."""
    return dropout_keep(self.seed, batch + self.batch_offset,
                        head + self.head_offset, q_pos, kv_pos, self.rate)

  def with_offsets(self, batch_offset, head_offset) -> Dropout:
    return dataclasses.replace(
        self, batch_offset=self.batch_offset + batch_offset,
        head_offset=self.head_offset + head_offset)


def make_dropout(key, rate: float) -> Dropout:
  """A `Dropout` for the whole (unsharded) problem."""
  zero = jnp.zeros((), jnp.int32)
  return Dropout(seed=seed_from_key(key), batch_offset=zero, head_offset=zero,
                 rate=float(rate))


def keep_grouped(dropout: Dropout, q_positions, kv_positions, num_kv_heads: int,
                 groups: int):
  """Keep decisions in the grouped-query layout `[B, Hkv, G, Sq, Sk]`.

  Args:
    dropout: the `Dropout` of the call (offsets already applied for shards).
    q_positions: `[B, Sq]` int positions of the tile's queries.
    kv_positions: `[B, Sk]` int positions of the tile's keys.
    num_kv_heads: Hkv held by the kernel.
    groups: G, query heads per KV head.
  """
  batch = jnp.arange(q_positions.shape[0])[:, None, None, None, None]
  head = (jnp.arange(num_kv_heads)[:, None] * groups +
          jnp.arange(groups)[None, :])[None, :, :, None, None]
  return dropout.keep(batch, head, q_positions[:, None, None, :, None],
                      kv_positions[:, None, None, None, :])
