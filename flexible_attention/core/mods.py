"""User score and mask modifications: the contract, its checks, its use.

A module built with `score_mod=` and/or `mask_mod=` (pure JAX functions,
static: part of the module's options) and called with `mod_args=(...)`
(arrays, dynamic: model parameters or per-batch data, differentiable)
computes, after the soft cap and the bias (semantics step 3),

  s = score_mod(s, batch, head, q_pos, kv_pos, *mod_args)

and keeps key `j` visible to query `i` only if, besides the structured mask
(semantics step 5),

  mask_mod(batch, head, q_pos, kv_pos, *mod_args)

is True. Both are called on BROADCAST ARRAYS (vectorised, not vmapped over
scalars), on whatever part of the score matrix a kernel holds (all of it, a
tile, a shard), in the layout the semantics defines:

- `score`: float `[B', H', Sq', Sk']`, the logits after soft cap and bias,
  in the accumulation dtype (float32; float64 for float64 inputs);
- `batch`: int32 `[B', 1, 1, 1]`, the GLOBAL batch row;
- `head`: int32 `[1, H', 1, 1]`, the GLOBAL query head (its KV head is
  `head // (H // Hkv)`);
- `q_pos`: int32 `[B', 1, Sq', 1]` and `kv_pos`: int32 `[B', 1, 1, Sk']`,
  the semantics' positions of the queries and keys (bottom-right by
  default; a KV cache's token indices; explicit `q_positions` /
  `kv_positions`), global under any sharding and token layout;
- `*mod_args`: the call's `mod_args`, whole on every device (never
  sliced), so index them with the global indices above.

The primed sizes are those of the part a kernel holds, so a mod must be
elementwise: its value at `(b, h, i, j)` may depend only on `score[b, h, i,
j]`, the four indices there and `mod_args` (broadcasting does this for
free; never read shapes, reduce or reorder). `score_mod` returns a float
array of the score's shape and dtype; `mask_mod` returns a bool array
broadcastable to `[B', H', Sq', Sk']` (rank at most 4; e.g. `q_pos >=
kv_pos` is `[B', 1, Sq', Sk']`). Mods may be evaluated at padding slots
kernels add (position 0), whose results are discarded. Gradients flow to
every floating leaf of `mod_args` (integer leaves get none).

`make_mods` checks a call's mods once, before anything is traced or
compiled (`jax.eval_shape` on the full problem's shapes), and builds the
`Mods` record kernels read. The named mods (ALiBi, T5 buckets, prefix-LM,
documents) are in `core/named_mods.py`.

Glossary of shapes: B batch, H query heads, Hkv KV heads, G = H // Hkv,
Sq / Sk query / key lengths (primed: the part a kernel holds).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flexible_attention.core import masks

SCORE_MOD_SIGNATURE = "score_mod(score, batch, head, q_pos, kv_pos, *mod_args)"
MASK_MOD_SIGNATURE = "mask_mod(batch, head, q_pos, kv_pos, *mod_args)"


def check_mod(name: str, fn) -> Callable | None:
  """Checks a module option `score_mod` / `mask_mod`: None or callable."""
  if fn is not None and not callable(fn):
    raise TypeError(f"{name} must be a callable (a pure JAX function) or "
                    f"None, got {type(fn).__name__} {fn!r}.")
  return fn


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mods:
  """A call's score and mask modifications, as kernels see them.

  Attributes:
    args: the call's `mod_args` (a tuple of arrays or pytrees of arrays).
    batch_offset: int32 scalar, the global index of the kernel's first
      batch row (non-zero inside a batch-sharded `shard_map`).
    head_offset: int32 scalar, the global index of the kernel's first query
      head (non-zero inside a head-sharded `shard_map` and in `ulysses`).
    score_mod: static, the user's score modification or None.
    mask_mod: static, the user's mask modification or None.
    num_heads: static, the call's H (every head, before any sharding: the
      bound a kernel that differentiates small `mod_args` leaves in place
      states as "[H] or smaller", the same on one device and on a
      head-sharded mesh).
  """

  args: tuple[Any, ...]
  batch_offset: jax.Array
  head_offset: jax.Array
  score_mod: Callable | None = dataclasses.field(
      default=None, metadata=dict(static=True))
  mask_mod: Callable | None = dataclasses.field(
      default=None, metadata=dict(static=True))
  num_heads: int | None = dataclasses.field(
      default=None, metadata=dict(static=True))

  def with_offsets(self, batch_offset, head_offset) -> Mods:
    """The record of a shard starting at these local batch/head offsets."""
    return dataclasses.replace(
        self, batch_offset=self.batch_offset + batch_offset,
        head_offset=self.head_offset + head_offset)

  def indices(self, batch: int, num_heads: int, q_positions, kv_positions):
    """`(batch [B,1,1,1], head [1,H,1,1], q_pos [B,1,Sq,1], kv_pos
    [B,1,1,Sk])` int32 of a part with `batch` rows and `num_heads` heads
    whose positions are `q_positions [B, Sq]`, `kv_positions [B, Sk]`."""
    b = jnp.arange(batch, dtype=jnp.int32) + self.batch_offset
    h = jnp.arange(num_heads, dtype=jnp.int32) + self.head_offset
    return (b[:, None, None, None], h[None, :, None, None],
            q_positions.astype(jnp.int32)[:, None, :, None],
            kv_positions.astype(jnp.int32)[:, None, None, :])

  def score(self, s, q_positions, kv_positions, args=None):
    """`score_mod` applied to logits `s [B, H, Sq, Sk]` (unchanged without
    one); `args` replaces `mod_args` (for differentiating)."""
    if self.score_mod is None:
      return s
    args = self.args if args is None else args
    return self.score_mod(s, *self.indices(s.shape[0], s.shape[1],
                                           q_positions, kv_positions), *args)

  def visible(self, batch: int, num_heads: int, q_positions, kv_positions):
    """`mask_mod` as bool `[B|1, H|1, Sq|1, Sk|1]`, or None without one."""
    if self.mask_mod is None:
      return None
    keep = jnp.asarray(self.mask_mod(*self.indices(
        batch, num_heads, q_positions, kv_positions), *self.args))
    return keep.reshape((1,) * (4 - keep.ndim) + keep.shape)

  # --- The grouped-query layout [B, Hkv, G, Sq, Sk] of the XLA kernels -----

  def score_grouped(self, s, q_positions, kv_positions, args=None):
    """`score` on grouped logits `s [B, Hkv, G, Sq, Sk]`."""
    if self.score_mod is None:
      return s
    b, hkv, g, sq, sk = s.shape
    flat = self.score(s.reshape(b, hkv * g, sq, sk), q_positions,
                      kv_positions, args)
    return flat.reshape(s.shape)

  def visible_grouped(self, batch: int, num_kv_heads: int, groups: int,
                      q_positions, kv_positions):
    """`visible` as bool `[B|1, Hkv|1, G|1, Sq|1, Sk|1]` (or None)."""
    keep = self.visible(batch, num_kv_heads * groups, q_positions,
                        kv_positions)
    return masks.group_heads(keep, num_kv_heads)

  def score_vjp(self, s, q_positions, kv_positions):
    """`(score_grouped(s), back)` where `back(ds) -> (ds_in, dargs)` pulls
    a cotangent of the modified logits back to the logits and to
    `mod_args` (`dargs` like `args`, None at integer leaves)."""
    leaves, treedef = jax.tree.flatten(self.args)
    wanted = [_is_float(x) for x in leaves]

    def modded(s, floats):
      it = iter(floats)
      args = treedef.unflatten([next(it) if w else x
                                for x, w in zip(leaves, wanted)])
      return self.score_grouped(s, q_positions, kv_positions, args)

    out, vjp = jax.vjp(modded, s, [x for x, w in zip(leaves, wanted) if w])

    def back(ds):
      ds_in, dfloats = vjp(ds)
      it = iter(dfloats)
      return ds_in, treedef.unflatten([next(it) if w else None
                                       for w in wanted])

    return out, back

  def zero_grads(self, dtype):
    """Zeros like the float leaves of `args` (None at integer ones), in
    `dtype`: the accumulator of `score_vjp`'s `dargs`."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, dtype) if _is_float(x)
                        else None, self.args)

  def cotangent(self, dargs) -> Mods:
    """The record's cotangent for a `custom_vjp`: `dargs` (float sums, cast
    to each leaf's dtype; None: zeros) for `args`, none for the offsets."""
    if dargs is None:  # No score_mod: mask_mod has no gradient.
      dargs = jax.tree.map(lambda _: None, self.args)
    cast = lambda d, x: None if d is None else d.astype(x.dtype)
    dargs = jax.tree.map(cast, dargs, self.args, is_leaf=lambda d: d is None)
    return dataclasses.replace(self, args=dargs, batch_offset=None,
                               head_offset=None)


