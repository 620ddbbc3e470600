"""A few seeds of the differential fuzzer (`fuzz_mechanisms.py`) in the suite.

Each seed draws one whole call (shapes and a random mix of the semantics'
features, a KV-cache call or a mesh among them) that every CPU mechanism
must compute like the reference, or refuse. The seeds below were picked
so that together they exercise each kind of call the fuzzer draws: dense
and paged caches with ragged new tokens, shared pages, an overflowing row,
mods and sinks; sequence meshes (ring, ulysses; a cache split over one)
and batch/head meshes; explicit positions with a bias and a mask;
dropout; bfloat16. `python tests/fuzz_mechanisms.py --seeds 0:300` runs
many more.

And a few seeds of the decode kernels' fuzzer (`fuzz_decode_kernel.py`),
which draws the kernels' launches (splits, slots, producer warpgroups)
with the calls: Triton's in Pallas' interpreter, the Mosaic GPU kernel's
in JAX's GPU interpreter (jax 0.11) or compiled on an sm_90 GPU.
"""

import dataclasses

import numpy as np
import pytest

import fuzz_decode_kernel as decode_fuzz
import fuzz_mechanisms as fuzz
import gpu_interpret
import helpers
import test_decode_kernel

SEEDS = (33, 35, 108, 156, 289, 353)


@pytest.mark.parametrize("mechanism", sorted(fuzz.MECHANISMS))
@pytest.mark.parametrize("seed", SEEDS)
def test_random_call_matches_reference_or_is_refused(seed, mechanism):
  """Passes, or refuses with `NotImplementedError` / `ValueError` (never
  `vanilla` or `auto`); any other exception is a failure."""
  outcome = fuzz.fuzz(seed, mechanism)
  assert outcome.verdict != "fail", "\n".join(
      [fuzz.describe(fuzz.draw(seed))] + outcome.details)


def test_seeds_cover_every_kind_of_call():
  draws = [fuzz.draw(seed) for seed in SEEDS]
  assert {d.cache for d in draws} == {None, "dense", "paged"}
  assert any(d.mesh and d.mesh[3] > 1 for d in draws)
  assert any(d.mesh and d.mesh[3] == 1 for d in draws)
  assert any(d.cache and d.ragged_q for d in draws)
  assert any(d.cache and d.mesh and d.mesh[3] > 1 for d in draws)
  assert any(d.overflow for d in draws)
  assert any(d.shared_pages for d in draws)
  assert {d.dtype for d in draws} == {"float32", "bfloat16"}
  for feature in ("positions", "bias", "mask", "sinks", "score_mod",
                  "segments", "kv_lengths"):
    assert any(getattr(d, feature) for d in draws), feature
  assert {d.mask_mod for d in draws} >= {"static", "prefix"}
  assert any(d.dropout for d in draws)


def test_the_oracle_catches_a_wrong_answer():
  """The check fails a result one mistake away from the reference: a
  shifted output, a wrong gradient, a row of -inf lse, a dropped token."""
  seed = next(s for s in SEEDS if fuzz.draw(s).cache and fuzz.draw(s).sinks)
  d = fuzz.draw(seed)
  want = fuzz.expected(d, fuzz.make_inputs(d))
  assert fuzz.compare(d, want, want)[0] == []
  wrong = [
      dataclasses.replace(want,
                          out=want.out + 0.05 * np.nanmax(np.abs(want.out))),
      dataclasses.replace(want, grads=dict(
          want.grads, sinks=want.grads["sinks"] * 1.1)),  # A summed one.
      dataclasses.replace(want, lse=np.where(np.isinf(want.lse), 0.0,
                                             want.lse)),
      dataclasses.replace(want, keys=np.zeros_like(want.keys)),
  ]
  for result in wrong:
    assert fuzz.compare(d, result, want)[0]
  seed = next(s for s in SEEDS if not fuzz.draw(s).cache)
  d = fuzz.draw(seed)
  want = fuzz.expected(d, fuzz.make_inputs(d))
  grads = dict(want.grads, k=want.grads["k"] * 1.1)
  assert fuzz.compare(d, dataclasses.replace(want, grads=grads), want)[0]


def test_the_tiled_delta_explains_bfloat16_gradients():
  """Seed 2193 (bfloat16, an ALiBi-like score_mod): `blockwise`'s slopes
  gradient is past bfloat16's tolerance from the exact reference, and
  within float32 rounding of the reference's gradient with the delta of
  the output `blockwise` returned (`fuzz._tiled_grads`), which so accounts
  for all of it."""
  d = fuzz.draw(2193)
  assert d.dtype == "bfloat16" and d.score_mod
  x = fuzz.make_inputs(d)
  want = fuzz.expected(d, x)
  got = fuzz.actual("blockwise", d, x)
  tiled = want.tiled_grads(got.out)
  exact_error = helpers.relative_error(got.grads["slopes"],
                                       want.grads["slopes"])
  tiled_error = helpers.relative_error(got.grads["slopes"], tiled["slopes"])
  assert exact_error > fuzz.TOLERANCES["bfloat16"]
  assert tiled_error < 1e-4


