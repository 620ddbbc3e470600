"""The TPU mechanisms on CPU: `splash` and `flash`'s TPU path, interpreted.

- `splash` runs JAX's Pallas TPU splash kernels with `interpret=True`,
  through the module (`fa.create_attention("splash", interpret=True)`).
- `flash` on TPU runs JAX's Pallas TPU flash kernel; here the module is told
  its platform is "tpu" (`_platform` patched) and the whole jitted forward
  and backward is traced under `pltpu.force_tpu_interpret_mode()`, so the
  mechanism's TPU dispatch, refusals and kernel wrapper are all exercised.

Each case compares the output and dq/dk/dv (and dbias) with the float32
reference (`helpers.reference_vjp`) within `helpers.TOLERANCES` (measured
here: ~1e-6 in float32, ~5e-3 in bfloat16), and queries that see no key
must come out exactly 0. Sequences of 200-300 with tiles of 128 span
several tiles, a partial (padded) one, and skipped ones. Refusals are
checked for their message: the refused feature and the mechanisms that
support it.
"""

from __future__ import annotations

import haiku as hk
import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.core.inputs import FEATURES
from flexible_attention.core.inputs import AttentionDims
from flexible_attention.kernels import flash as flash_kernel
from flexible_attention.mechanisms import flash as flash_mechanism
from flexible_attention.mechanisms import registry

import helpers

TILES_128 = fa.BlockSizes(block_q=128, block_k=128, block_q_dkv=128,
                          block_k_dkv=128, block_q_dq=128, block_k_dq=128)


def _sorted_ids(rng, b, n, num):
  return jnp.asarray(np.sort(rng.integers(0, num, (b, n)), axis=1), jnp.int32)


def _check(mechanism, name, *, options, call=None, b=2, sq=200, sk=200, h=4,
           hkv=2, d=16, dv=None, dtype="float32", bias_shape=None,
           window=None, softcap=None, segments=None, kv_lengths=None,
           expect_empty_rows=False):
  """Runs `mechanism` through the module and checks it against the
  reference (output, gradients, exact zeros for rows that see no key)."""
  rng = helpers.rng_for("tpu_kernels", name)
  q, k, v = helpers.random_qkv(rng, b, sq, sk, h, hkv, d, dv, dtype)
  ct = helpers.random_array(rng, q.shape[:3] + v.shape[3:], dtype)
  bias = (None if bias_shape is None else
          helpers.random_array(rng, bias_shape, dtype))
  call = dict(call or {})
  if segments == "pair":  # Query segment 3 has no keys: empty rows.
    call["segment_ids"] = (_sorted_ids(rng, b, sq, 4),
                           _sorted_ids(rng, b, sk, 3))
  elif segments == "single":
    call["segment_ids"] = _sorted_ids(rng, b, sq, 3)
  if kv_lengths is not None:
    call["kv_lengths"] = jnp.asarray(kv_lengths, jnp.int32)
  options = dict(options)
  if window is not None:
    options["sliding_window"] = window
  if softcap is not None:
    options["logits_soft_cap"] = softcap
  if dv is not None:
    options["value_dim"] = dv
  result = helpers.run_mechanism(mechanism, q, k, v, ct, bias=bias, call=call,
                                 options=options)
  ref = helpers.reference_vjp(q, k, v, ct, bias=bias, call=call,
                              sliding_window=window, logits_soft_cap=softcap)
  helpers.assert_matches_reference(result, ref.out, ref.grads,
                                   f"{mechanism}/{name}")
  rows = np.broadcast_to(ref.empty_rows, result.out.shape[:3])
  assert np.all(result.out[rows] == 0.0), f"{name}: empty rows are not 0"
  assert rows.any() == expect_empty_rows, f"{name}: empty rows {rows.any()}"


# --- splash (interpret=True) --------------------------------------------------

SPLASH = dict(interpret=True, block_sizes=TILES_128)