def add_grads(total, part):
  """`total + part` for `dargs` trees (None at integer leaves)."""
  return jax.tree.map(lambda a, b: a + b.astype(a.dtype), total, part)


def _check_signature(name: str, fn, count: int, num_args: int,
                     expected: str):
  """A `TypeError` if `fn` cannot take `count` positional arguments (with
  `num_args` of them the call's `mod_args`)."""
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    return  # No introspectable signature: the trace below checks it.
  try:
    signature.bind(*range(count))
  except TypeError as e:
    raise TypeError(
        f"{name} must be callable as {expected}: {count} positional "
        f"arguments with the call's {num_args} mod_args, but its signature "
        f"is {getattr(fn, '__name__', name)}{signature} ({e}).") from None


def _trace(name: str, fn, expected: str, *args):
  """`jax.eval_shape(fn, *args)`, an error naming `name` if it fails."""
  try:
    return jax.eval_shape(fn, *args)
  except Exception as e:  # pylint: disable=broad-except
    kind = TypeError if isinstance(e, TypeError) else ValueError
    raise kind(f"{name} failed when traced as {expected} (the contract: "
               f"flexible_attention/core/mods.py): {type(e).__name__}: "
               f"{e}") from e


def make_mods(score_mod, mask_mod, mod_args, *, shape: tuple[int, ...],
              score_dtype) -> Mods | None:
  """Checks a call's mods and builds its `Mods` (None without mods).

  Args:
    score_mod, mask_mod: the module's mods (callables or None).
    mod_args: the call's `mod_args`: a tuple (or list) of arrays or
      pytrees of arrays.
    shape: `(B, H, Sq, Sk)` of the whole call.
    score_dtype: the logits' dtype (float32; float64 for float64 inputs).

  Returns:
    The `Mods` record (offsets 0), or None when there is no mod.

  Raises:
    ValueError / TypeError: `mod_args` without a mod or not a tuple of
      arrays; a mod that cannot take the arguments, fails when traced, or
      returns the wrong shape or dtype.
  """
  if not isinstance(mod_args, (tuple, list)):
    raise TypeError(f"mod_args must be a tuple of arrays (the mods' extra "
                    f"arguments), got {type(mod_args).__name__}.")
  check_mod("score_mod", score_mod)
  check_mod("mask_mod", mask_mod)
  if score_mod is None and mask_mod is None:
    if mod_args:
      raise ValueError(
          f"mod_args were given ({len(mod_args)} items) but the module has "
          "no score_mod or mask_mod: build it with score_mod= or mask_mod=.")
    return None
  leaves = jax.tree.leaves(tuple(mod_args))
  for i, leaf in enumerate(leaves):
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")) and not (
        isinstance(leaf, (int, float, bool, np.number))):
      raise TypeError(f"mod_args must hold arrays; leaf {i} is "
                      f"{type(leaf).__name__}.")
  args = jax.tree.map(jnp.asarray, tuple(mod_args))
  zero = np.zeros((), np.int32)  # Concrete offsets (`mod_tables`).
  batch, heads, q_len, kv_len = shape
  mods = Mods(args, zero, zero, score_mod, mask_mod, num_heads=heads)
  positions = (jax.ShapeDtypeStruct((batch, q_len), jnp.int32),
               jax.ShapeDtypeStruct((batch, kv_len), jnp.int32))
  full = tuple(shape)
  if score_mod is not None:
    _check_signature("score_mod", score_mod, 5 + len(args), len(args),
                     SCORE_MOD_SIGNATURE)
    out = _trace("score_mod", mods.score, SCORE_MOD_SIGNATURE,
                 jax.ShapeDtypeStruct(full, score_dtype), *positions)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != full or (
        out.dtype != score_dtype):
      got = (f"shape {out.shape} dtype {out.dtype}" if isinstance(
          out, jax.ShapeDtypeStruct) else type(out).__name__)
      raise TypeError(
          f"score_mod must return an array of the score's shape [B, H, Sq, "
          f"Sk] = {full} and dtype {np.dtype(score_dtype).name}, got {got}.")
  if mask_mod is not None:
    _check_signature("mask_mod", mask_mod, 4 + len(args), len(args),
                     MASK_MOD_SIGNATURE)
    out = _trace("mask_mod", lambda *p: mods.mask_mod(
        *mods.indices(batch, heads, *p), *args), MASK_MOD_SIGNATURE,
                 *positions)
    ok = isinstance(out, jax.ShapeDtypeStruct) and out.dtype == jnp.bool_
    try:
      ok = ok and jnp.broadcast_shapes(out.shape, full) == full
    except ValueError:
      ok = False
    if not ok:
      got = (f"shape {out.shape} dtype {out.dtype}" if isinstance(
          out, jax.ShapeDtypeStruct) else type(out).__name__)
      raise TypeError(
          f"mask_mod must return a bool array broadcastable to [B, H, Sq, "
          f"Sk] = {full} (True = visible), got {got}.")
  return mods
