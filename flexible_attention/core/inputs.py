"""Validation and canonicalisation of an attention call.

`canonicalize` is the single place where user arguments are checked and turned
into the record every kernel consumes (`AttentionInputs`): rank-4 arrays,
default positions, a `Visibility`, a rank-4 bias. Every misuse raises here,
before anything is traced or compiled, with an error that names the argument,
what was expected and what was given.

Glossary of shapes:
- B: batch size.
- Sq, Sk: query and key sequence lengths.
- H, Hkv: query heads and key/value heads.
- D, Dv: query/key and value head sizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flexible_attention.core import mods as mods_lib
from flexible_attention.core.masks import Visibility

# Feature names, as used by capabilities, `auto` and errors.
FEATURES = ("causal", "window", "segments", "kv_lengths", "positions", "mask",
            "bias", "softcap", "dropout", "weights", "lse", "cache", "gqa",
            "sinks", "score_mod", "mask_mod")


@dataclasses.dataclass(frozen=True)
class AttentionDims:
  """The static sizes of one call."""

  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  value_dim: int

  @property
  def groups(self) -> int:
    return self.num_heads // self.num_kv_heads


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionInputs:
  """The canonical record of a call, as every kernel receives it.

  Attributes:
    query: `[B, Sq, H, D]`.
    key: `[B, Sk, Hkv, D]`.
    value: `[B, Sk, Hkv, Dv]`.
    bias: `[B|1, H|1, Sq|1, Sk|1]` float or `None`.
    visibility: the structured mask.
    pages: with a paged KV cache, the updated `PagedKVCache` whose dense
      view (gathered through its page table) `key` and `value` are, for
      kernels that read the pages themselves (XLA drops the gather when
      nothing reads it); `None` otherwise (and on a mesh, where kernels
      read the dense view).
    sinks: `[H]` float32 sink logits (semantics step 6: head h's softmax
      denominator gains `exp(sinks[h])`), or `None`.
    mods: the call's score / mask modifications (`core/mods.py`: the user's
      functions, `mod_args` and the shard's batch/head offsets), or `None`.
    overflow: with a KV cache, `[B]` bool: the rows whose cache overflowed
      (`core/cache.py`), whose outputs and lse the kernel makes NaN itself
      (`poison_overflow`); given only to the kernels of a mechanism that
      says it does (`Mechanism.poisons_overflow`), `None` otherwise (the
      module poisons their outputs).
    key_shard: static, True when `key`/`value` are one device's shard of
      the call's keys, the queries all of them (`sharding/shard.py`'s
      split keys): a contiguous block of them, whose key positions and
      indices are the shard's (`kv_indices[0] + arange(Sk)` in a cache
      call), not `arange(Sk)`; kernels that assume a KV cache's slot layout
      count from the shard's first slot (`flash.decode.shard_slots`) or
      refuse it.
  """

  query: jax.Array
  key: jax.Array
  value: jax.Array
  bias: jax.Array | None
  visibility: Visibility
  pages: Any = None
  sinks: jax.Array | None = None
  mods: mods_lib.Mods | None = None
  overflow: jax.Array | None = None
  key_shard: bool = dataclasses.field(default=False,
                                      metadata=dict(static=True))

  @property
  def dims(self) -> AttentionDims:
    b, sq, h, d = self.query.shape
    _, sk, hkv, _ = self.key.shape
    return AttentionDims(b, sq, sk, h, hkv, d, self.value.shape[-1])


def poison_overflow(out, lse, overflow):
  """The outputs of a cache call whose rows `overflow` (`[B]` bool) lost
  tokens: NaN there (the semantics' "never silently wrong"; a jitted call
  cannot raise). `out` is `[B, Sq, H, Dv]`, `lse` `[B, H, Sq]` or None;
  returns both, unchanged when `overflow` is None."""
  if overflow is None:
    return out, lse
  out = jnp.where(overflow[:, None, None, None], jnp.nan, out)
  if lse is not None:
    lse = jnp.where(overflow[:, None, None], jnp.nan, lse)
  return out, lse


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def concrete(x) -> np.ndarray | None:
  """`x` as a numpy array when its value is known at trace time (not a
  tracer), else None (also for None): what the input checks can read of a
  value under `jax.jit`."""
  if x is None or isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def check_array(name: str, x, rank: int, expected: str):
  """Raises `TypeError` unless `x` is an array, `ValueError` unless it has
  rank `rank` (`expected` describes its shape, e.g. `"[B, Sq, H, D]"`)."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array {expected}, got {type(x)}.")
  if x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank} {expected}, got shape "
                     f"{_shape(x)}.")


def _check_int(name: str, x, shape: tuple[int, ...], expected: str):
  x = jnp.asarray(x)
  if _shape(x) != shape:
    raise ValueError(f"{name} must have shape {expected} = {shape}, got "
                     f"{_shape(x)}.")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}.")
  return x.astype(jnp.int32)


