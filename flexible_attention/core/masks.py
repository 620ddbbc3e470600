"""The one definition of which keys a query may see.

`Visibility` is the structured mask of the semantics (DESIGN.md, step 5):
positions, causal, sliding window, segment ids, kv lengths and an optional
dense user mask. It stays structured all the way into the kernels: a kernel
slices it into tiles (`Visibility.slice`), asks whether a tile can hold any
visible pair (`Visibility.maybe_visible`, for block skipping) and only then
expands the tile into booleans (`Visibility.dense`).

Glossary of shapes:
- B: batch size.
- Sq, Sk: query and key sequence lengths (of the record or of one tile).
- H: number of query heads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def _dynamic_slice_axis(x, axis, start, size):
  """Slices `x` along `axis` unless that axis is broadcast (size 1)."""
  if x.shape[axis] == 1:
    return x
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _pad_axis(x, axis, pad, value):
  """Pads `x` at the end of `axis` unless that axis is broadcast (size 1)."""
  if pad == 0 or x.shape[axis] == 1:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def slice_broadcastable(x, q_start, q_size, kv_start, kv_size):
  """Tiles a `[b, h, Sq|1, Sk|1]` array (mask or bias) along its last axes."""
  if x is None:
    return None
  x = _dynamic_slice_axis(x, 2, q_start, q_size)
  return _dynamic_slice_axis(x, 3, kv_start, kv_size)


def pad_broadcastable(x, q_pad, kv_pad, value):
  """Pads a `[b, h, Sq|1, Sk|1]` array (mask or bias) at the end."""
  if x is None:
    return None
  return _pad_axis(_pad_axis(x, 2, q_pad, value), 3, kv_pad, value)


_INT32_MIN = int(np.iinfo(np.int32).min)
_INT32_MAX = int(np.iinfo(np.int32).max)


def window_bounds(q_pos, window: tuple[int, int]):
  """`(q_pos - left, q_pos + right)` for int32 positions, saturating at the
  ends of int32 instead of wrapping. Saturation keeps the window test exact:
  a bound past the end of int32 admits every int32 key position, and so
  does the saturated one. Plain jnp (Pallas kernels call it too)."""
  left, right = window
  lo = q_pos if left == 0 else jnp.where(
      q_pos < _INT32_MIN + left, _INT32_MIN, q_pos - left)
  hi = q_pos if right == 0 else jnp.where(
      q_pos > _INT32_MAX - right, _INT32_MAX, q_pos + right)
  return lo, hi


def pair_visible(visible, q_pos, kv_pos, *, causal: bool,
                 window: tuple[int, int] | None, q_seg=None, kv_seg=None):
  """`visible` restricted by the structural rule of the semantics for
  (query, key) pairs: causal, sliding window and segment ids (key validity,
  kv lengths and dense masks are the callers' own, e.g. in `visible`).
  Inputs broadcast against each other (e.g. `[.., Sq, 1]` with `[.., 1,
  Sk]`); plain jnp, so Pallas kernels call it on tiles.

  Returns:
    Bool of the broadcast shape (True = visible).
  """
  if causal:
    visible = visible & (kv_pos <= q_pos)
  if window is not None:
    lo, hi = window_bounds(q_pos, window)
    visible = visible & (kv_pos >= lo) & (kv_pos <= hi)
  if q_seg is not None:
    visible = visible & (q_seg == kv_seg)
  return visible


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Visibility:
  """Which key each query may see: the structured mask of the semantics.

  Key `j` is visible to query `i` of batch row `b` iff `kv_indices[j] >= 0`
  (negative indices mark padding slots added by a kernel) and all of:
  - `causal` => `kv_positions[b, j] <= q_positions[b, i]`;
  - `window = (l, r)` =>
    `q_positions[b, i] - l <= kv_positions[b, j] <= q_positions[b, i] + r`;
  - segment ids => `q_segment_ids[b, i] == kv_segment_ids[b, j]`;
  - `kv_lengths` => `kv_indices[j] < kv_lengths[b]`;
  - `mask` => `mask[b, h, i, j]`.

  Attributes:
    q_positions: `[B, Sq]` int32.
    kv_positions: `[B, Sk]` int32.
    kv_indices: `[Sk]` int32, the index of each key slot in the full key
      sequence (what `kv_lengths` counts); negative for padding.
    q_segment_ids: `[B, Sq]` int32 or `None`.
    kv_segment_ids: `[B, Sk]` int32 or `None`.
    kv_lengths: `[B]` int32 or `None`.
    mask: bool `[B|1, H|1, Sq|1, Sk|1]` or `None`.
    causal: static bool.
    window: static `(left, right)` or `None`.
  """

  q_positions: jax.Array
  kv_positions: jax.Array
  kv_indices: jax.Array
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None
  kv_lengths: jax.Array | None = None
  mask: jax.Array | None = None
  causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
  window: tuple[int, int] | None = dataclasses.field(
      default=None, metadata=dict(static=True))

  @property
  def has_segments(self) -> bool:
    return self.q_segment_ids is not None

  def slice(self, q_start, q_size: int, kv_start, kv_size: int) -> Visibility:
    """The record of one tile: queries `[q_start, q_start + q_size)` and keys
    `[kv_start, kv_start + kv_size)` (starts may be traced)."""
    q = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(
        x, q_start, q_size, axis=x.ndim - 1)
    kv = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(
        x, kv_start, kv_size, axis=x.ndim - 1)
    return dataclasses.replace(
        self,
        q_positions=q(self.q_positions),
        kv_positions=kv(self.kv_positions),
        kv_indices=kv(self.kv_indices),
        q_segment_ids=q(self.q_segment_ids),
        kv_segment_ids=kv(self.kv_segment_ids),
        mask=slice_broadcastable(self.mask, q_start, q_size, kv_start,
                                 kv_size))

  def pad(self, q_pad: int, kv_pad: int) -> Visibility:
    """Appends `q_pad` query rows and `kv_pad` invisible key slots."""
    if q_pad == 0 and kv_pad == 0:
      return self
    end = lambda x, p, v: None if x is None else jnp.pad(
        x, [(0, 0)] * (x.ndim - 1) + [(0, p)], constant_values=v)
    return dataclasses.replace(
        self,
        q_positions=end(self.q_positions, q_pad, 0),
        kv_positions=end(self.kv_positions, kv_pad, 0),
        kv_indices=end(self.kv_indices, kv_pad, -1),
        q_segment_ids=end(self.q_segment_ids, q_pad, 0),
        kv_segment_ids=end(self.kv_segment_ids, kv_pad, 0),
        mask=pad_broadcastable(self.mask, q_pad, kv_pad, False))

  def dense(self) -> jax.Array:
    """Expands the record into booleans `[B, H|1, Sq, Sk]` (True = visible)."""
    q_pos = self.q_positions[:, None, :, None]  # [B, 1, Sq, 1]
    kv_pos = self.kv_positions[:, None, None, :]  # [B, 1, 1, Sk]
    kv_idx = self.kv_indices[None, None, None, :]  # [1, 1, 1, Sk]
    q_seg = kv_seg = None
    if self.has_segments:
      q_seg = self.q_segment_ids[:, None, :, None]
      kv_seg = self.kv_segment_ids[:, None, None, :]
    visible = pair_visible(kv_idx >= 0, q_pos, kv_pos, causal=self.causal,
                           window=self.window, q_seg=q_seg, kv_seg=kv_seg)
    if self.kv_lengths is not None:
      visible = visible & (kv_idx < self.kv_lengths[:, None, None, None])
    batch, _, sq, sk = jnp.broadcast_shapes(
        visible.shape, (self.q_positions.shape[0], 1,
                        self.q_positions.shape[1], self.kv_indices.shape[0]))
    visible = jnp.broadcast_to(visible, (batch, 1, sq, sk))
    if self.mask is not None:
      visible = visible & self.mask
    return visible

  def maybe_visible(self) -> jax.Array:
    """A scalar bool, False only if no pair of this record is visible.

    Conservative (it may say True for an empty tile) and cheap: it looks at
    per-row minima and maxima of positions, indices and segment ids, which is
    how kernels skip tiles that the structure makes fully invisible.
    """
    kv_valid = self.kv_indices >= 0  # [Sk]
    big = jnp.iinfo(jnp.int32).max
    per_row = jnp.broadcast_to(jnp.any(kv_valid),
                               self.q_positions.shape[:1])  # [B]

    def kv_min(x):
      return jnp.min(jnp.where(kv_valid, x, big), axis=-1)

    def kv_max(x):
      return jnp.max(jnp.where(kv_valid, x, -big), axis=-1)

    q_min = jnp.min(self.q_positions, axis=-1)  # [B]
    q_max = jnp.max(self.q_positions, axis=-1)  # [B]
    if self.causal:
      per_row &= kv_min(self.kv_positions) <= q_max
    if self.window is not None:
      per_row &= kv_max(self.kv_positions) >= window_bounds(q_min,
                                                            self.window)[0]
      per_row &= kv_min(self.kv_positions) <= window_bounds(q_max,
                                                            self.window)[1]
    if self.has_segments:
      per_row &= kv_max(self.kv_segment_ids) >= jnp.min(self.q_segment_ids, -1)
      per_row &= kv_min(self.kv_segment_ids) <= jnp.max(self.q_segment_ids, -1)
    if self.kv_lengths is not None:
      per_row &= kv_min(self.kv_indices) < self.kv_lengths
    result = jnp.any(per_row)
    if self.mask is not None:
      result &= jnp.any(self.mask)
    return result


def group_heads(x, num_kv_heads: int):
  """`[b, H|1, ...]` -> `[b, Hkv|1, G|1, ...]`, the grouped-query layout.

  Query head `h` uses KV head `h // G` (G = H // Hkv), so splitting the head
  axis row-major into `(Hkv, G)` lines every query head up with its KV head.
  """
  if x is None:
    return None
  if x.shape[1] == 1:
    return x[:, :, None]
  b, h, *rest = x.shape
  return x.reshape(b, num_kv_heads, h // num_kv_heads, *rest)