# Several features per program (each changes the output on its own; the
# conformance battery runs every feature alone on one tile of 128).
SPLASH_CASES = {
    # Grouped heads with head sizes that are not multiples of 8, Dv != D.
    "gqa_odd_head_sizes": dict(d=13, dv=7),
    "mqa_causal_square_softcap": dict(sq=256, sk=256, hkv=1, softcap=2.5,
                                      call=dict(causal=True)),
    # Bottom-right alignment: the queries are the last Sq of Sk positions.
    "causal_fewer_queries": dict(sq=100, sk=300, call=dict(causal=True)),
    # The first 172 queries see no key: a whole tile of them is skipped.
    "causal_more_queries_empty_rows": dict(
        sq=300, sk=128, call=dict(causal=True), expect_empty_rows=True),
    "window_pair_padded_keys": dict(sq=150, sk=300, window=(40, 25)),
    "window_int_causal_segments_single": dict(
        sq=300, sk=300, window=60, segments="single",
        call=dict(causal=True)),
    # Query segment 3 sees no key, nor does any query of the row of kv
    # length 0.
    "segments_pair_kv_lengths_with_zero": dict(
        sq=130, sk=170, segments="pair", kv_lengths=(0, 150),
        expect_empty_rows=True),
    "bfloat16_causal": dict(dtype="bfloat16", call=dict(causal=True)),
}


@pytest.mark.parametrize("name", SPLASH_CASES)
def test_splash_matches_reference(name):
  _check("splash", name, options=SPLASH, **SPLASH_CASES[name])


def test_splash_picks_its_own_tiles():
  # No block sizes: one tile of 128 for these short sequences.
  _check("splash", "default_tiles", options=dict(interpret=True), sq=37,
         sk=21, call=dict(causal=True), expect_empty_rows=True)


def _request(platform, dtype="float32", features=(), *, q_len=256,
             kv_len=256, heads=4, kv_heads=4, options=(), sharded=False):
  dims = AttentionDims(batch=2, q_len=q_len, kv_len=kv_len, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=64, value_dim=64)
  return fa.AttentionRequest(dims=dims, dtype=dtype, platform=platform,
                             features=frozenset(features),
                             sequence_sharded=sharded, options=options)


@pytest.mark.parametrize("feature", ["bias", "mask", "dropout", "weights",
                                     "positions", "cache"])
def test_splash_refuses_features_naming_who_supports_them(feature):
  reason = registry.unsupported_reason("splash", _request("tpu", features=(
      feature,)))
  assert reason is not None and f"'{feature}'" in reason, reason
  assert "'splash'" in reason and "vanilla" in reason, reason


def test_splash_refusals():
  reason = lambda *a, **k: registry.unsupported_reason("splash",
                                                        _request(*a, **k))
  assert reason("tpu") is None
  assert reason("cpu", options=(("interpret", True),)) is None
  assert "not on 'cpu'" in reason("cpu")
  assert "not float16" in reason("tpu", "float16")
  assert "sequence" in reason("tpu", sharded=True)
  assert "precision" in reason("tpu", options=(("precision", "highest"),))


def test_splash_module_refusals_and_bad_options():
  q = jnp.ones((1, 128, 2, 16))

  def attend(q, **options):
    return fa.create_attention("splash", num_heads=2, head_dim=16,
                               **options)(q, q, q, bias=jnp.zeros((128, 128)))

  with pytest.raises(NotImplementedError, match=r"'bias'.*vanilla"):
    hk.transform(lambda q: attend(q, interpret=True)).apply({}, None, q)
  with pytest.raises(ValueError, match=r"block_k must be a multiple of 128"):
    hk.transform(lambda q: attend(q, interpret=True, block_sizes=fa.BlockSizes(
        block_k=64))).apply({}, None, q)
  with pytest.raises(TypeError, match=r"interpret must be a bool"):
    hk.transform(lambda q: attend(q, interpret=1)).apply({}, None, q)


# --- flash on TPU (JAX's Pallas TPU kernel, TPU interpret mode) ---------------


@pytest.fixture
def on_tpu(monkeypatch):
  """Makes flash's module see the platform "tpu" and runs the test under
  TPU interpret mode (every trace of the test happens inside it)."""
  monkeypatch.setattr(flash_mechanism.FlashAttention, "_platform",
                      lambda self: "tpu")
  with pltpu.force_tpu_interpret_mode():
    yield


