"""The oracle itself: `fa.canonicalize` + `fa.reference_attention` against a
naive, independent numpy transcription of DESIGN.md's semantics.

The conformance battery compares every mechanism with the reference, so a
mistake shared by the reference and the mechanisms (both go through
`fa.canonicalize` and `Visibility`) would be invisible there. This file pins
the reference to the semantics written out by hand: default bottom-right
positions, causal, `int` and `(left, right)` windows, segment ids (pair and
single), kv lengths, explicit positions, boolean masks and biases with
broadcast shapes, the soft cap, grouped heads (query head `h` uses KV head
`h // G`), empty rows giving zeros, and dropout applied as
`p * keep / (1 - rate)` with the library's keep decisions, whose properties
(rate, purity in the coordinates, uint32-only arithmetic) are checked too.
Float64 numpy against the float32 reference: tolerance 1e-5 relative to max.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.core import dropout as dropout_lib

import helpers

TOL = 1e-5


def naive_attention(q, k, v, *, bias=None, mask=None, causal=False,
                    window=None, q_ids=None, kv_ids=None, kv_lengths=None,
                    q_pos=None, kv_pos=None, sm_scale, softcap=None,
                    keep=None, rate=0.0):
  """DESIGN.md's semantics, one (batch, head, query) at a time, in float64.

  `window` is the `sliding_window` option as the user gives it (an `int` or
  a pair); `keep` is a bool `[B, H, Sq, Sk]` of dropout keep decisions.
  Returns `(out [B, Sq, H, Dv], weights [B, H, Sq, Sk])`.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_size, sq, h_size, _ = q.shape
  sk, hkv = k.shape[1], k.shape[2]
  groups = h_size // hkv
  if q_pos is None:
    q_pos = np.broadcast_to(np.arange(sq) + (sk - sq), (b_size, sq))
  if kv_pos is None:
    kv_pos = np.broadcast_to(np.arange(sk), (b_size, sk))
  if isinstance(window, int):
    window = (window, 0) if causal else (window, window)
  full = (b_size, h_size, sq, sk)
  bias = None if bias is None else np.broadcast_to(
      np.asarray(bias, np.float64), full)
  mask = None if mask is None else np.broadcast_to(np.asarray(mask), full)
  out = np.zeros((b_size, sq, h_size, v.shape[-1]))
  weights = np.zeros(full)
  for b in range(b_size):
    for h in range(h_size):
      kh = h // groups
      for i in range(sq):
        visible = []
        for j in range(sk):
          ok = True
          if causal:
            ok &= kv_pos[b, j] <= q_pos[b, i]
          if window is not None:
            ok &= q_pos[b, i] - window[0] <= kv_pos[b, j] <= (
                q_pos[b, i] + window[1])
          if q_ids is not None:
            ok &= q_ids[b, i] == kv_ids[b, j]
          if kv_lengths is not None:
            ok &= j < kv_lengths[b]
          if mask is not None:
            ok &= bool(mask[b, h, i, j])
          if ok:
            visible.append(j)
        if not visible:
          continue  # No visible key: zeros.
        s = q[b, i, h] @ k[b, visible, kh].T * sm_scale
        if softcap is not None:
          s = softcap * np.tanh(s / softcap)
        if bias is not None:
          s = s + bias[b, h, i, visible]
        p = np.exp(s - s.max())
        p /= p.sum()
        if keep is not None:
          p = np.where(keep[b, h, i, visible], p / (1 - rate), 0.0)
        weights[b, h, i, visible] = p
        out[b, i, h] = p @ v[b, visible, kh]
  return out, weights


@dataclasses.dataclass(frozen=True)
class Setting:
  name: str
  batch: int = 2
  q_len: int = 7
  kv_len: int = 9
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 5
  value_dim: int = 3
  call: tuple[str, ...] = ()  # What to pass; inputs are drawn per name.
  causal: bool = False
  window: Any = None
  softcap: float | None = None
  sm_scale: float | None = None


SETTINGS = (
    Setting("plain"),
    Setting("mha_square", q_len=9, num_kv_heads=4),
    Setting("mqa", num_kv_heads=1),
    Setting("causal_sq_shorter_than_sk_is_bottom_right", causal=True),
    Setting("causal_sq_longer_than_sk_is_bottom_right", q_len=11,
            causal=True),
    Setting("window_int_without_causal_is_symmetric", window=2),
    Setting("window_int_with_causal_looks_back", window=2, causal=True),
    Setting("window_pair", window=(1, 3)),
    Setting("segments_pair", call=("segments_pair",)),
    Setting("segments_single", q_len=9, call=("segments_single",)),
    Setting("kv_lengths_with_zero", batch=3, call=("kv_lengths",),
            causal=True),
    Setting("explicit_positions", call=("positions",), causal=True,
            window=(3, 1)),
    Setting("mask_and_bias_broadcast", call=("mask_b11k", "bias_1hqk")),
    Setting("mask_rank2_and_full_bias", call=("mask_qk", "bias_bhqk")),
    Setting("softcap_and_scale", softcap=1.5, sm_scale=0.7, causal=True),
)


