"""Decoding through the modules: paged and dense caches, ragged new tokens,
the log-sum-exp and `merge_attention`, for every mechanism that runs on CPU.

Each case is checked against the float32 reference of the same attention
written without a cache (a full causal forward over the row's tokens), so a
mechanism is never compared with itself. `flash` runs its kernels in
Pallas' interpreter (cache calls go to its decode kernel, which a test
pins). Tolerance 2e-5 in float32, relative to the largest reference entry.
"""

from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.core import cache as cache_lib
from flexible_attention.mechanisms import registry

B, H, HKV, D = 2, 4, 2, 16
PAGE, MAX_PAGES, NUM_PAGES = 8, 4, 10
TOL = 2e-5
# The mechanisms that take a cache on CPU, with the options they need here
# (`auto` serves these calls with `vanilla` on CPU, and `ulysses` on no mesh
# is its local mechanism, `blockwise`: the same programs, compiled again;
# tests/test_conformance.py checks that both build their delegate's kernel).
MECHANISMS = {
    "vanilla": {}, "blockwise": {}, "flash": dict(interpret=True),
    "ring": {},
}


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


def _tokens(seed, length):
  """Random q, k, v of `length` tokens, as numpy arrays (sliced and stacked
  on the host: no program compiled per slice)."""
  rng = np.random.default_rng(seed)
  arr = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return arr(B, length, H, D), arr(B, length, HKV, D), arr(B, length, HKV, D)


def _paged_cache():
  """Pages assigned out of order (shared prefix pages: test_cache.py)."""
  table = np.array([[7, 2, 9, 0], [4, 8, 1, 5]], np.int32)
  cache = fa.init_paged_cache(NUM_PAGES, PAGE, HKV, D, batch_size=B,
                              max_pages_per_row=MAX_PAGES)
  return cache._replace(page_table=jnp.asarray(table))


def _dense_cache():
  return fa.init_cache(B, PAGE * MAX_PAGES, HKV, D)


def _step(mechanism, cache, q, k, v, q_lengths=None, **options):
  """One module call on the cache (compiled): `(out, lse, new cache)`."""
  options = dict(MECHANISMS[mechanism], **options)

  def forward(q, k, v, cache, q_lengths):
    attention = fa.create_attention(mechanism, num_heads=H, head_dim=D,
                                    num_kv_heads=HKV, **options)
    return attention(q, k, v, cache=cache, q_lengths=q_lengths, causal=True,
                     return_lse=True)

  result = jax.jit(hk.without_apply_rng(hk.transform(forward)).apply)(
      {}, q, k, v, cache, q_lengths)
  return result.attention_outputs, result.lse, result.cache


@functools.partial(jax.jit, static_argnames=("sliding_window", "softcap"))
def _full(q, k, v, sliding_window=None, softcap=None):
  """The reference: one causal call over all of a row's tokens (compiled).
  Query i of a causal call sees keys 0..i, so the rows of a prefix of the
  tokens are the first rows of the call over all of them."""
  inputs = fa.canonicalize(q, k, v, causal=True,
                           sliding_window=sliding_window)
  return fa.reference_attention(inputs.query, inputs.key, inputs.value,
                                None, inputs.visibility, None,
                                sm_scale=D**-0.5, softcap=softcap)


@pytest.mark.parametrize("mechanism", sorted(MECHANISMS))
def test_paged_and_dense_decoding_equal_the_full_forward(mechanism):
  """A prefill of 9 tokens (row 1: 6, ragged), then a step of one token:
  every step's outputs and lse equal the full causal forward's rows, on a
  paged and on a dense cache, and both caches end holding the same keys."""
  q, k, v = _tokens(0, 11)
  want = _full(q, k, v)
  results = {}
  for kind, cache in (("paged", _paged_cache()), ("dense", _dense_cache())):
    lengths = np.array([9, 6])
    out, lse, cache = _step(mechanism, cache, q[:, :9], k[:, :9], v[:, :9],
                            jnp.asarray(lengths))
    for b, n in enumerate(lengths):
      # Row b's prefill rows are the full forward's first n rows (its
      # later slots are padding: zeros, lse -inf).
      assert _rel(out[b, :n], want.out[b, :n]) <= TOL, (kind, b)
      assert _rel(lse[b, :, :n], want.lse[b, :, :n]) <= TOL, (kind, b)
      np.testing.assert_array_equal(out[b, n:], 0.0)
      assert np.all(np.isneginf(np.asarray(lse[b, :, n:])))
    for step in range(1):  # Row 0 decodes token 9; row 1 token 6.
      idx = lengths + step
      pick = lambda x: np.stack([x[b, i:i + 1] for b, i in enumerate(idx)])
      out, lse, cache = _step(mechanism, cache, pick(q), pick(k), pick(v))
      for b, i in enumerate(idx):
        # Row i of the full forward: token i after the tokens before it.
        assert _rel(out[b, 0], want.out[b, i]) <= TOL, (kind, step, b)
        assert _rel(lse[b, :, 0], want.lse[b, :, i]) <= TOL
    results[kind] = cache
  np.testing.assert_array_equal(results["paged"].lengths, [10, 7])
  keys, _ = jax.jit(cache_lib.dense_view)(results["paged"])
  for b, n in enumerate([10, 7]):
    np.testing.assert_array_equal(keys[b, :n], results["dense"].keys[b, :n])
  assert want.out.shape == (B, 11, H, D)