def test_the_rounded_cotangent_explains_vanillas_bfloat16_sinks():
  """Seed 3627 (bfloat16, sinks, one real query row whose `dO . O`
  cancels): `vanilla` differentiates its own computation, so its dsinks
  takes dO rounded to the output's bfloat16 with the exact delta. It is past
  bfloat16's tolerance from the exact reference and within it from the
  reference's gradient with that dO (`want.tiled_grads` of the reference's
  own output)."""
  d = fuzz.draw(3627)
  assert d.dtype == "bfloat16" and d.sinks
  x = fuzz.make_inputs(d)
  want = fuzz.expected(d, x)
  got = fuzz.actual("vanilla", d, x)
  rounded = want.tiled_grads(np.where(np.isnan(want.out), 0, want.out))
  exact_error = helpers.relative_error(got.grads["sinks"],
                                       want.grads["sinks"])
  rounded_error = helpers.relative_error(got.grads["sinks"],
                                         rounded["sinks"])
  assert exact_error > fuzz.TOLERANCES["bfloat16"]
  assert rounded_error < exact_error / 2
  assert not fuzz.compare(d, got, want)[0]


def test_summed_gradients_are_relative_to_the_references_largest():
  """Seed 3845 (bfloat16, an ALiBi-like score_mod over explicit
  positions): the slopes' exact gradient is float32's rounding of terms
  that cancel (a few 1e-6), while the output's bfloat16 rounding moves the
  tiled one by 0.1-0.2. `vanilla`'s slopes are past the tolerance relative
  to the exact gradient and within it relative to the largest of the
  reference's gradients."""
  d = fuzz.draw(3845)
  assert d.dtype == "bfloat16" and d.score_mod
  x = fuzz.make_inputs(d)
  want = fuzz.expected(d, x)
  got = fuzz.actual("vanilla", d, x)
  tolerance = fuzz.TOLERANCES["bfloat16"]
  assert np.abs(want.grads["slopes"]).max() < 1e-4
  assert helpers.relative_error(got.grads["slopes"],
                                want.grads["slopes"]) > tolerance
  failures, errors = fuzz.compare(d, got, want)
  assert not failures and errors["dslopes"] < tolerance


# Triton: bfloat16 with padded query slots, a window, sinks and overflow
# flags in one split; float32, 16 new tokens before the rows' ends over 8
# splits, window and soft cap; a two-sided window with the call's own
# overflow test; a dense cache's pages, not causal; 16 new tokens, GQA.
# Mosaic: two producer warpgroups over four 64-token slots, the kernel's
# own overflow test, sinks, padded slots; D = 256, a two-sided window, soft
# cap, queries before the rows' ends, 5 splits.
DECODE_SEEDS = {"triton": (17, 34, 36, 46, 35), "mosaic": (19, 17)}


@pytest.mark.parametrize("backend,seed", [
    (backend, seed) for backend, seeds in DECODE_SEEDS.items()
    for seed in seeds])
def test_random_decode_kernel_call_matches_reference(backend, seed):
  if (backend == "mosaic" and not decode_fuzz.HOPPER and
      gpu_interpret.UNAVAILABLE is not None):
    pytest.skip(gpu_interpret.UNAVAILABLE)
  verdict, details = decode_fuzz.fuzz(seed, backend)
  assert verdict == "pass", "\n".join(
      [decode_fuzz.describe(decode_fuzz.draw(seed, backend))] + details)


def test_decode_seeds_cover_the_launch_and_the_call():
  draws = [decode_fuzz.draw(seed, backend)
           for backend, seeds in DECODE_SEEDS.items() for seed in seeds]
  assert {d.overflow for d in draws} >= {"flags", "check"}
  assert {d.dtype for d in draws if d.backend == "triton"} == {
      "float32", "bfloat16"}
  for feature in ("dense", "early", "padded", "sinks", "softcap"):
    assert any(getattr(d, feature) for d in draws), feature
  assert any(isinstance(d.window, tuple) for d in draws)
  assert any(not d.causal for d in draws)
  mosaic = [dict(d.launch) for d in draws if d.backend == "mosaic"]
  assert any(launch.get("producers") == 2 for launch in mosaic)


def test_the_decode_oracle_catches_a_wrong_answer(monkeypatch):
  """A kernel one mistake away from the oracle fails: the oracle's scale
  5% off, or its overflow rows dropped."""
  seed = DECODE_SEEDS["triton"][0]
  assert decode_fuzz.draw(seed, "triton").overflow == "flags"
  reference = test_decode_kernel._reference  # pylint: disable=protected-access
  monkeypatch.setattr(
      test_decode_kernel, "_reference",
      lambda *a, sm_scale, **kw: reference(*a, sm_scale=1.05 * sm_scale,
                                           **kw))
  assert decode_fuzz.fuzz(seed, "triton")[0] == "fail"
  monkeypatch.setattr(
      test_decode_kernel, "_reference",
      lambda *a, overflow, **kw: reference(*a, overflow=None, **kw))
  assert decode_fuzz.fuzz(seed, "triton")[0] == "fail"
