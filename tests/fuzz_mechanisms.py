"""Differential fuzzing: random calls of every CPU mechanism against the
float32 reference.

The conformance battery pins one feature (or one corner) per case, and one
`everything` case; this draws whole calls at random — shapes, grouped heads,
causal, windows, segment ids, kv lengths, explicit positions, a dense mask
and bias, a soft cap, sinks, a score and a mask modification, dropout, small
tiles, float32 or bfloat16, a batch / head / sequence mesh of the 8 CPU
devices, and KV-cache calls (dense or paged: shuffled, shared and
unassigned pages, ragged rows and ragged new tokens, a row that overflows)
— and checks each mechanism's outputs, log-sum-exps and gradients (q, k,
v, bias, sinks, the score modification's slopes), and the updated cache,
against an oracle that does not go through the modules: the reference
(`fa.reference_attention`) with the modifications written out as the dense
bias and mask they mean, and a cache call written as the full causal call
over the row's tokens (NaN for a row that overflows).

A mechanism may refuse a draw (`NotImplementedError` or `ValueError` naming
what it lacks: the refusal is recorded, not a failure), except `vanilla`
and `auto`; any other exception, a non-finite value where the reference is
finite, or an error past the dtype's tolerance is a failure.

  python tests/fuzz_mechanisms.py --seeds 0:300 [--mechanisms vanilla,flash]
      [--op_by_op] [--verbose] [--show_refusals]

prints one line per (seed, mechanism) that failed, the largest error of
each quantity and a summary; exit status 1 if any failed.
`tests/test_fuzz.py` runs a few seeds in the suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import traceback
from typing import Any, Callable

import conftest  # noqa: F401  (XLA flags before jax: 8 CPU devices.)
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import flexible_attention as fa
from flexible_attention.core import cache as cache_lib
import helpers

# What is fuzzed on CPU: a name, and the registered mechanism with the
# options it needs here. The context-parallel ones also run with flash's
# kernels (interpreted).
MECHANISMS = {
    "vanilla": ("vanilla", {}),
    "auto": ("auto", {}),
    "blockwise": ("blockwise", {}),
    "flash": ("flash", {"interpret": True}),
    "ring": ("ring", {}),
    "ring[flash]": ("ring", {"block_kernel": "flash", "interpret": True}),
    "ulysses": ("ulysses", {}),
    "ulysses[flash]": ("ulysses", {"local_mechanism": "flash",
                                   "local_options": {"interpret": True}}),
}
# Relative-to-max tolerances (`helpers.relative_error`) of the two dtypes
# drawn: twice the suite's CPU ones (`helpers.TOLERANCES`). In float32 the
# reference is itself float32: in seed 6446 (softcap 30, causal, a paged
# cache) its dk is 8.3e-6 from the float64 gradient and the tiled
# mechanisms' 8.1e-6 on the other side, 1.6e-5 apart, so the suite's 1e-5
# would fail a mechanism as exact as the reference. The draws reach
# quantities the battery's cases do not, small sums of large terms that
# cancel; in bfloat16 the tiled backwards' delta carries the
# returned output's rounding into them (up to 7.9e-2 from the exact
# gradient, seed 2193's slopes), which the check allows for
# (`_tiled_grads`), and the cotangent dO arrives rounded to bfloat16 (in
# seed 3627, one row's `dO . O` cancels: `vanilla`'s dsinks is 6.7e-2 from
# the exact gradient, 2.4e-2 from the one with dO rounded); what is left
# measured up to 1.4e-2 (dsinks) over seeds 0:200. Those gradients
# (`SUMMED`) are compared relative to the largest of the reference's three
# (`compare`): in seed 3845 the slopes' exact gradient is float32's rounding
# (3e-6) of terms the output's rounding moves by 0.1-0.2. Where the terms
# cancel further still, the slopes' gradient is defined only to the
# rounding of its terms, and an error within `SUMMED_ROUNDINGS` roundings
# of each (`u sum_j |t_j|`, u the dtype's unit roundoff: `_slope_terms`)
# passes: in
# bfloat16 seed 6661 (one head, four rows of three queries) sums terms of
# 28.6 in magnitude to -0.034; its reference's three gradients span
# -0.018 to -0.034 and `vanilla`'s and the tiled mechanisms' are 0.004-0.007
# from the nearest, within the bound's 0.11.
TOLERANCES = {dtype: 2 * helpers.TOLERANCES["cpu"][dtype]
              for dtype in ("float32", "bfloat16")}
# ... and, in float32, for the gradients of parameters each of whose
# elements sums over the whole call: a few terms can cancel to a result the
# size of float32's rounding of them. Seed 172's slopes (one head, three
# queries) are 3.2e-5 from the float64 gradient in the float32 reference
# itself, 6e-7 in `blockwise`; measured up to 4.4e-5 (seed 127) over seeds
# 0:200. A wrong mask, scale or gradient gives 1e-1 to 1.
SUMMED_TOLERANCES = {"float32": 1e-4}
# Two roundings of the terms on each side: the reference's sum and the
# mechanism's are both rounded. In float32 seed 7262 (score_mod slopes,
# segments; one head) sums terms of 75.9 in magnitude (one rounding: 4.5e-6)
# to 0.0101: the float32 reference is 3.8e-6 from the float64 gradient,
# `blockwise` and `flash` 8.0e-6 and 6.6e-6 on the other side (6.0e-6 and
# 6.2e-6 from the float64 gradient of the output they returned), 1.2e-5
# apart in all: 2.6 roundings.
SUMMED_ROUNDINGS = 4
SUMMED = ("dslopes", "dsinks")
# Never refuse a draw on CPU: `vanilla` computes every feature, and `auto`
# must find a mechanism for any call `vanilla` serves.
NEVER_REFUSE = ("vanilla", "auto")
# Fuzzed only on draws whose mesh has a sequence axis (without one,
# `ulysses` is its local mechanism, and `ring[flash]` one flash call).
SEQUENCE_ONLY = ("ulysses", "ulysses[flash]", "ring[flash]")
# The meshes `(dp, fsdp, tp, sp)` of the 8 CPU devices a draw may use.
MESHES = ((2, 1, 1, 1), (1, 1, 2, 1), (2, 2, 2, 1), (1, 1, 1, 2),
          (2, 1, 2, 2), (1, 2, 1, 4), (1, 1, 1, 8))


@dataclasses.dataclass(frozen=True)
class Draw:
  """One random call. Sizes, then features (None / False: not used)."""

  seed: int
  batch: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  head_dim: int
  value_dim: int
  dtype: str
  causal: bool
  window: Any
  softcap: float | None
  segments: bool
  kv_lengths: bool
  positions: bool
  mask: bool
  bias: bool
  sinks: bool
  score_mod: bool
  mask_mod: str | None  # None, "static" (no mod_args), "prefix" (reads one).
  blocks: tuple[int, int]
  cache: str | None  # None, "dense", "paged".
  page_size: int
  ragged_q: bool
  shared_pages: int  # Paged: leading pages every row shares (a prefix).
  overflow: bool  # A cache call: one row's tokens do not fit.
  dropout: float  # The rate (0: none).
  mesh: tuple[int, int, int, int] | None  # (dp, fsdp, tp, sp) or None.


def describe(d: Draw) -> str:
  """The draw in one line: its shapes, then the features it uses."""
  shapes = (f"B{d.batch} Sq{d.q_len} Sk{d.kv_len} H{d.heads}/{d.kv_heads} "
            f"D{d.head_dim}/{d.value_dim} {d.dtype} tiles{d.blocks}")
  features = [f"{f.name}={getattr(d, f.name)}"
              for f in dataclasses.fields(d)[9:]
              if f.name not in ("blocks", "page_size") and getattr(
                  d, f.name) not in (None, False)]
  if d.cache == "paged":
    features.append(f"page_size={d.page_size}")
  return f"{shapes} " + " ".join(features)


def draw(seed: int) -> Draw:
  """The call of `seed`: a cache call one time in two, on a mesh one time in
  three."""
  rng = np.random.default_rng(seed)
  pick = lambda *options: options[rng.integers(len(options))]
  flip = lambda p=0.5: bool(rng.random() < p)
  cache = pick(None, None, "dense", "paged")
  mesh = None
  if flip(1 / 3):
    mesh = pick(*MESHES)
  dp, fsdp, tp, sp = mesh or (1, 1, 1, 1)
  batch = dp * fsdp * int(pick(1, 2)) if mesh else int(pick(1, 2, 3))
  kv_heads = tp * int(pick(1, 2)) if mesh else int(pick(1, 2, 3))
  page_size = int(pick(2, 4, 8))
  if cache:
    q_len = int(pick(1, 2, 3, 5, 8, 13, 16))
    # Sk is the cache's capacity; room for the new tokens and more (on a
    # sequence mesh whole pages, that the axis divides).
    kv_len = q_len + int(rng.integers(0, 40))
    if sp > 1:
      unit = math.lcm(sp, page_size)
      kv_len = -(-kv_len // unit) * unit
  elif sp > 1:
    # A sequence mesh: lengths the zigzag layout splits (2 sp chunks), or
    # (one time in four) queries the axis does not divide: the keys split.
    q_len = kv_len = 2 * sp * int(rng.integers(1, 5))
    if flip(0.25):
      q_len = int(rng.integers(1, kv_len))
  else:
    q_len = int(rng.integers(1, 40))
    kv_len = int(rng.integers(max(1, q_len // 2), 48))
  window = None
  if flip(0.3):
    window = (int(pick(1, 4, 9)) if flip() else
              (int(rng.integers(0, 12)), int(rng.integers(0, 12))))
  return Draw(
      seed=seed,
      batch=batch,
      q_len=q_len,
      kv_len=kv_len,
      heads=kv_heads * int(pick(1, 2, 4)),
      kv_heads=kv_heads,
      head_dim=int(pick(4, 8, 16, 24)),
      value_dim=int(pick(4, 8, 16, 12)),
      dtype=pick("float32", "float32", "float32", "bfloat16"),
      causal=bool(cache) or flip(),
      window=window,
      softcap=pick(None, None, 2.0, 30.0),
      segments=not cache and flip(0.3),
      kv_lengths=not cache and flip(0.3),
      positions=not cache and flip(0.25),
      # Rarely on a sequence mesh, where ring and ulysses refuse them.
      mask=not cache and flip(0.2 if sp == 1 else 0.05),
      bias=not cache and flip(0.25 if sp == 1 else 0.05),
      sinks=flip(0.3),
      score_mod=flip(0.3),
      mask_mod=pick(None, None, None, "static", "prefix"),
      blocks=(int(pick(8, 16)), int(pick(8, 16, 32))),
      cache=cache,
      page_size=page_size,
      ragged_q=bool(cache) and flip(),
      shared_pages=int(pick(1, 2)) if cache == "paged" and flip(0.3) else 0,
      overflow=bool(cache) and flip(0.15),
      dropout=0.0 if cache or not flip(0.15) else float(pick(0.1, 0.5)),
      mesh=mesh,
  )


# --- The modifications, and what they mean as a dense bias and mask ----------


def _score_mod(score, batch, head, q_pos, kv_pos, slopes, prefix):
  del batch, prefix
  return score - slopes[head] * jnp.abs(q_pos - kv_pos).astype(score.dtype)


def _static_mask_mod(batch, head, q_pos, kv_pos, slopes, prefix):
  """No mod_args: its visible-tile table is derived at trace time."""
  del batch, slopes, prefix
  return ((q_pos - kv_pos + head) % 3 != 1) | (kv_pos == q_pos)


def _prefix_mask_mod(batch, head, q_pos, kv_pos, slopes, prefix):
  """Reads `prefix [B]`: prefix-LM with a head-dependent hole."""
  del slopes
  return ((kv_pos < prefix[batch]) | (kv_pos <= q_pos)) & (
      (q_pos + head) % 7 != 3)


_MASK_MODS = {"static": _static_mask_mod, "prefix": _prefix_mask_mod}


def _dense_mods(d: Draw, q_pos, kv_pos, slopes, prefix, terms=None):
  """`(bias, mask)` `[B, H, Sq, Sk]` of the draw's mods (None if unused),
  from the positions `[B, Sq]`, `[B, Sk]`; `terms` (zeros of the bias'
  shape, or None) is added to the bias, so that its gradient is the
  score's (`_slope_terms`)."""
  b = jnp.arange(d.batch)[:, None, None, None]
  h = jnp.arange(d.heads)[None, :, None, None]
  qp = q_pos[:, None, :, None]
  kp = kv_pos[:, None, None, :]
  bias = mask = None
  if d.score_mod:
    bias = -slopes[h] * jnp.abs(qp - kp).astype(jnp.float32)
    bias = jnp.broadcast_to(bias, (d.batch, d.heads, d.q_len, d.kv_len))
    if terms is not None:
      bias = bias + terms
  if d.mask_mod:
    mask = jnp.broadcast_to(_MASK_MODS[d.mask_mod](b, h, qp, kp, slopes,
                                                   prefix),
                            (d.batch, d.heads, d.q_len, d.kv_len))
  return bias, mask