@pytest.mark.parametrize("mechanism", ["vanilla", "flash"])
def test_several_new_tokens_with_window_and_softcap(mechanism):
  """Chunked prefill / speculative verification: 4 new tokens after 13,
  with a sliding window and a soft cap."""
  q, k, v = _tokens(1, 17)
  cache = _paged_cache()
  _, _, cache = _step(mechanism, cache, q[:, :13], k[:, :13], v[:, :13],
                      sliding_window=5, logits_soft_cap=3.0)
  out, lse, _ = _step(mechanism, cache, q[:, 13:], k[:, 13:], v[:, 13:],
                      sliding_window=5, logits_soft_cap=3.0)
  want = _full(q, k, v, sliding_window=5, softcap=3.0)
  assert _rel(out, want.out[:, 13:]) <= TOL
  assert _rel(lse, want.lse[:, :, 13:]) <= TOL


def test_flash_serves_cache_calls_with_its_decode_kernel():
  q, k, v = _tokens(2, 3)

  def forward(q, k, v, cache):
    attention = fa.create_attention("flash", num_heads=H, head_dim=D,
                                    num_kv_heads=HKV, interpret=True)
    return attention(q, k, v, cache=cache).attention_outputs

  jaxpr = str(jax.make_jaxpr(hk.without_apply_rng(hk.transform(
      forward)).apply)({}, q, k, v, _paged_cache()))
  assert "flash_decode" in jaxpr
  assert "flash_forward" not in jaxpr  # Not the general kernels.


# `merge_attention` reads only the calls' outputs and lses: flash's lse is
# checked against the reference by tests/test_flash_kernel.py (and through
# the module with sinks and mods by tests/test_sinks.py and test_mods.py),
# so its interpreted kernels are not run again here.
@pytest.mark.parametrize("mechanism", sorted(set(MECHANISMS) - {"flash"}))
def test_merge_attention_of_two_calls_equals_one_call(mechanism):
  """Attention over keys [0, 7) and [7, 12), merged by their lses, equals
  one call over all 12 (no cache, not causal)."""
  q, k, v = _tokens(3, 12)
  q = q[:, :5]

  def forward(q, k, v):
    attention = fa.create_attention(mechanism, num_heads=H, head_dim=D,
                                    num_kv_heads=HKV, **MECHANISMS[mechanism])
    result = attention(q, k, v, return_lse=True)
    return result.attention_outputs, result.lse

  call = hk.without_apply_rng(hk.transform(forward)).apply

  @jax.jit
  def merged(q, k, v):  # Both calls and their merge: one program.
    parts = [call({}, q, k[:, :7], v[:, :7]), call({}, q, k[:, 7:], v[:, 7:])]
    return fa.merge_attention(*zip(*parts))

  @jax.jit
  def reference(q, k, v):
    inputs = fa.canonicalize(q, k, v)
    return fa.reference_attention(inputs.query, inputs.key, inputs.value,
                                  None, inputs.visibility, None,
                                  sm_scale=D**-0.5)

  out, lse = merged(q, k, v)
  want = reference(q, k, v)
  assert _rel(out, want.out) <= TOL
  assert _rel(lse, want.lse) <= TOL


def test_return_lse_is_refused_where_a_mechanism_cannot_give_it():
  request = fa.AttentionRequest(
      dims=fa.canonicalize(*_tokens(4, 3)).dims, dtype="bfloat16",
      platform="gpu", features=frozenset({"lse"}))
  reason = registry.unsupported_reason("cudnn", request)
  assert reason is not None and "'lse'" in reason
  assert "vanilla" in reason


@pytest.mark.parametrize("bad, match", [
    (dict(q_lengths=jnp.asarray([1, 2, 3])), r"q_lengths must be \[B\]"),
    (dict(q_lengths=jnp.asarray([3, 1])), r"q_lengths must be in \[0, Sq"),
    (dict(cache=None, q_lengths=jnp.asarray([1, 1])), "q_lengths counts"),
    (dict(return_lse="yes"), "return_lse must be a bool"),
    (dict(deterministic="False"), "deterministic must be a bool"),
])
def test_bad_decoding_arguments_are_refused(bad, match):
  q, k, v = _tokens(5, 2)
  call = {"cache": _paged_cache(), **bad}

  def forward(q, k, v):
    attention = fa.create_attention("vanilla", num_heads=H, head_dim=D,
                                    num_kv_heads=HKV)
    return attention(q, k, v, **call).attention_outputs

  with pytest.raises((ValueError, TypeError), match=match):
    hk.without_apply_rng(hk.transform(forward)).apply({}, q, k, v)


@pytest.mark.parametrize("mechanism", sorted(MECHANISMS))
def test_a_paged_row_whose_pages_run_out_gives_nan(mechanism):
  """NaN in every slot of the row, its padded ones too (flash's kernel
  poisons the row itself; its padded slots were once zeroed after it)."""
  q, k, v = _tokens(6, 3)
  cache = _paged_cache()
  cache = cache._replace(lengths=jnp.asarray([PAGE * MAX_PAGES - 1, 0],
                                             jnp.int32))
  out, lse, new = _step(mechanism, cache, q, k, v, jnp.asarray([2, 3]))
  assert np.all(np.isnan(np.asarray(out[0])))
  assert np.all(np.isnan(np.asarray(lse[0])))
  assert np.all(np.isfinite(np.asarray(out[1])))
  np.testing.assert_array_equal(new.lengths, [PAGE * MAX_PAGES + 1, 3])
