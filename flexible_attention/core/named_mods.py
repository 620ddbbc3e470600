"""A small library of named score and mask modifications.

Each follows the contract of `core/mods.py` (broadcast arrays; global batch
and head indices; the semantics' positions) and reads its arrays from the
call's `mod_args`:

- `alibi_score_mod` (score_mod): `mod_args=(slopes [H] float,)`, e.g.
  `alibi_slopes(H)` or learned;
- `T5ScoreMod(bidirectional, num_buckets, max_distance)` (score_mod):
  `mod_args=(table [num_buckets, H] float,)`, learned;
- `prefix_lm_mask_mod` (mask_mod): `mod_args=(prefix_lengths [B] int,)`;
- `document_mask_mod` (mask_mod): `mod_args=(doc_ids [B, P] int,)`, indexed
  by position.

E.g. `fa.create_attention("blockwise", ..., score_mod=fa.alibi_score_mod)`
called with `mod_args=(fa.alibi_slopes(H),)` (or a learned `[H]`
parameter: gradients flow to it).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's head slopes (Press et al., 2022, "Train Short, Test Long").

  For H a power of two, the geometric sequence `2^(-8/H), 2^(-16/H), ...`;
  otherwise those of the largest power of two below H followed by every
  other slope of twice that (the paper's code).

  Returns:
    float32 `[H]`.
  """
  if isinstance(num_heads, bool) or not isinstance(num_heads, int) or (
      num_heads < 1):
    raise ValueError(f"num_heads must be a positive int, got {num_heads!r}.")

  def power_of_two(n):
    start = 2.0**(-8.0 / n)
    return [start**(i + 1) for i in range(n)]

  closest = 2**int(math.floor(math.log2(num_heads)))
  slopes = power_of_two(closest)
  if closest != num_heads:
    slopes += power_of_two(2 * closest)[0::2][:num_heads - closest]
  return np.asarray(slopes, np.float32)


def alibi_score_mod(score, batch, head, q_pos, kv_pos, slopes):
  """ALiBi: `score - slopes[head] * |q_pos - kv_pos|`.

  The symmetric form, which equals the paper's causal `slopes[head] *
  (kv_pos - q_pos)` on every key a causal mask leaves visible.

  Args:
    score: `[B, H, Sq, Sk]` logits (the contract of `core/mods.py`).
    batch, head, q_pos, kv_pos: the broadcast indices.
    slopes: float `[H]`, one slope per query head (`alibi_slopes(H)`, or
      learned).

  Returns:
    The logits with the linear distance penalty, `[B, H, Sq, Sk]`.
  """
  del batch
  distance = jnp.abs(q_pos - kv_pos).astype(score.dtype)  # [B, 1, Sq, Sk]
  return score - slopes.astype(score.dtype)[head] * distance


def t5_relative_position_bucket(relative_position, *, bidirectional: bool,
                                num_buckets: int, max_distance: int):
  """T5's bucket of `relative_position = kv_pos - q_pos` (Raffel et al.,
  2020; the rule of T5X's `_relative_position_bucket`).

  Bidirectional: half the buckets for keys after the query, half for the
  others; causal (`bidirectional=False`): keys after the query share
  bucket 0. Within a half, distances below `num_buckets // 2` (halved
  again when bidirectional) get a bucket each, larger ones logarithmically
  wider buckets up to `max_distance`, beyond which they share the last one.

  Returns:
    int32 buckets in `[0, num_buckets)`, shaped like `relative_position`.
  """
  n = -jnp.asarray(relative_position, jnp.int32)
  ret = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret = (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  large = max_exact + (
      jnp.log(n.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps)
      / math.log(max_distance / max_exact) *
      (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return ret + jnp.where(is_small, n, large)


@dataclasses.dataclass(frozen=True)
class T5ScoreMod:
  """T5's bucketed relative position bias as a score_mod:
  `score + table[bucket(kv_pos - q_pos), head]`, with
  `t5_relative_position_bucket`'s rule and a learned float table
  `[num_buckets, H]` passed as `mod_args=(table,)` (gradients flow to it).

  Attributes:
    bidirectional: True for encoders (separate buckets for keys after the
      query), False for decoders.
    num_buckets: rows of the table (T5: 32).
    max_distance: distance from which keys share the last bucket (T5: 128).
  """

  bidirectional: bool = True
  num_buckets: int = 32
  max_distance: int = 128

  def __post_init__(self):
    if not isinstance(self.bidirectional, bool):
      raise TypeError(f"bidirectional must be a bool, got "
                      f"{self.bidirectional!r}.")
    least = 4 if self.bidirectional else 2
    # The exact buckets: distances below max_exact each get one.
    max_exact = self.num_buckets // least if isinstance(
        self.num_buckets, int) else 0
    for name, value, low in (("num_buckets", self.num_buckets, least),
                             ("max_distance", self.max_distance,
                              max_exact + 1)):
      if isinstance(value, bool) or not isinstance(value, int) or (
          value < low):
        raise ValueError(f"{name} must be an int >= {low} here, got "
                         f"{value!r}.")

  def __call__(self, score, batch, head, q_pos, kv_pos, table):
    del batch
    if table.ndim != 2 or table.shape[0] != self.num_buckets:
      raise ValueError(f"the T5 table must be [num_buckets, H] = "
                       f"[{self.num_buckets}, H], got shape {table.shape}.")
    bucket = t5_relative_position_bucket(
        kv_pos - q_pos, bidirectional=self.bidirectional,
        num_buckets=self.num_buckets,
        max_distance=self.max_distance)  # [B, 1, Sq, Sk]
    return score + table.astype(score.dtype)[bucket, head]


def prefix_lm_mask_mod(batch, head, q_pos, kv_pos, prefix_lengths):
  """Prefix-LM: key visible iff it is in the row's prefix (`kv_pos <
  prefix_lengths[batch]`, seen by every query) or not after the query
  (`kv_pos <= q_pos`).

  Use it without `causal=True` (which would hide the prefix's later keys
  from its earlier queries again).

  Args:
    batch, head, q_pos, kv_pos: the broadcast indices (`core/mods.py`).
    prefix_lengths: int `[B]`, each row's prefix length in positions.

  Returns:
    bool `[B, 1, Sq, Sk]`.
  """
  del head
  return (kv_pos < prefix_lengths[batch]) | (kv_pos <= q_pos)


def document_mask_mod(batch, head, q_pos, kv_pos, doc_ids):
  """Document mask: key visible iff it is in the query's document,
  `doc_ids[batch, q_pos] == doc_ids[batch, kv_pos]`.

  `doc_ids [B, P]` gives the document of each POSITION (not of each array
  slot), so it holds under any token layout and sharding: P must exceed
  every position of the call (with the default positions P = Sk, the
  queries being positions `Sk - Sq ...`; with a KV cache P = its length L;
  positions out of range are clamped by JAX's indexing). With the default
  positions and Sq == Sk it is `segment_ids=doc_ids`.

  Args:
    batch, head, q_pos, kv_pos: the broadcast indices (`core/mods.py`).
    doc_ids: int `[B, P]` document ids per position.

  Returns:
    bool `[B, 1, Sq, Sk]`.
  """
  del head
  return doc_ids[batch, q_pos] == doc_ids[batch, kv_pos]