def _zero_terms(d: Draw):
  """`_dense_mods`' `terms`: zeros `[B, H, Sq, Sk]` (None without a
  score_mod)."""
  if not d.score_mod:
    return None
  return jnp.zeros((d.batch, d.heads, d.q_len, d.kv_len), jnp.float32)


def _slope_terms(d: Draw, q_pos, kv_pos, dscore) -> dict[str, np.ndarray]:
  """`{"slopes": [H]}`: the sum over the batch and the (query, key) pairs
  of `|dS| |q_pos - kv_pos|`, the magnitudes of the terms the slopes'
  gradient adds up (`dS` `[B, H, Sq, Sk]` the scores' gradient); `{}`
  without a score_mod."""
  if dscore is None:
    return {}
  distance = jnp.abs(q_pos[:, None, :, None] - kv_pos[:, None, None, :])
  return {"slopes": np.asarray(jnp.sum(jnp.abs(dscore) * distance,
                                       axis=(0, 2, 3)))}


# --- Inputs --------------------------------------------------------------------


@dataclasses.dataclass
class Inputs:
  """The draw's arrays: `floats` are differentiated, `call` are not."""

  floats: dict[str, jax.Array]
  call: dict[str, Any]
  cache: Any = None  # With a cache call: the cache before the call.
  tokens: Any = None  # ... and its tokens, dense `(k [B, L, Hkv, D], v)`.
  lengths: Any = None  # ... and its lengths `[B]` (numpy).
  q_lengths: Any = None  # ... and the new tokens per row `[B]` (numpy),
  overflow: Any = None  # ... and the rows that do not fit `[B]` (numpy).


