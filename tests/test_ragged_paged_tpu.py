"""`flash`'s TPU cache path: JAX's ragged paged attention kernel, on CPU.

JAX's kernel runs in its TPU interpreter and is compared with the float32
reference on the record of the same call (built as the module builds it:
`cache.write`, the dense view, the cache's positions and lengths):

- the pure function (`kernels/ragged_paged_tpu.py`, `interpret=True`): a
  paged cache without causal (one kernel sequence per token), MQA, ragged
  new tokens; a dense cache in bfloat16 with a window;
- `flash` with its platform patched to "tpu" (its kernel made to run
  interpreted): a paged cache with a random non-contiguous table, rows of
  length 0, several new tokens with causal, ragged `q_lengths` (a row with
  none), a window and a soft cap, GQA, Dv != D; then the same program with
  no new token anywhere; `return_lse` and gradients refused;
- the refusals of the record and of `_tpu_limit_reason`, with their
  messages.

Each case is one jitted program (record, kernel, reference): the
interpreter's programs take seconds to compile. Measured errors (relative
to max): ~1e-7 in float32, ~2e-3 in bfloat16; padded slots are exact zeros.
"""

from __future__ import annotations

import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.core import cache as cache_lib
from flexible_attention.core.inputs import AttentionDims
from flexible_attention.kernels import flash as flash_kernel
from flexible_attention.kernels import ragged_paged_tpu
from flexible_attention.mechanisms import flash as flash_mechanism
from flexible_attention.mechanisms import registry

import helpers

PAGE_SIZE = 8
MAX_PAGES = 4  # L = 32 per row.
TILES = fa.BlockSizes(block_q=4, block_k=8)  # One page per KV block.
# flash's options take tiles its GPU kernels can use too (powers of 2 >= 16).
MODULE_TILES = fa.BlockSizes(block_q=16, block_k=16)


def _record(cache, q, k, v, *, causal, window=None, q_lengths=None):
  """The record a module builds for a cache call (base._attach_cache)."""
  new_cache, _ = cache_lib.write(cache, k, v, q_lengths)
  q_positions, q_valid = cache_lib.query_slots(cache, q.shape[1], q_lengths)
  keys, values = cache_lib.dense_view(new_cache)
  b, length = keys.shape[:2]
  inputs = fa.canonicalize(
      q, keys, values, causal=causal, kv_lengths=new_cache.lengths,
      q_positions=q_positions,
      kv_positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                    (b, length)),
      sliding_window=window)
  pages = new_cache if isinstance(new_cache, fa.PagedKVCache) else None
  return dataclasses.replace(inputs, pages=pages), q_valid


def _paged_cache(rng, lengths, hkv, d, dtype, dv=None, num_pages=24):
  """A paged cache with random contents and a random non-contiguous table
  (every row owns `MAX_PAGES` distinct pages of a shuffled pool)."""
  b = len(lengths)
  pool = helpers.random_array(rng, (num_pages, PAGE_SIZE, hkv, d), dtype)
  values = helpers.random_array(rng, (num_pages, PAGE_SIZE, hkv, dv or d),
                                dtype)
  table = rng.permutation(num_pages)[:b * MAX_PAGES].reshape(b, MAX_PAGES)
  return fa.PagedKVCache(pool, values, jnp.asarray(table, jnp.int32),
                         jnp.asarray(lengths, jnp.int32))