def _rank4_broadcastable(name: str, x, full: tuple[int, int, int, int]):
  """Left-pads `x` to rank 4 and checks each axis is 1 or the full size."""
  if x.ndim > 4:
    raise ValueError(f"{name} must be broadcastable to [B, H, Sq, Sk] = "
                     f"{full}, got rank {x.ndim} shape {_shape(x)}.")
  x = x.reshape((1,) * (4 - x.ndim) + _shape(x))
  for axis, (got, want) in enumerate(zip(x.shape, full)):
    if got not in (1, want):
      raise ValueError(
          f"{name} must be broadcastable to [B, H, Sq, Sk] = {full}, got "
          f"shape {_shape(x)} (axis {axis} is {got}, expected 1 or {want}).")
  return x


def check_sinks(sinks, num_heads: int):
  """Checks `sinks` (a float `[H]` array of logits); returns it as float32
  (float64 kept), or None."""
  if sinks is None:
    return None
  if not hasattr(sinks, "shape") or not hasattr(sinks, "dtype"):
    raise TypeError(f"sinks must be a float array [H] = ({num_heads},), got "
                    f"{type(sinks)}.")
  if _shape(sinks) != (num_heads,):
    raise ValueError(f"sinks must have shape [H] = ({num_heads},) (one logit "
                     f"per query head), got {_shape(sinks)}.")
  if not jnp.issubdtype(sinks.dtype, jnp.floating):
    raise TypeError(f"sinks must be a floating array, got dtype "
                    f"{sinks.dtype}.")
  return sinks.astype(jnp.promote_types(sinks.dtype, jnp.float32))


def canonical_window(sliding_window, causal: bool) -> tuple[int, int] | None:
  """`int w` -> `(w, 0)` with causal, `(w, w)` without; checks the values."""
  if sliding_window is None:
    return None
  if isinstance(sliding_window, (int, np.integer)) and not isinstance(
      sliding_window, bool):
    window = (int(sliding_window), 0 if causal else int(sliding_window))
  elif (isinstance(sliding_window, (tuple, list)) and len(sliding_window) == 2
        and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool)
                for w in sliding_window)):
    window = (int(sliding_window[0]), int(sliding_window[1]))
  else:
    raise TypeError("sliding_window must be an int or a (left, right) pair of "
                    f"ints, got {sliding_window!r}.")
  if min(window) < 0:
    raise ValueError(f"sliding_window sizes must be >= 0, got {window}.")
  # Larger windows cannot matter for int32 positions; clamping keeps the
  # position arithmetic of the mask free of overflow.
  return tuple(min(w, 2**30) for w in window)