def make_inputs(d: Draw) -> Inputs:
  rng = np.random.default_rng(10_000 + d.seed)
  dtype = jnp.dtype(d.dtype)
  q, k, v = helpers.random_qkv(rng, d.batch, d.q_len, d.kv_len, d.heads,
                               d.kv_heads, d.head_dim, d.value_dim, dtype)
  floats = {"q": q, "k": k, "v": v}
  if d.bias:
    # Broadcast over some of B, H, Sq; never over Sk: a bias constant along
    # a query's keys does not change its softmax (its gradient is 0, and
    # the reference's is rounding noise).
    shape = [d.batch, d.heads, d.q_len, d.kv_len]
    for axis in rng.choice(3, size=int(rng.integers(0, 3)), replace=False):
      shape[axis] = 1
    floats["bias"] = helpers.random_array(rng, shape, dtype)
  if d.sinks:
    floats["sinks"] = helpers.random_array(rng, (d.heads,))
  if d.score_mod:
    floats["slopes"] = jnp.asarray(rng.uniform(0.05, 0.5, d.heads),
                                   jnp.float32)
  call = {}
  if d.mask_mod or d.score_mod:
    call["prefix"] = jnp.asarray(rng.integers(0, d.kv_len + 1, d.batch),
                                 jnp.int32)
  if d.segments:
    ids = lambda n: np.sort(rng.integers(0, 3, (d.batch, n)), axis=1)
    call["segment_ids"] = (jnp.asarray(ids(d.q_len), jnp.int32),
                           jnp.asarray(ids(d.kv_len), jnp.int32))
  if d.kv_lengths:
    call["kv_lengths"] = jnp.asarray(
        rng.integers(0, d.kv_len + 1, d.batch), jnp.int32)
  if d.positions:
    # Increasing key positions with gaps and repeats; queries among them
    # (at a key's position or one past), in any order.
    kv_pos = np.cumsum(rng.integers(0, 3, (d.batch, d.kv_len)), axis=1)
    q_pos = np.take_along_axis(
        kv_pos, rng.integers(0, d.kv_len, (d.batch, d.q_len)), axis=1)
    q_pos = q_pos + rng.integers(0, 2, q_pos.shape)
    call["q_positions"] = jnp.asarray(q_pos, jnp.int32)
    call["kv_positions"] = jnp.asarray(kv_pos, jnp.int32)
  if d.mask:
    shape = (d.batch, 1, d.q_len, d.kv_len) if rng.random() < 0.5 else (
        1, d.heads, d.q_len, d.kv_len)
    call["mask"] = jnp.asarray(rng.random(shape) < 0.8)
  if not d.cache:
    return Inputs(floats, call)

  # A cache of capacity L = kv_len holding `lengths` tokens per row (the
  # first `shared` the same in every row), the call's q_len new tokens
  # after them (`q_lengths` of them real).
  capacity = d.kv_len
  q_lengths = (rng.integers(0, d.q_len + 1, d.batch) if d.ragged_q
               else np.full(d.batch, d.q_len))
  shared = min(d.shared_pages * d.page_size, capacity - d.q_len)
  shared -= shared % d.page_size  # Whole pages only.
  lengths = rng.integers(shared, capacity - q_lengths + 1)
  overflow = np.zeros(d.batch, bool)
  if d.overflow:
    # Row b's last new token lands past L (dense), or in a page its table
    # does not name (paged).
    b = int(rng.integers(d.batch))
    q_lengths[b] = max(q_lengths[b], 1)
    overflow[b] = True
    if d.cache == "dense":
      lengths[b] = capacity - q_lengths[b] + 1
    else:
      lengths[b] = rng.integers(shared, capacity - q_lengths[b] + 1)
  keys = np.zeros((d.batch, capacity, d.kv_heads, d.head_dim), np.float32)
  values = np.zeros((d.batch, capacity, d.kv_heads, d.value_dim), np.float32)
  for b, n in enumerate(lengths):
    keys[b, :n] = rng.standard_normal((n, d.kv_heads, d.head_dim))
    values[b, :n] = rng.standard_normal((n, d.kv_heads, d.value_dim))
  keys[:, :shared], values[:, :shared] = keys[0, :shared], values[0, :shared]
  keys, values = keys.astype(dtype), values.astype(dtype)
  if d.cache == "dense":
    cache = fa.KVCache(jnp.asarray(keys), jnp.asarray(values),
                       jnp.asarray(lengths, jnp.int32))
  else:
    cache = _paged(rng, d, keys, values, lengths, lengths + q_lengths,
                   shared // d.page_size, overflow)
  # The new keys/values are the ones drawn above, cut to Sq.
  floats["k"] = floats["k"][:, :d.q_len]
  floats["v"] = floats["v"][:, :d.q_len]
  call["q_lengths"] = jnp.asarray(q_lengths, jnp.int32)
  return Inputs(floats, call, cache=cache, tokens=(keys, values),
                lengths=lengths, q_lengths=q_lengths, overflow=overflow)


def _paged(rng, d: Draw, keys, values, lengths, new_lengths, shared: int,
           overflow):
  """A paged cache holding `keys`/`values` `[B, L, ...]` (`lengths` tokens
  per row): pages shuffled; the first `shared` pages of every row the same
  ones (a common prefix, read only); each row's slots past the pages its
  `new_lengths` need assigned or, one time in two, `UNASSIGNED`; in an
  `overflow` row, the page of its last new token unassigned."""
  page = d.page_size
  max_pages = -(-d.kv_len // page)
  num_pages = d.batch * max_pages + 2
  ids = rng.permutation(num_pages)[:d.batch * max_pages].reshape(
      d.batch, max_pages)
  ids[:, :shared] = ids[0, :shared]
  for b in range(d.batch):
    need = -(-int(new_lengths[b]) // page)
    if rng.random() < 0.5:
      ids[b, need:] = cache_lib.UNASSIGNED
    if overflow[b]:
      ids[b, need - 1] = cache_lib.UNASSIGNED
  cache = fa.init_paged_cache(num_pages, page, d.kv_heads, d.head_dim,
                              keys.dtype, batch_size=d.batch,
                              max_pages_per_row=max_pages,
                              value_dim=d.value_dim)
  key_pages = np.array(cache.key_pages)
  value_pages = np.array(cache.value_pages)
  for b in range(d.batch):
    for t in range(int(lengths[b])):
      if ids[b, t // page] != cache_lib.UNASSIGNED:
        key_pages[ids[b, t // page], t % page] = keys[b, t]
        value_pages[ids[b, t // page], t % page] = values[b, t]
  return fa.PagedKVCache(jnp.asarray(key_pages), jnp.asarray(value_pages),
                         jnp.asarray(ids, jnp.int32),
                         jnp.asarray(lengths, jnp.int32))


# --- The oracle ----------------------------------------------------------------


@dataclasses.dataclass
class Result:
  out: np.ndarray
  lse: np.ndarray
  grads: dict[str, np.ndarray]
  keys: np.ndarray | None = None  # A cache call's updated dense tokens,
  values: np.ndarray | None = None  # `[B, L, Hkv, D|Dv]`,
  tokens: np.ndarray | None = None  # ... and each row's count `[B]`.
  # The reference's: `returned -> grads` with a tiled backward's delta
  # (`_tiled_grads`).
  tiled_grads: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None
  # Of a `SUMMED` gradient: per element, the sum of the magnitudes of the
  # terms it adds up (`_slope_terms`), where the reference computes them.
  summed_terms: dict[str, np.ndarray] = dataclasses.field(
      default_factory=dict)


def expected(d: Draw, x: Inputs) -> Result:
  """The reference of the call, not through the modules."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  call = dict(x.call)
  prefix = call.pop("prefix", None)
  if d.cache:
    return _expected_cache(d, x, prefix)
  q_pos = call.get("q_positions")
  kv_pos = call.get("kv_positions")
  if q_pos is None:
    q_pos = jnp.broadcast_to(jnp.arange(d.q_len) + d.kv_len - d.q_len,
                             (d.batch, d.q_len))
    kv_pos = jnp.broadcast_to(jnp.arange(d.kv_len), (d.batch, d.kv_len))

  # The module draws its dropout key from the apply rng (`_rng(d)`); the
  # reference keeps the same keys.
  dropout = (helpers.reference_dropout(_rng(d), d.dropout) if d.dropout
             else None)

  def f(floats, terms):
    mod_bias, mod_mask = _dense_mods(d, q_pos, kv_pos, floats.get("slopes"),
                                     prefix, terms)
    bias = floats.get("bias")
    bias = None if bias is None else f32(bias)
    if mod_bias is not None:
      bias = mod_bias if bias is None else bias + mod_bias
    mask = call.get("mask")
    if mod_mask is not None:
      mask = mod_mask if mask is None else mask & mod_mask
    rest = {k: v for k, v in call.items() if k != "mask"}
    inputs = fa.canonicalize(f32(floats["q"]), f32(floats["k"]),
                             f32(floats["v"]), bias=bias, mask=mask,
                             causal=d.causal, sliding_window=d.window,
                             **rest)
    result = fa.reference_attention(
        inputs.query, inputs.key, inputs.value, inputs.bias,
        inputs.visibility, dropout, sm_scale=d.head_dim**-0.5,
        softcap=d.softcap, sinks=floats.get("sinks"))
    return result.out, result.lse

  (out, lse), vjp = jax.vjp(f, x.floats, _zero_terms(d))
  grads, dbias = vjp((_cotangent(d), jnp.zeros_like(lse)))
  tiled = _tiled_grads(d, out, lambda dout, dlse: vjp((dout, dlse))[0])
  return Result(np.asarray(out), np.asarray(lse), _numpy(grads),
                tiled_grads=tiled,
                summed_terms=_slope_terms(d, q_pos, kv_pos, dbias))


def _numpy(grads):
  return {k: np.asarray(g) for k, g in grads.items()}


def _tiled_grads(d: Draw, out, vjp):
  """`returned -> grads`: the reference's gradients as a tiled backward
  computes them from the output it `returned` (`[B, Sq, H, Dv]`, float32).

  A mechanism's output is in the call's dtype, so its cotangent dO arrives
  rounded to it; and the tiled backward (`blockwise`, `flash`, `ring`;
  FlashAttention's and cuDNN's too) takes `delta = rowsum(dO O)` from the
  output it returned, not the exact `sum_j P_ij dP_ij`. Its `dS = P (dP -
  delta)` so differs from the reference's by `-P_ij c_i`, `c_i = dO_i (O_i -
  Ō_i)` (O returned, Ō the reference's output): the gradient of `-c_i
  lse_i`. So the reference's vjp with the rounded dO and `-c` as the lse's
  cotangent is that gradient. In bfloat16 the difference matters where a
  gradient is a sum whose terms cancel (the slopes of a score_mod, sinks, dK
  of a key few queries see): `blockwise`'s and `flash`'s slopes of seed
  2193 are 7.9e-2 from the exact gradient and 2.5e-6 from this one. With
  the reference's own output as `returned` (c = 0) it is the gradient with
  the exact delta and the rounded dO.
  `vjp(dout [B, Sq, H, Dv], dlse [B, H, Sq])` is the reference's vjp."""
  dout = jnp.asarray(_cotangent(d), d.dtype).astype(jnp.float32)

  def grads(returned):
    error = jnp.where(jnp.isnan(out), 0.0, jnp.asarray(returned) - out)
    return _numpy(vjp(dout, -jnp.einsum("bqhd,bqhd->bhq", dout, error)))

  return grads


def _expected_cache(d: Draw, x: Inputs, prefix) -> Result:
  """A cache call: the full causal call over each row's tokens (the old
  ones, then the new ones written at the row's length), its queries at
  positions `length + i`; padded query slots zeros (lse -inf); a row that
  overflows NaN, a constant (no gradient flows from it)."""
  q_pos = jnp.asarray(x.lengths[:, None] + np.arange(d.q_len)[None], jnp.int32)
  kv_pos = jnp.broadcast_to(jnp.arange(d.kv_len), (d.batch, d.kv_len))
  valid = np.arange(d.q_len)[None] < x.q_lengths[:, None]  # [B, Sq]
  valid &= ~x.overflow[:, None]
  nan = np.broadcast_to(x.overflow[:, None], valid.shape)  # [B, Sq]

  def f(floats, terms):
    keys, values = (jnp.asarray(t, jnp.float32) for t in x.tokens)
    for b in range(d.batch):
      n, m = int(x.lengths[b]), int(x.q_lengths[b])
      m = min(m, d.kv_len - n)  # An overflowing row (NaN below) keeps less.
      keys = keys.at[b, n:n + m].set(floats["k"][b, :m].astype(jnp.float32))
      values = values.at[b, n:n + m].set(
          floats["v"][b, :m].astype(jnp.float32))
    mod_bias, mod_mask = _dense_mods(d, q_pos, kv_pos, floats.get("slopes"),
                                     prefix, terms)
    inputs = fa.canonicalize(
        floats["q"].astype(jnp.float32), keys, values, bias=mod_bias,
        mask=mod_mask, causal=True, sliding_window=d.window,
        kv_lengths=jnp.asarray(x.lengths + x.q_lengths, jnp.int32),
        q_positions=q_pos, kv_positions=kv_pos)
    result = fa.reference_attention(
        inputs.query, inputs.key, inputs.value, inputs.bias,
        inputs.visibility, sm_scale=d.head_dim**-0.5, softcap=d.softcap,
        sinks=floats.get("sinks"))
    out = jnp.where(valid[:, :, None, None], result.out, 0.0)
    out = jnp.where(nan[:, :, None, None], jnp.nan, out)
    lse = jnp.where(valid[:, None], result.lse, -jnp.inf)
    lse = jnp.where(nan[:, None], jnp.nan, lse)
    return out, lse, (keys, values)

  (out, lse, (keys, values)), vjp = jax.vjp(f, x.floats, _zero_terms(d))
  no_cache = (jnp.zeros_like(keys), jnp.zeros_like(values))
  grads, dbias = vjp((_cotangent(d), jnp.zeros_like(lse), no_cache))
  tiled = _tiled_grads(
      d, out, lambda dout, dlse: vjp((dout, dlse, no_cache))[0])
  # The rows' tokens are compared, not those of a row that overflowed (it
  # lost tokens).
  tokens = np.where(x.overflow, 0, x.lengths + x.q_lengths)
  return Result(np.asarray(out), np.asarray(lse), _numpy(grads),
                np.asarray(keys), np.asarray(values), tokens, tiled,
                _slope_terms(d, q_pos, kv_pos, dbias))


def _rng(d: Draw) -> jax.Array:
  """The apply rng of the draw's module call (its dropout key's source)."""
  return jax.random.PRNGKey(d.seed)


def _cotangent(d: Draw):
  rng = np.random.default_rng(20_000 + d.seed)
  return jnp.asarray(rng.standard_normal(
      (d.batch, d.q_len, d.heads, d.value_dim)), jnp.float32)


# --- A mechanism ---------------------------------------------------------------


def actual(mechanism: str, d: Draw, x: Inputs, jit: bool = True) -> Result:
  """The mechanism's call through `fa.create_attention` (jitted, or op by
  op)."""
  maybe_jit = jax.jit if jit else lambda f: f
  mechanism, options = MECHANISMS[mechanism]
  options = dict(options, sliding_window=d.window,
                 dropout_rate=d.dropout,
                 logits_soft_cap=d.softcap, value_dim=d.value_dim)
  if mechanism not in ("vanilla", "auto"):
    # The flash kernels take tiles of 16 and more.
    least = 16 if "flash" in (mechanism, options.get("block_kernel"),
                              options.get("local_mechanism")) else 1
    options["block_sizes"] = fa.BlockSizes(*(max(n, least) for n in d.blocks))
  if d.mesh:
    options["mesh"] = fa.make_mesh(d.mesh)
  if d.score_mod:
    options["score_mod"] = _score_mod
  if d.mask_mod:
    options["mask_mod"] = _MASK_MODS[d.mask_mod]
  call = dict(x.call)
  prefix = call.pop("prefix", None)

  def forward(floats, call, cache):
    attention = fa.create_attention(mechanism, num_heads=d.heads,
                                    head_dim=d.head_dim,
                                    num_kv_heads=d.kv_heads, **options)
    kwargs = dict(call, causal=d.causal, return_lse=True,
                  deterministic=not d.dropout)
    for name in ("bias", "sinks"):
      if name in floats:
        kwargs[name] = floats[name]
    if prefix is not None:
      kwargs["mod_args"] = (floats.get("slopes", jnp.zeros(d.heads)), prefix)
    if cache is not None:
      kwargs["cache"] = cache
    return attention(floats["q"], floats["k"], floats["v"], **kwargs)

  transformed = hk.transform(forward)
  apply = lambda *args: transformed.apply({}, _rng(d), *args)
  def loss(floats):
    result = apply(floats, call, x.cache)
    out = result.attention_outputs.astype(jnp.float32)
    # An overflowing row's NaN is a constant: it takes no cotangent.
    out_ct = jnp.where(jnp.isnan(out), 0.0, out) * _cotangent(d)
    return jnp.sum(out_ct), (out, result.lse, result.cache)

  if not jit:  # The forward alone too (differentiating traces it).
    apply(x.floats, call, x.cache)
  grads, (out, lse, cache) = maybe_jit(jax.grad(loss, has_aux=True))(
      x.floats)
  keys = values = None
  if d.cache == "paged":
    keys, values = jax.jit(cache_lib.dense_view)(cache)
  elif d.cache == "dense":
    keys, values = cache.keys, cache.values
  if keys is not None:
    keys = np.asarray(keys, np.float32)[:, :d.kv_len]
    values = np.asarray(values, np.float32)[:, :d.kv_len]
  return Result(np.asarray(out, np.float32), np.asarray(lse),
                {k: np.asarray(g, np.float32) for k, g in grads.items()},
                keys, values)


# --- Comparing -----------------------------------------------------------------


def compare(d: Draw, got: Result,
            want: Result) -> tuple[list[str], dict[str, float]]:
  """`(failures, errors)` of `got` against `want`: what failed (empty: it
  passed) and the relative error of each quantity compared."""
  failures, errors = [], {}

  def check(what, a, b, *others):
    """`a` within the tolerance of `b`, or of one of `others` (as close)."""
    tol = TOLERANCES[d.dtype]
    if what in SUMMED:
      tol = SUMMED_TOLERANCES.get(d.dtype, tol)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
      failures.append(f"{what}: shape {a.shape} != {b.shape}")
    elif not np.all(np.isfinite(a)):
      failures.append(f"{what}: non-finite values")
    else:
      if what in SUMMED:
        # Relative to the largest of the reference's gradients: where the
        # terms cancel to float32's rounding of them, the exact gradient is
        # that rounding, and how far the output's rounding moves the tiled
        # one is the precision to which the quantity is defined.
        scale = max(np.max(np.abs(c), initial=0.0) for c in (b, *others))
        terms = want.summed_terms.get(what[1:])
        if terms is not None:
          # Or, where they cancel further, to the rounding of the terms in
          # the call's dtype: an error within `SUMMED_ROUNDINGS` of it
          # passes.
          rounding = float(jnp.finfo(d.dtype).eps) / 2
          scale = max(scale, SUMMED_ROUNDINGS * rounding
                      * float(np.max(terms)) / tol)
        errors[what] = float(min(np.max(np.abs(a - c), initial=0.0)
                                 for c in (b, *others)) / (scale or 1.0))
      else:
        errors[what] = min(helpers.relative_error(a, c)
                           for c in (b, *others))
      if errors[what] > tol:
        failures.append(f"{what}: relative error {errors[what]:.3g} > "
                        f"{tol:.3g}")

  # NaN where the reference is (overflowing rows), and only there.
  for what, a, b in (("out", got.out, want.out), ("lse", got.lse, want.lse)):
    if not np.all(np.isnan(a)[np.isnan(b)]):
      failures.append(f"{what}: not NaN on a row that overflows")
  nan = np.isnan(want.out)
  check("out", np.where(nan, 0, got.out), np.where(nan, 0, want.out))
  empty = np.isneginf(want.lse)
  nan = np.isnan(want.lse)
  if not np.array_equal(np.isneginf(got.lse), empty):
    failures.append("lse: -inf on other rows than the reference's")
  else:
    skip = empty | nan
    check("lse", np.where(skip, 0, got.lse), np.where(skip, 0, want.lse))
  # A gradient matches the exact one, the one with the delta of the output
  # the mechanism returned (`_tiled_grads`), or the one with the exact
  # delta and dO rounded to the output's dtype (what a mechanism that
  # differentiates its own dense computation, `vanilla`, gets): all three
  # are the reference's.
  tiled = want.tiled_grads(np.where(np.isnan(got.out), 0, got.out))
  rounded = want.tiled_grads(np.where(np.isnan(want.out), 0, want.out))
  for name, g in want.grads.items():
    check(f"d{name}", got.grads.get(name, np.zeros_like(g)), g, tiled[name],
          rounded[name])
  if want.keys is not None:
    # Only each row's tokens are compared: slots past them are unspecified.
    for b, n in enumerate(want.tokens):
      check("cache keys", got.keys[b, :n], want.keys[b, :n])
      check("cache values", got.values[b, :n], want.values[b, :n])
  return failures, errors


@dataclasses.dataclass
class Outcome:
  """A mechanism on a draw: `verdict` "pass", "refused" (`details` says
  why), "skipped" (not fuzzed there) or "fail" (`details` says what), and
  the relative `errors` of what it computed."""

  verdict: str
  details: list[str] = dataclasses.field(default_factory=list)
  errors: dict[str, float] = dataclasses.field(default_factory=dict)


def fuzz(seed: int, mechanism: str, jit: bool = True) -> Outcome:
  """Runs `mechanism` on the draw of `seed` (jitted, or op by op) and
  checks it."""
  d = draw(seed)
  if mechanism in SEQUENCE_ONLY and (d.mesh or (1,) * 4)[3] == 1:
    return Outcome("skipped")
  x = make_inputs(d)
  want = expected(d, x)
  try:
    got = actual(mechanism, d, x, jit)
  except (NotImplementedError, ValueError) as e:
    verdict = "fail" if mechanism in NEVER_REFUSE else "refused"
    return Outcome(verdict, [f"{type(e).__name__}: {e}"])
  except Exception:  # pylint: disable=broad-except
    return Outcome("fail", [traceback.format_exc(limit=-3)])
  failures, errors = compare(d, got, want)
  return Outcome("fail" if failures else "pass", failures, errors)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", default="0:20", help="start:stop")
  parser.add_argument("--mechanisms", default=",".join(MECHANISMS))
  parser.add_argument("--show_refusals", action="store_true")
  parser.add_argument("--op_by_op", action="store_true",
                      help="call the mechanisms without jit")
  parser.add_argument("--verbose", action="store_true",
                      help="one line per (seed, mechanism)")
  args = parser.parse_args(argv)
  start, stop = (int(s) for s in args.seeds.split(":"))
  counts: dict[str, int] = {}
  worst: dict[tuple[str, str], float] = {}  # (dtype, quantity) -> error
  for seed in range(start, stop):
    for mechanism in args.mechanisms.split(","):
      outcome = fuzz(seed, mechanism, jit=not args.op_by_op)
      counts[outcome.verdict] = counts.get(outcome.verdict, 0) + 1
      dtype = draw(seed).dtype
      for what, err in outcome.errors.items():
        worst[dtype, what] = max(worst.get((dtype, what), 0.0), err)
      if (args.verbose or outcome.verdict == "fail" or
          (outcome.verdict == "refused" and args.show_refusals)):
        print(f"seed {seed} {mechanism} {outcome.verdict}: "
              f"{describe(draw(seed))}", flush=True)
        for line in outcome.details:
          print("   ", line, flush=True)
  print("largest errors:", ", ".join(
      f"{dtype} {what} {err:.2g}" for (dtype, what), err in sorted(worst.items())))
  print("summary:", counts, flush=True)
  return int(counts.get("fail", 0) > 0)


if __name__ == "__main__":
  sys.exit(main())