def _check(name, *, lengths, sq, h=4, hkv=2, d=16, dv=None, dtype="float32",
           causal=True, window=None, softcap=None, q_lengths=None,
           dense=False, block_sizes=TILES):
  rng = helpers.rng_for("ragged_paged_tpu", name)
  b = len(lengths)
  q = helpers.random_array(rng, (b, sq, h, d), dtype)
  k = helpers.random_array(rng, (b, sq, hkv, d), dtype)
  v = helpers.random_array(rng, (b, sq, hkv, dv or d), dtype)
  if dense:
    cache = fa.KVCache(
        helpers.random_array(rng, (b, 30, hkv, d), dtype),
        helpers.random_array(rng, (b, 30, hkv, dv or d), dtype),
        jnp.asarray(lengths, jnp.int32))
  else:
    cache = _paged_cache(rng, lengths, hkv, d, dtype, dv)
  if q_lengths is not None:
    q_lengths = jnp.asarray(q_lengths, jnp.int32)
  scale = d**-0.5

  @helpers.jit  # One program: the record, the kernel and the reference.
  def run(cache, q, k, v, q_lengths):
    inputs, q_valid = _record(cache, q, k, v, causal=causal, window=window,
                              q_lengths=q_lengths)
    out = ragged_paged_tpu.ragged_paged_attention(
        inputs, sm_scale=scale, softcap=softcap, block_sizes=block_sizes,
        interpret=True).out
    ref = fa.reference_attention(inputs.query, inputs.key, inputs.value,
                                 None, inputs.visibility, sm_scale=scale,
                                 softcap=softcap).out
    return out, jnp.where(q_valid[:, :, None, None], ref, 0.0), q_valid

  out, ref, q_valid = run(cache, q, k, v, q_lengths)
  assert out.shape == ref.shape and out.dtype == q.dtype
  helpers.assert_close(out, ref, dtype, name)
  # Padded slots are exact zeros.
  assert np.all(np.asarray(out, np.float32)[~np.asarray(q_valid)] == 0.0)


CASES = {
    # Without causal: each new token sees all of its row's keys (one kernel
    # sequence per token); ragged new tokens (a row with none); MQA.
    "paged_not_causal_mqa": dict(lengths=(4, 17, 9), sq=3, hkv=1,
                                 causal=False, q_lengths=(3, 2, 0)),
    # A dense cache, fused into pages of 32 (L = 30 padded); bfloat16 pages
    # (read as packed pairs); a window with causal; the default tiles.
    "dense_bfloat16_window": dict(lengths=(3, 26), sq=2, dense=True,
                                  dtype="bfloat16", window=6,
                                  block_sizes=None),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name):
  _check(name, **CASES[name])


# --- Refusals -----------------------------------------------------------------


def _request(features, *, q_len=1, heads=4, kv_heads=2, dtype="float32",
             window=None, options=(), block_size_fields=()):
  dims = AttentionDims(batch=2, q_len=q_len, kv_len=64, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=64, value_dim=64)
  base = {"cache", "positions", "kv_lengths"}
  return fa.AttentionRequest(
      dims=dims, dtype=dtype, platform="tpu",
      features=frozenset(base | set(features)), window=window,
      options=registry.Options(options), block_size_fields=block_size_fields)


def _reason(*args, **kwargs):
  return registry.unsupported_reason("flash", _request(*args, **kwargs))


def test_tpu_serves_cache_calls_with_its_features():
  assert _reason(()) is None
  assert _reason(("causal", "gqa", "window", "softcap"), q_len=16,
                 window=(8, 0)) is None
  assert _reason(("gqa",), q_len=4) is None  # Without causal.
  assert _reason((), dtype="bfloat16", heads=8, kv_heads=8) is None
  # Its tiles: any positive block_q / block_k; it reads no others.
  assert _reason((), block_size_fields=("block_q", "block_k")) is None
  assert "block_q_dkv" in _reason((), block_size_fields=("block_q_dkv",))


@pytest.mark.parametrize("feature", ["lse", "bias", "mask", "dropout",
                                     "weights"])
def test_tpu_refuses_what_the_kernel_cannot_compute(feature):
  reason = _reason((feature,))
  assert reason is not None and reason.startswith("on TPU"), reason
  assert f"'{feature}'" in reason and "vanilla" in reason, reason


def test_tpu_refuses_shapes_the_kernel_cannot_take():
  reason = _reason(("window",), q_len=3, window=(4, 4))
  assert "sliding window on a cache call needs causal" in reason, reason
  assert "vanilla" in reason, reason
  reason = _reason(("gqa",), heads=6, kv_heads=3)
  assert "cannot tile Hkv = 3" in reason and "blockwise" in reason, reason
  assert _reason(("gqa",), heads=12, kv_heads=6, dtype="bfloat16") is not None
  assert "float16" in _reason((), dtype="float16")
  launch = flash_kernel.default_launch_config(64)
  assert "launch" in _reason((), options=(("launch", launch),))