def canonicalize(query, key, value, *, mask=None, bias=None, causal=False,
                 segment_ids=None, kv_lengths=None, q_positions=None,
                 kv_positions=None, sliding_window=None,
                 kv_indices=None, sinks=None, score_mod=None, mask_mod=None,
                 mod_args=()) -> AttentionInputs:
  """Checks a call's arguments and builds its `AttentionInputs`.

  Args:
    query: `[B, Sq, H, D]`.
    key: `[B, Sk, Hkv, D]`.
    value: `[B, Sk, Hkv, Dv]`.
    mask: bool, broadcastable to `[B, H, Sq, Sk]`, True = visible.
    bias: float, broadcastable to `[B, H, Sq, Sk]`.
    causal: python bool.
    segment_ids: `(q_ids [B, Sq], kv_ids [B, Sk])`, or one `[B, S]` array
      when `Sq == Sk`.
    kv_lengths: `[B]` ints.
    q_positions: `[B, Sq]` ints; default `arange(Sq) + Sk - Sq`.
    kv_positions: `[B, Sk]` ints; default `arange(Sk)`.
    sliding_window: `int` or `(left, right)`.
    kv_indices: `[Sk]` ints, the index of each key slot (default
      `arange(Sk)`); only set by the library (caches, sequence shards).
    sinks: `[H]` float sink logits, one per query head.
    score_mod, mask_mod: the module's modifications (`core/mods.py` has the
      contract), or None; checked here by tracing them on the call's shapes.
    mod_args: their extra arguments, a tuple of arrays (empty without mods).

  Returns:
    The `AttentionInputs` of the call.
  """
  check_array("query", query, 4, "[B, Sq, H, D]")
  check_array("key", key, 4, "[B, Sk, Hkv, D]")
  check_array("value", value, 4, "[B, Sk, Hkv, Dv]")
  for name, x, axes in (("query", query, "[B, Sq, H, D]"),
                        ("key", key, "[B, Sk, Hkv, D]"),
                        ("value", value, "[B, Sk, Hkv, Dv]")):
    if 0 in x.shape:
      # One answer for every mechanism (kernels cannot tile an empty axis).
      raise ValueError(f"{name} {axes} has an empty axis: shape "
                       f"{_shape(x)}; every size must be at least 1.")
  batch, q_len, num_heads, head_dim = query.shape
  _, kv_len, num_kv_heads, _ = key.shape
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be a floating array, got {x.dtype}.")
  if key.dtype != query.dtype or value.dtype != query.dtype:
    raise TypeError("query, key and value must share a dtype, got "
                    f"{query.dtype}, {key.dtype}, {value.dtype}.")
  if key.shape[0] != batch or value.shape[0] != batch:
    raise ValueError("query, key and value must share the batch size B, got "
                     f"{query.shape[0]}, {key.shape[0]}, {value.shape[0]}.")
  if key.shape[3] != head_dim:
    raise ValueError(f"key head size must equal the query's D = {head_dim}, "
                     f"got key shape {_shape(key)}.")
  if value.shape[1:3] != key.shape[1:3]:
    raise ValueError("value must be [B, Sk, Hkv, Dv] with the key's Sk, Hkv = "
                     f"{key.shape[1:3]}, got value shape {_shape(value)}.")
  if num_heads % num_kv_heads:
    raise ValueError(f"the number of query heads H = {num_heads} must be a "
                     f"multiple of the number of KV heads Hkv = "
                     f"{num_kv_heads}.")
  if not isinstance(causal, (bool, np.bool_)):
    raise TypeError(f"causal must be a python bool, got {causal!r}.")
  full = (batch, num_heads, q_len, kv_len)

  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise TypeError(f"mask must be boolean (True = visible), got dtype "
                      f"{mask.dtype}; additive values belong in `bias`.")
    mask = _rank4_broadcastable("mask", mask, full)
  if bias is not None:
    bias = jnp.asarray(bias)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise TypeError(f"bias must be a floating array, got {bias.dtype}.")
    bias = _rank4_broadcastable("bias", bias, full)

  q_ids = kv_ids = None
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      if len(segment_ids) != 2:
        raise ValueError("segment_ids must be one [B, S] array or a (q_ids, "
                         f"kv_ids) pair, got {len(segment_ids)} items.")
      q_ids, kv_ids = segment_ids
    else:
      if q_len != kv_len:
        raise ValueError(
            "a single segment_ids array needs Sq == Sk, got Sq = "
            f"{q_len}, Sk = {kv_len}; pass a (q_ids, kv_ids) pair.")
      q_ids = kv_ids = segment_ids
    q_ids = _check_int("segment_ids (queries)", q_ids, (batch, q_len),
                       "[B, Sq]")
    kv_ids = _check_int("segment_ids (keys)", kv_ids, (batch, kv_len),
                        "[B, Sk]")
  if kv_lengths is not None:
    kv_lengths = _check_int("kv_lengths", kv_lengths, (batch,), "[B]")
  # The default positions are numpy, concrete even under `jit` (a kernel
  # may read them at trace time: flash's tile tables from a mask_mod), and
  # built without dispatching a computation (which an abstract mesh, as in
  # ahead-of-time lowering, forbids).
  if q_positions is None:
    q_positions = np.broadcast_to(
        np.arange(q_len, dtype=np.int32) + np.int32(kv_len - q_len),
        (batch, q_len))
  else:
    q_positions = _check_int("q_positions", q_positions, (batch, q_len),
                             "[B, Sq]")
  if kv_positions is None:
    kv_positions = np.broadcast_to(np.arange(kv_len, dtype=np.int32),
                                   (batch, kv_len))
  else:
    kv_positions = _check_int("kv_positions", kv_positions, (batch, kv_len),
                              "[B, Sk]")
  if kv_indices is None:
    kv_indices = jnp.arange(kv_len, dtype=jnp.int32)
  visibility = Visibility(
      q_positions=q_positions, kv_positions=kv_positions,
      kv_indices=kv_indices, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
      kv_lengths=kv_lengths, mask=mask, causal=bool(causal),
      window=canonical_window(sliding_window, bool(causal)))
  mods = mods_lib.make_mods(score_mod, mask_mod, mod_args, shape=full,
                            score_dtype=jnp.promote_types(query.dtype,
                                                          jnp.float32))
  return AttentionInputs(query, key, value, bias, visibility,
                         sinks=check_sinks(sinks, num_heads), mods=mods)


def used_features(inputs: AttentionInputs, *, explicit_positions: bool,
                  **options: Any) -> frozenset[str]:
  """The feature names (see `FEATURES`) a call uses.

  Args:
    inputs: the canonical record.
    explicit_positions: whether the caller passed positions.
    **options: `softcap`, `dropout`, `weights`, `cache` flags.
  """
  vis = inputs.visibility
  dims, mods = inputs.dims, inputs.mods
  used = {name for name, on in (
      ("causal", vis.causal), ("window", vis.window is not None),
      ("segments", vis.has_segments),
      ("kv_lengths", vis.kv_lengths is not None),
      ("positions", explicit_positions), ("mask", vis.mask is not None),
      ("bias", inputs.bias is not None),
      ("gqa", dims.num_heads != dims.num_kv_heads),
      ("sinks", inputs.sinks is not None),
      ("score_mod", mods is not None and mods.score_mod is not None),
      ("mask_mod", mods is not None and mods.mask_mod is not None)) if on}
  unknown = set(options) - set(FEATURES)
  if unknown:
    raise ValueError(f"unknown features {sorted(unknown)}; known: {FEATURES}.")
  used |= {name for name, on in options.items() if on}
  return frozenset(used)