# TPU interpret mode runs each grid point of the kernels through a slow
# interpreter (seconds per program): these cases have 2 query heads (not
# 4), one batch row where no batch-wide input is tested, and Sq = Sk = 200
# (2 x 2 tiles: a skipped one and a partial one) for the causal bias.
FLASH_TPU_CASES = {
    # Grouped heads folded into the query sequence (no causal); padded keys
    # and kv lengths as segment ids, user ids renumbered.
    "gqa_segments_kv_lengths": dict(h=2, hkv=1, sq=200, sk=300,
                                    segments="pair", kv_lengths=(0, 250),
                                    expect_empty_rows=True),
    "mqa_head_sizes_padded": dict(b=1, h=2, hkv=1, sq=130, sk=140, d=160,
                                  dv=24),
    # The bias broadcasts over the batch and the queries.
    "causal_bias_broadcast": dict(h=2, hkv=2, call=dict(causal=True),
                                  bias_shape=(1, 2, 1, 200)),
    "bfloat16_causal_segments": dict(h=2, hkv=2, dtype="bfloat16",
                                     segments="single",
                                     call=dict(causal=True)),
}


@pytest.mark.parametrize("name", FLASH_TPU_CASES)
def test_flash_tpu_matches_reference(name, on_tpu):
  del on_tpu
  _check("flash", name, options=dict(block_sizes=TILES_128),
         **FLASH_TPU_CASES[name])


def test_flash_tpu_runs_the_tpu_kernel(on_tpu):
  del on_tpu
  q = jnp.ones((1, 128, 2, 16))
  jaxpr = str(jax.make_jaxpr(lambda q: helpers.call_mechanism(
      "flash", q, q, q, causal=True))(q))
  # JAX's TPU kernel (its custom_vjp), not the project's Triton kernels.
  assert "name=_flash_attention" in jaxpr and "flash_forward" not in jaxpr
  with pytest.raises(ValueError, match=r"'flash': BlockSizes.block_q must "
                     r"be a multiple of 128"):
    helpers.call_mechanism("flash", q, q, q,
                           options=dict(block_sizes=fa.BlockSizes(block_q=64)))


# What flash's TPU record (JAX's Pallas TPU kernel) refuses.
FLASH_TPU_REFUSED = tuple(
    f for f in FEATURES if not fa.capabilities("flash", "tpu").supports(f)
    and fa.capabilities("flash").supports(f))


def test_flash_has_its_own_record_on_tpu_only():
  assert FLASH_TPU_REFUSED
  assert fa.capabilities("flash", "tpu") is (
      flash_mechanism.FlashAttention.platform_capabilities["tpu"])
  assert fa.capabilities("flash", "gpu") is fa.capabilities("flash")


@pytest.mark.parametrize("feature", FLASH_TPU_REFUSED)
def test_flash_tpu_refuses_features_naming_who_supports_them(feature):
  reason = registry.unsupported_reason("flash", _request("tpu", features=(
      feature,)))
  assert reason is not None and reason.startswith("on TPU"), reason
  assert f"'{feature}'" in reason and "vanilla" in reason, reason


def test_flash_tpu_refusals():
  reason = lambda *a, **k: registry.unsupported_reason("flash",
                                                       _request(*a, **k))
  assert reason("tpu", features=("segments", "kv_lengths", "bias")) is None
  assert reason("tpu", features=("gqa",), kv_heads=2) is None
  assert "'gqa' together with 'causal'" in reason(
      "tpu", features=("gqa", "causal"), kv_heads=2)
  assert "only when Sq == Sk" in reason("tpu", features=("causal",),
                                        q_len=128)
  assert "not float16" in reason("tpu", "float16")
  assert "sequence" in reason("tpu", sharded=True)
  assert "precision" in reason("tpu", options=(("precision", "highest"),))
  launch = flash_kernel.default_launch_config(128)
  assert "launch" in reason("tpu", options=(("launch", launch),))
  assert reason("gpu", options=(("launch", launch),)) is None
  # interpret=True keeps the project's own kernels, which compute windows.
  assert reason("tpu", features=("window",),
                options=(("interpret", True),)) is None
  # The GPU path is unchanged.
  assert reason("gpu", features=("window", "gqa", "causal"),
                kv_heads=2) is None


def test_flash_tpu_module_refuses_a_window(on_tpu):
  del on_tpu
  q = jnp.ones((1, 128, 2, 16))
  with pytest.raises(NotImplementedError, match=r"on TPU, feature 'window'"):
    helpers.call_mechanism("flash", q, q, q,
                           options=dict(sliding_window=8))