def _inputs(setting: Setting):
  rng = helpers.rng_for("reference", setting.name)
  b, sq, sk, h = (setting.batch, setting.q_len, setting.kv_len,
                  setting.num_heads)
  q, k, v = helpers.random_qkv(rng, b, sq, sk, h, setting.num_kv_heads,
                               setting.head_dim, setting.value_dim)
  call, naive = {}, {}
  for item in setting.call:
    if item == "segments_pair":
      q_ids = np.sort(rng.integers(0, 3, (b, sq)), 1)
      kv_ids = np.sort(rng.integers(0, 3, (b, sk)), 1)
      call["segment_ids"] = (jnp.asarray(q_ids), jnp.asarray(kv_ids))
      naive.update(q_ids=q_ids, kv_ids=kv_ids)
    elif item == "segments_single":
      ids = np.sort(rng.integers(0, 3, (b, sq)), 1)
      call["segment_ids"] = jnp.asarray(ids)
      naive.update(q_ids=ids, kv_ids=ids)
    elif item == "kv_lengths":
      lengths = np.array([0, 4, sk][:b])
      call["kv_lengths"] = jnp.asarray(lengths)
      naive["kv_lengths"] = lengths
    elif item == "positions":
      q_pos = np.stack([rng.permutation(20)[:sq] for _ in range(b)])
      kv_pos = np.stack([rng.permutation(20)[:sk] for _ in range(b)])
      call.update(q_positions=jnp.asarray(q_pos),
                  kv_positions=jnp.asarray(kv_pos))
      naive.update(q_pos=q_pos, kv_pos=kv_pos)
    elif item.startswith("mask_"):
      shape = {"mask_b11k": (b, 1, 1, sk), "mask_qk": (sq, sk)}[item]
      mask = rng.random(shape) < 0.7
      call["mask"] = jnp.asarray(mask)
      naive["mask"] = mask
    elif item.startswith("bias_"):
      shape = {"bias_1hqk": (1, h, sq, sk), "bias_bhqk": (b, h, sq, sk)}[item]
      bias = rng.standard_normal(shape)
      call["bias"] = jnp.asarray(bias, jnp.float32)
      naive["bias"] = np.asarray(call["bias"])
  return q, k, v, call, naive


def _reference(q, k, v, call, setting, dropout=None):
  @helpers.jit
  def run(q, k, v, call, dropout):
    inputs = fa.canonicalize(q, k, v, causal=setting.causal,
                             sliding_window=setting.window, **call)
    scale = setting.sm_scale or q.shape[-1]**-0.5
    return fa.reference_attention(
        inputs.query, inputs.key, inputs.value, inputs.bias,
        inputs.visibility, dropout, sm_scale=scale, softcap=setting.softcap,
        return_weights=True)

  result = run(q, k, v, call, dropout)
  return np.asarray(result.out), np.asarray(result.weights)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_reference_matches_naive_semantics(setting):
  q, k, v, call, naive = _inputs(setting)
  out, weights = _reference(q, k, v, call, setting)
  want_out, want_weights = naive_attention(
      q, k, v, causal=setting.causal, window=setting.window,
      sm_scale=setting.sm_scale or setting.head_dim**-0.5,
      softcap=setting.softcap, **naive)
  assert helpers.relative_error(out, want_out) <= TOL
  assert helpers.relative_error(weights, want_weights) <= TOL
  # Every setting leaves some keys visible; rows with none are exactly zero.
  assert np.any(want_weights > 0)
  empty = ~np.any(want_weights > 0, axis=-1)  # [B, H, Sq]
  assert np.all(np.moveaxis(out, 2, 1)[empty] == 0)


def test_reference_gradients_are_finite_for_fully_masked_rows():
  setting = Setting("grad_empty_rows", batch=3, call=("kv_lengths",),
                    causal=True, q_len=11)
  q, k, v, call, _ = _inputs(setting)
  ct = helpers.random_array(helpers.rng_for("ct"), q.shape[:3] + (3,))
  ref = helpers.reference_vjp(q, k, v, ct, call=dict(call, causal=True))
  for g in ref.grads:
    assert np.all(np.isfinite(g))
  # Batch row 0 has kv length 0: nothing flows anywhere.
  for g in ref.grads:
    assert np.all(g[0] == 0)
  assert ref.empty_rows[0].all()
  # Row 2 sees all 9 keys; with Sq = 11 its first 2 queries precede them.
  assert ref.empty_rows[2, :2].all() and not ref.empty_rows[2, 2:].any()


