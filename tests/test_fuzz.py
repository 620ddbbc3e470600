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
"""

import dataclasses

import numpy as np
import pytest

import fuzz_mechanisms as fuzz
import helpers

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