# --- Through the module -------------------------------------------------------


@pytest.fixture
def on_tpu(monkeypatch):
  """flash sees the platform "tpu"; its ragged kernel runs interpreted.
  Yields the list of the kernel's calls (their records)."""
  monkeypatch.setattr(flash_mechanism.FlashAttention, "_platform",
                      lambda self: "tpu")
  kernel, calls = ragged_paged_tpu.ragged_paged_attention, []

  def interpreted(inputs, *args, **kwargs):
    calls.append(inputs)
    return kernel(inputs, *args, **{**kwargs, "interpret": True})

  monkeypatch.setattr(ragged_paged_tpu, "ragged_paged_attention", interpreted)
  yield calls


def test_flash_module_serves_a_paged_cache_on_tpu(on_tpu):
  """Chunked prefill and decode in one call through `flash` on TPU: rows
  starting empty, crossing pages of a random table, one without new tokens
  (left out of the kernel's list), causal with a window (its right extent
  has no effect) and a soft cap, GQA, Dv != D (head sizes padded to 128
  lanes in the fused copy). Then the same program with no new token
  anywhere, and the refusals of lse and of gradients."""
  calls = on_tpu
  h, hkv, d, dv, sq = 4, 2, 32, 8, 3
  rng = helpers.rng_for("ragged_paged_tpu", "module")
  cache = _paged_cache(rng, (0, 0, 12, 29), hkv, d, "float32", dv)
  q = helpers.random_array(rng, (4, sq, h, d), "float32")
  k = helpers.random_array(rng, (4, sq, hkv, d), "float32")
  v = helpers.random_array(rng, (4, sq, hkv, dv), "float32")
  window, softcap = (5, 2), 3.0

  def attend(q, k, v, cache, q_lengths, **call):
    return fa.create_attention(
        "flash", num_heads=h, head_dim=d, num_kv_heads=hkv, value_dim=dv,
        sliding_window=window, logits_soft_cap=softcap,
        block_sizes=MODULE_TILES)(q, k, v, causal=True, cache=cache,
                           q_lengths=q_lengths, **call)

  fn = hk.without_apply_rng(hk.transform(attend))

  @helpers.jit
  def run(q, k, v, cache, q_lengths):
    result = fn.apply({}, q, k, v, cache, q_lengths)
    inputs, q_valid = _record(cache, q, k, v, causal=True, window=window,
                              q_lengths=q_lengths)
    ref = fa.reference_attention(inputs.query, inputs.key, inputs.value,
                                 None, inputs.visibility, sm_scale=d**-0.5,
                                 softcap=softcap).out
    return result, jnp.where(q_valid[:, :, None, None], ref, 0.0)

  q_lengths = jnp.asarray([3, 0, 1, 2], jnp.int32)
  for lengths in (q_lengths, jnp.zeros_like(q_lengths)):
    result, ref = run(q, k, v, cache, lengths)
    helpers.assert_close(result.attention_outputs, ref, "float32",
                         f"module, q_lengths {lengths}")
    np.testing.assert_array_equal(result.cache.lengths,
                                  np.array([0, 0, 12, 29]) + lengths)
  assert np.all(np.asarray(result.attention_outputs) == 0.0)
  # The ragged kernel served the call, reading the pages (not a dense view).
  assert len(calls) == 1 and calls[0].pages is not None
  with pytest.raises(NotImplementedError, match=r"on TPU, feature 'lse'"):
    jax.eval_shape(lambda *a: fn.apply({}, *a, return_lse=True), q, k, v,
                   cache, q_lengths)
  with pytest.raises(NotImplementedError, match=r"no backward pass"):
    jax.make_jaxpr(jax.grad(lambda q: fn.apply(
        {}, q, k, v, cache, q_lengths).attention_outputs.sum()))(q)