def test_reference_dropout_is_keep_times_inverse_rate():
  setting = Setting("dropout", causal=True)
  q, k, v, call, naive = _inputs(setting)
  rate = 0.4
  dropout = dropout_lib.make_dropout(jax.random.key(3), rate)
  out, weights = _reference(q, k, v, call, setting, dropout)
  b, sq, h, _ = q.shape
  sk = k.shape[1]
  keep = np.asarray(jax.jit(dropout.keep)(  # One program (op by op: ~20).
      np.arange(b)[:, None, None, None], np.arange(h)[None, :, None, None],
      (np.arange(sq) + sk - sq)[None, None, :, None],
      np.arange(sk)[None, None, None, :]))
  want_out, want_weights = naive_attention(
      q, k, v, causal=True, sm_scale=setting.head_dim**-0.5, keep=keep,
      rate=rate, **naive)
  assert helpers.relative_error(out, want_out) <= TOL
  assert helpers.relative_error(weights, want_weights) <= TOL
  assert 0 < (weights == 0).sum() and np.any(weights > 1.0 / (1 - rate) / sk)


def test_dropout_keep_rate_and_key_dependence():
  coords = np.meshgrid(np.arange(4), np.arange(8), np.arange(64),
                       np.arange(64), indexing="ij")
  seed = dropout_lib.seed_from_key(jax.random.key(0))
  # Compiled once per rate (op by op, each call was ~20 small programs).
  dropout_keep = jax.jit(dropout_lib.dropout_keep, static_argnums=5)
  for rate in (0.1, 0.5, 0.9):
    keep = np.asarray(dropout_keep(seed, *coords, rate))
    assert abs(keep.mean() - (1 - rate)) < 0.01, (rate, keep.mean())
  keep = np.asarray(dropout_keep(seed, *coords, 0.5))
  other = np.asarray(dropout_keep(
      dropout_lib.seed_from_key(jax.random.key(1)), *coords, 0.5))
  assert abs((keep == other).mean() - 0.5) < 0.01  # Independent keys.
  # Neighbouring coordinates are uncorrelated along every axis.
  for axis in range(4):
    same = (np.take(keep, range(1, keep.shape[axis]), axis) ==
            np.take(keep, range(keep.shape[axis] - 1), axis)).mean()
    assert abs(same - 0.5) < 0.02, (axis, same)


def test_dropout_keep_is_a_pure_function_of_coordinates():
  """Permuting the tokens (with their positions) permutes the decisions:
  what a layout-independent (sharded, ring, cached) dropout relies on."""
  dropout = dropout_lib.make_dropout(jax.random.key(5), 0.5)
  q_pos = np.arange(16)
  perm = helpers.rng_for("perm").permutation(16)
  keep = lambda qp, kp: np.asarray(jax.jit(dropout.keep)(
      np.arange(2)[:, None, None, None], np.arange(3)[None, :, None, None],
      qp[None, None, :, None], kp[None, None, None, :]))
  np.testing.assert_array_equal(keep(q_pos[perm], q_pos[perm]),
                                keep(q_pos, q_pos)[:, :, perm][..., perm])
  # Shard offsets address the same global coordinates.
  shifted = dropout.with_offsets(1, 2)
  got = np.asarray(jax.jit(shifted.keep)(0, 0, 3, 4))
  want = np.asarray(jax.jit(dropout.keep)(1, 2, 3, 4))
  assert got == want


def test_dropout_hash_uses_only_uint32_arithmetic():
  """So that Pallas kernels can call the same code (DESIGN.md, step 7)."""
  jaxpr = jax.make_jaxpr(dropout_lib.dropout_bits)(
      jnp.zeros((2,), jnp.uint32), jnp.int32(1), jnp.int32(2),
      jnp.zeros((4,), jnp.int32), jnp.zeros((4,), jnp.int32))
  allowed = {"mul", "xor", "shift_right_logical", "add", "convert_element_type",
             "broadcast_in_dim", "squeeze", "slice", "reshape",
             "dynamic_slice", "pjit", "jit", "gather", "concatenate"}
  for eqn in jaxpr.jaxpr.eqns:
    assert eqn.primitive.name in allowed, eqn.primitive.name
    for var in eqn.outvars:
      assert var.aval.dtype in (jnp.uint32, jnp.int32), (eqn, var.aval)
