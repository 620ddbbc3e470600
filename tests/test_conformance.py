"""The conformance battery: every registered mechanism against the reference.

Every test here is parametrised over `fa.available_mechanisms()` (read at
collection time), so a mechanism registered later gets the whole battery for
free. For each (mechanism, case) the test either

- runs the mechanism (inside `hk.transform`, jitted unless the case is about
  jit) and compares its output AND the gradients of q, k, v (and of the bias
  when there is one) with the float32 reference (`fa.reference_attention` on
  the record built by `fa.canonicalize`), within the per-dtype tolerances of
  `helpers.TOLERANCES`; or
- when the mechanism refuses what the case uses, asserts that the call raises
  `NotImplementedError` with a message naming the refused feature. Nothing is
  skipped silently.

Which cases a mechanism refuses comes from `fa.capabilities` for mechanisms
the explicit, reviewed tables below do not know, and from those tables for
the known ones: `EXPECTED_REFUSALS`, replaced on a platform where the
mechanism has its own capability record (`flash` on TPU runs JAX's Pallas
TPU flash kernel: `fa.capabilities("flash", "tpu")`) by that record's
refusals plus the reviewed shape limits of `PLATFORM_SHAPE_LIMITS`
(causal only with Sq == Sk and without grouped heads). On any backend, for
every platform a mechanism runs on, the tables are checked against
`fa.capabilities`
(`test_expected_refusals_match_capabilities`) and against the mechanisms' own
refusal logic on requests for that platform
(`test_refusal_tables_match_the_refusal_logic`), and the battery's verdict on
every case for the platforms this host is not is checked against the modules
there, up to building the kernel
(`test_cases_on_other_platforms_get_the_tables_verdict`): the TPU rows are
checked without a TPU. The tables are backend-aware: a mechanism whose
platforms exclude the current backend (`cudnn` on CPU) is checked for its
clear refusal here and runs the real comparisons when this file runs on its
platform (`jax.default_backend()`: `cudnn` on `"gpu"`, `splash` on `"tpu"`).

Covering design (compile time dominates on CPU, so this is not a cross
product): each `Case` of `CASES` pins one feature or one shape corner
(Sq != Sk both ways, Sq = 1, odd lengths against small `fa.BlockSizes` so
several tiles and a partial tile are exercised, odd head sizes, MHA/GQA/MQA,
each mask feature, bias and its gradient, fully-masked rows, dtypes), with
GQA and lengths not divisible by the blocks as the default background so
those corners are exercised by every case; one `everything` case combines all
features at once. Cases run in the most precise dtype the mechanism accepts
(float32 for all but cuDNN) unless the case is about a dtype, jitted unless
the case is about jit (one runs op by op, one under `hk.remat`). Then a few
tests per mechanism: dropout (keep decisions bit-identical to the
reference's, read off the output; with returned weights where supported),
dropout off when deterministic, the KV cache (explicit `cache=`, Haiku-state
`decode=True`, and rows at different lengths), `hk.layer_stack`, and meshes
of the 8 CPU devices: batch-, head-, both-, sequence- and
head+sequence-sharded, the last and batch+head with dropout (bit-identical
keep decisions), each checked to really run under `shard_map` (ring's and
ulysses' sequence meshes are tests/test_context_parallel.py's). Mechanisms a
test needs options for on this backend (Pallas kernels in interpret mode on
CPU, tiles of 128 for the TPU kernels) get them from `EXTRA_OPTIONS`.

A mechanism that hands a call to another one (`DELEGATES`: `auto` on CPU,
`ulysses` without a sequence axis) runs a few cases in full; on the others,
and in the dropout, cache and layer-stack tests, it is checked to build its
delegate's kernel from the delegate's config and request (the same program,
which the delegate's own case or test runs). The few cases a mechanism's own
tests run with exactly their features at other sizes (`RUN_ELSEWHERE`:
splash's over several tiles) are left to those.

The battery on CPU takes about 30-40 s per mechanism that runs here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.core.inputs import FEATURES
from flexible_attention.core.inputs import AttentionDims
from flexible_attention.mechanisms import base
from flexible_attention.mechanisms import registry

import helpers

BACKEND = jax.default_backend()
MECHANISMS = fa.available_mechanisms()
DTYPES = ("float32", "bfloat16", "float16")
PLATFORMS = ("cpu", "gpu", "tpu")

# --- What each known mechanism refuses ----------------------------------------
#
# Traits are the features of `FEATURES`, the dtype names, the platform names,
# "sharded_sequence", and the shape limits below (conditions some mechanism
# refuses that capabilities cannot express).

SHAPE_LIMITS = {
    # D not a multiple of 8 (or too large for the GPU).
    "head_dim_limit": r"head size D that is a multiple of 8",
    # Dv != D.
    "value_dim_differs": r"needs Dv == D",
    # Causal or sliding window with Sq != Sk (bottom-right alignment).
    "unaligned_causal_or_window":
        r"aligns (?:causal masks and windows|its causal mask) top-left",
    # A window with a right extent, without causal.
    "window_right_without_causal": r"right extent only together with causal",
    # An odd Sq or Sk (cuDNN's fused backward rejects them).
    "odd_lengths": r"needs even sequence lengths",
    # Grouped-query heads together with causal (`expect_refusal` adds it to
    # any traits holding both).
    "gqa_with_causal": r"'gqa' together with 'causal'",
}

EXPECTED_REFUSALS = {
    "vanilla": frozenset(),
    "blockwise": frozenset({"weights"}),
    "cudnn": frozenset({
        "cpu", "tpu", "float32", "segments", "positions", "mask", "softcap",
        "dropout", "weights", "lse", "cache", "sharded_sequence", "sinks",
        "score_mod", "mask_mod", "head_dim_limit", "value_dim_differs", "unaligned_causal_or_window",
        "window_right_without_causal", "odd_lengths"}),
    # The Triton kernels (CPU only in interpret mode: EXTRA_OPTIONS); on TPU
    # JAX's TPU kernel, which refuses more (`platform_refusals`).
    "flash": frozenset({"cpu", "weights"}),
    # The sequence-parallel ones pass the structured mask along with the
    # K/V blocks or heads; no dense mask or bias.
    "ring": frozenset({"mask", "bias", "weights"}),
    "ulysses": frozenset({"mask", "bias", "weights"}),
    # Splash's masks are static functions of the token index (no positions,
    # hence no cache) and it has no bias or dense mask; Pallas TPU: no
    # float16; CPU only in interpret mode (EXTRA_OPTIONS).
    "splash": frozenset({
        "cpu", "gpu", "float16", "positions", "mask", "bias", "dropout",
        "weights", "lse", "cache", "sharded_sequence", "score_mod",
        "mask_mod"}),
    # `auto` picks among its candidates, never one that refuses.
    "auto": frozenset(),
}

# What a mechanism refuses on a platform where it has its own capability
# record (`fa.capabilities(name, platform)`: flash on TPU, without interpret,
# runs JAX's Pallas TPU flash kernel), where that replaces its
# `EXPECTED_REFUSALS` entry: the record's refusals, the entry's platforms,
# and these reviewed shape limits the record cannot say: mechanism ->
# platform -> traits. Causal with Sq != Sk (that kernel aligns it top-left)
# and grouped heads with causal.
PLATFORM_SHAPE_LIMITS = {
    "flash": {"tpu": frozenset({"unaligned_causal_or_window",
                                "gqa_with_causal"})},
}


def platform_refusals(mechanism: str, platform: str) -> frozenset[str] | None:
  """The traits `mechanism` refuses on `platform` by its own record there,
  or None when it has no such record."""
  if platform not in registry.get_mechanism(
      mechanism).platform_capabilities:
    return None
  record = capability_refusals(fa.capabilities(mechanism, platform))
  return ((record - set(PLATFORMS)) |
          (EXPECTED_REFUSALS[mechanism] & set(PLATFORMS)) |
          PLATFORM_SHAPE_LIMITS.get(mechanism, {}).get(platform, frozenset()))


# Extra module options some mechanisms need on some backends (DESIGN.md: the
# Pallas mechanisms run on CPU only in interpret mode, which lifts their
# platform refusal there).
EXTRA_OPTIONS = {
    # On TPU JAX's kernel, whose tiles are multiples of 128 (as splash's).
    "flash": {"cpu": {"interpret": True},
              "tpu": {"block_sizes": fa.BlockSizes()}},
    # splash's tiles are multiples of 128, not the battery's small tiles:
    # `fa.BlockSizes()` lets it pick its own (one tile of 128 here).
    "splash": {"cpu": {"interpret": True, "block_sizes": fa.BlockSizes()},
               "gpu": {"block_sizes": fa.BlockSizes()},
               "tpu": {"block_sizes": fa.BlockSizes()}},
}

# Small tiles (powers of two >= 16, which every tiling mechanism accepts), so
# the cases' odd lengths (37, 21) span several tiles and end in a partial
# one. Only the fields a mechanism reads are passed.
SMALL_BLOCKS = {"block_q": 16, "block_k": 16, "block_q_dkv": 16,
                "block_k_dkv": 32, "block_q_dq": 32, "block_k_dq": 16,
                "block_b": 1}
SMALL_BLOCK_DEFAULT = 16


def refusal_message(trait: str) -> str:
  """A regex the refusal message of `trait` must match."""
  if trait in FEATURES:
    return rf"'{trait}'"
  if trait in DTYPES:
    return trait
  if trait in PLATFORMS:
    return rf"not on '{trait}'"
  if trait == "sharded_sequence":
    return r"sequence"
  return SHAPE_LIMITS[trait]


def expected_refusals(mechanism: str, platform: str) -> frozenset[str]:
  """The traits `mechanism` refuses on `platform` (no extra options): its
  `platform_refusals` there, else its `EXPECTED_REFUSALS`."""
  refused = platform_refusals(mechanism, platform)
  return EXPECTED_REFUSALS[mechanism] if refused is None else refused


def refusals(mechanism: str, backend: str = BACKEND) -> frozenset[str]:
  """The traits `mechanism` refuses on `backend` with the battery's options:
  the tables, or its capabilities."""
  if mechanism in EXPECTED_REFUSALS:
    refused = expected_refusals(mechanism, backend)
  else:
    refused = capability_refusals(fa.capabilities(mechanism))
  if EXTRA_OPTIONS.get(mechanism, {}).get(backend, {}).get("interpret"):
    refused -= {backend}
  return refused


def capability_refusals(caps: fa.Capabilities) -> frozenset[str]:
  refused = {f for f in FEATURES if not caps.supports(f)}
  refused |= {d for d in DTYPES if d not in caps.dtypes}
  refused |= {p for p in PLATFORMS if p not in caps.platforms}
  if not caps.sharded_sequence:
    refused.add("sharded_sequence")
  return frozenset(refused)


# `FA_TEST_DTYPE=bfloat16` runs the cases in that dtype wherever the
# mechanism accepts it (e.g. the bfloat16 conformance run on a GPU).
FORCED_DTYPE = os.environ.get("FA_TEST_DTYPE")


def preferred_dtype(mechanism: str, forced: bool = True,
                    backend: str = BACKEND) -> str:
  """The most precise dtype `mechanism` accepts on `backend` (or
  `FA_TEST_DTYPE`)."""
  refused = refusals(mechanism, backend)
  if forced and FORCED_DTYPE and FORCED_DTYPE not in refused:
    return FORCED_DTYPE
  for dtype in ("float32", "float16", "bfloat16"):
    if dtype not in refused:
      return dtype
  raise AssertionError(f"{mechanism} accepts no dtype")


# Mechanisms that get no small block sizes: `auto` reads the union of its
# candidates' block fields, so block sizes would rule out `vanilla` (which
# reads none) and hide auto's own choice.
NO_SMALL_BLOCKS = frozenset({"auto"})


def module_options(mechanism: str, *, backend: str = BACKEND,
                   **options) -> dict[str, Any]:
  """`options` plus small block sizes and `backend`-specific extras."""
  caps = fa.capabilities(mechanism)
  if ("block_sizes" not in options and caps.block_size_fields and
      mechanism not in NO_SMALL_BLOCKS):
    options["block_sizes"] = fa.BlockSizes(**{
        f: SMALL_BLOCKS.get(f, SMALL_BLOCK_DEFAULT)
        for f in caps.block_size_fields})
  options.update(EXTRA_OPTIONS.get(mechanism, {}).get(backend, {}))
  return options


def expect_refusal(mechanism: str, traits, call,
                   backend: str = BACKEND) -> bool:
  """If `mechanism` refuses any of `traits` on `backend`, asserts `call()`
  raises a `NotImplementedError` naming one of them and returns True."""
  traits = frozenset(traits)
  if {"gqa", "causal"} <= traits:
    traits |= {"gqa_with_causal"}
  refused = refusals(mechanism, backend) & traits
  if not refused:
    return False
  pattern = "|".join(f"(?:{refusal_message(t)})" for t in sorted(refused))
  with pytest.raises(NotImplementedError, match=pattern):
    call()
  return True


# --- The cases ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  """One configuration of the battery (see the module docstring).

  Attributes:
    name: the test id.
    batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, value_dim: sizes.
    dtype: a dtype name, or `None` for the mechanism's most precise dtype.
    causal: the call's `causal`.
    window: the `sliding_window` option.
    softcap: the `logits_soft_cap` option.
    segments: `"pair"`, `"single"` or `None`.
    kv_lengths: per-row kv lengths, or `None`.
    positions: `"permuted"` (random positions), `"packed"` (restarting per
      segment, with single segment ids) or `None`.
    bias: the bias shape, as letters of "BHQK" or "1", or `None`.
    mask: the mask shape, like `bias`.
    empty_rows: query rows the mask makes fully invisible (needs `mask`).
    return_weights: also compare the weights.
    use_jit: run the forward and backward jitted (else op by op).
    remat: run the attention under `hk.remat`.
  """

  name: str
  batch: int = 2
  q_len: int = 37
  kv_len: int = 37
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  value_dim: int | None = None
  dtype: str | None = None
  causal: bool = False
  window: Any = None
  softcap: float | None = None
  segments: str | None = None
  kv_lengths: tuple[int, ...] | None = None
  positions: str | None = None
  bias: str | None = None
  mask: str | None = None
  empty_rows: tuple[int, ...] = ()
  return_weights: bool = False
  use_jit: bool = True
  remat: bool = False

  def traits(self, dtype: str, backend: str = BACKEND) -> frozenset[str]:
    """Everything about the case a mechanism may refuse on `backend`."""
    used = {dtype, backend}
    for feature, on in (
        ("causal", self.causal), ("window", self.window is not None),
        ("softcap", self.softcap is not None),
        ("segments", self.segments is not None),
        ("kv_lengths", self.kv_lengths is not None),
        ("positions", self.positions is not None),
        ("bias", self.bias is not None), ("mask", self.mask is not None),
        ("weights", self.return_weights),
        ("gqa", self.num_heads != self.num_kv_heads)):
      if on:
        used.add(feature)
    if self.head_dim % 8:
      used.add("head_dim_limit")
    if (self.value_dim or self.head_dim) != self.head_dim:
      used.add("value_dim_differs")
    if self.q_len != self.kv_len and (self.causal or self.window is not None):
      used.add("unaligned_causal_or_window")
    if (self.window is not None and not self.causal and
        canonical_window(self.window, False)[1] > 0):
      used.add("window_right_without_causal")
    if self.q_len % 2 or self.kv_len % 2:
      used.add("odd_lengths")
    return frozenset(used)


def canonical_window(window, causal):
  if isinstance(window, int):
    return (window, 0 if causal else window)
  return tuple(window)


CASES = (
    # Shapes.
    Case("mha_square", num_heads=3, num_kv_heads=3),
    Case("odd_head_dims", head_dim=13, value_dim=7, num_kv_heads=4),
    Case("mqa", num_heads=4, num_kv_heads=1, causal=True),
    Case("one_tile", q_len=8, kv_len=8, head_dim=8, causal=True),
    # Causal, bottom-right aligned.
    Case("causal_square", causal=True),
    # (Not jitted: a mechanism also runs op by op.)
    Case("causal_sq_shorter_than_sk", q_len=21, causal=True, use_jit=False),
    Case("causal_sq_longer_than_sk_has_empty_rows", kv_len=21, causal=True),
    Case("causal_single_query", q_len=1, causal=True),
    # Sliding windows.
    Case("window_int_causal", window=5, causal=True),
    Case("window_pair", window=(3, 7), q_len=21),
    # Soft cap.
    Case("softcap", softcap=2.5, causal=True),
    # Segment ids.
    Case("segments_pair", segments="pair", q_len=21),
    # The short forms, which `fa.canonicalize` turns into those of
    # `window_pair` and `segments_pair` (mechanisms see only these;
    # tests/test_reference.py pins the conversions): an int window without
    # causal, (5, 5), and one array of segment ids for queries and keys.
    # Together: one program, not two.
    Case("window_int_segments_single", window=5, segments="single"),
    # kv lengths (a zero length: that row gives zeros).
    Case("kv_lengths_with_zero", batch=3, kv_lengths=(0, 17, 37), q_len=21),
    # Explicit positions.
    Case("positions_permuted", positions="permuted", causal=True, window=11,
         q_len=21),
    Case("positions_packed", positions="packed", segments="single",
         causal=True),
    # Bias (gradient checked too).
    Case("bias_full", bias="BHQK", q_len=32, kv_len=32),
    # (Under `hk.remat`: the forward recomputed in the backward.)
    Case("bias_broadcast", bias="1H1K", q_len=21, causal=True, remat=True),
    # Boolean masks (broadcast shapes).
    Case("mask_rank2", mask="QK"),
    Case("mask_empty_rows", mask="BHQK", empty_rows=(0, 5, 36)),
    # Returned weights.
    Case("weights", return_weights=True, causal=True, mask="B1QK", q_len=21),
    # Low precision.
    Case("bfloat16", dtype="bfloat16", causal=True),
    Case("bfloat16_bias", dtype="bfloat16", bias="1HQK", q_len=32, kv_len=32),
    Case("float16", dtype="float16", window=(6, 0), kv_len=21, q_len=21),
    # All features at once.
    Case("everything", q_len=37, kv_len=37, causal=True, window=(13, 3),
         softcap=5.0, segments="pair", kv_lengths=(30, 37),
         positions="permuted", bias="BHQK", mask="B1QK", empty_rows=(4,)),
)


def _shape(spec: str, case: Case) -> tuple[int, ...]:
  sizes = {"B": case.batch, "H": case.num_heads, "Q": case.q_len,
           "K": case.kv_len, "1": 1}
  return tuple(sizes[c] for c in spec)


def build_inputs(case: Case, dtype: str):
  """Random inputs of `case`: `(q, k, v, ct, bias, call)`."""
  rng = helpers.rng_for("conformance", case.name)
  q, k, v = helpers.random_qkv(rng, case.batch, case.q_len, case.kv_len,
                               case.num_heads, case.num_kv_heads,
                               case.head_dim, case.value_dim, dtype)
  ct = helpers.random_array(rng, q.shape[:3] + v.shape[3:], dtype)
  b, sq, sk = case.batch, case.q_len, case.kv_len
  call: dict[str, Any] = {"causal": case.causal}
  if case.return_weights:
    call["return_weights"] = True
  bias = None
  if case.bias:
    bias = helpers.random_array(rng, _shape(case.bias, case), dtype)
  if case.mask:
    mask = rng.random(_shape(case.mask, case)) < 0.7
    if case.empty_rows:
      full = np.broadcast_to(mask, (b, case.num_heads, sq, sk)).copy()
      full[:, :, list(case.empty_rows), :] = False
      mask = full
    call["mask"] = jnp.asarray(mask)
  if case.segments == "pair":
    # Query segment 3 has no keys: those rows are fully masked.
    q_ids = np.sort(rng.integers(0, 4, (b, sq)), axis=1)
    kv_ids = np.sort(rng.integers(0, 3, (b, sk)), axis=1)
    call["segment_ids"] = (jnp.asarray(q_ids), jnp.asarray(kv_ids))
  elif case.segments == "single":
    call["segment_ids"] = jnp.asarray(
        np.sort(rng.integers(0, 3, (b, sq)), axis=1))
  if case.kv_lengths is not None:
    call["kv_lengths"] = jnp.asarray(case.kv_lengths, jnp.int32)
  if case.positions == "permuted":
    call["q_positions"] = jnp.asarray(
        np.stack([rng.permutation(sk)[:sq] for _ in range(b)]), jnp.int32)
    call["kv_positions"] = jnp.asarray(
        np.stack([rng.permutation(sk) for _ in range(b)]), jnp.int32)
  elif case.positions == "packed":
    ids = np.asarray(call["segment_ids"])
    starts = np.maximum.accumulate(
        np.where(np.diff(ids, axis=1, prepend=-1) != 0,
                 np.arange(sq)[None, :], 0), axis=1)
    positions = jnp.asarray(np.arange(sq)[None, :] - starts, jnp.int32)
    call["q_positions"] = call["kv_positions"] = positions
  return q, k, v, ct, bias, call


def case_options(mechanism: str, case: Case,
                 backend: str = BACKEND) -> dict[str, Any]:
  options = {}
  if case.window is not None:
    options["sliding_window"] = case.window
  if case.softcap is not None:
    options["logits_soft_cap"] = case.softcap
  if case.value_dim is not None:
    options["value_dim"] = case.value_dim
  return module_options(mechanism, backend=backend, **options)


# --- The refusal table is the reviewed truth ----------------------------------


def _request(platform="gpu", dtype="bfloat16", features=(), q_len=32,
             kv_len=32, num_kv_heads=4, head_dim=64, value_dim=64,
             window=None):
  dims = AttentionDims(batch=2, q_len=q_len, kv_len=kv_len, num_heads=4,
                       num_kv_heads=num_kv_heads, head_dim=head_dim,
                       value_dim=value_dim)
  return fa.AttentionRequest(dims=dims, dtype=dtype, platform=platform,
                             features=frozenset(features), window=window)


# One minimal request per shape limit, exhibiting only that limit.
SHAPE_LIMIT_REQUESTS = {
    "head_dim_limit": dict(head_dim=60, value_dim=60),
    "value_dim_differs": dict(value_dim=32),
    "unaligned_causal_or_window": dict(q_len=16, features=("causal",)),
    "window_right_without_causal": dict(features=("window",), window=(4, 4)),
    "odd_lengths": dict(q_len=31, kv_len=31),
    "gqa_with_causal": dict(num_kv_heads=2, features=("gqa", "causal")),
}


def trait_requests(platform: str, dtype: str):
  """One minimal request per trait, exhibiting only that trait: on
  `platform` in `dtype`, except for the other platforms and dtypes."""
  requests = {}
  for feature in FEATURES:
    requests[feature] = _request(
        platform, dtype, (feature,), num_kv_heads=2 if feature == "gqa" else 4,
        window=(4, 0) if feature == "window" else None)
  requests.update({d: _request(platform, d) for d in DTYPES if d != dtype})
  requests.update({p: _request(p, dtype) for p in PLATFORMS if p != platform})
  requests["sharded_sequence"] = dataclasses.replace(
      _request(platform, dtype), sequence_sharded=True)
  for limit, kwargs in SHAPE_LIMIT_REQUESTS.items():
    requests[limit] = _request(platform, dtype, **kwargs)
  return requests


@pytest.mark.parametrize("mechanism", sorted(EXPECTED_REFUSALS))
def test_expected_refusals_match_capabilities(mechanism):
  """The tables name known traits, and `EXPECTED_REFUSALS` (the shape
  limits aside) is what `fa.capabilities` says."""
  assert mechanism in MECHANISMS, f"{mechanism} is no longer registered"
  known = set(FEATURES) | set(DTYPES) | set(PLATFORMS) | set(SHAPE_LIMITS) | {
      "sharded_sequence"}
  for table in (EXPECTED_REFUSALS[mechanism],
                *PLATFORM_SHAPE_LIMITS.get(mechanism, {}).values()):
    assert table <= known, f"unknown traits {sorted(table - known)}"
  table = EXPECTED_REFUSALS[mechanism]
  assert table - set(SHAPE_LIMITS) == capability_refusals(
      fa.capabilities(mechanism))


@pytest.mark.parametrize("mechanism,platform", [
    (m, p) for m in sorted(EXPECTED_REFUSALS) for p in PLATFORMS
    if p not in expected_refusals(m, p)])
def test_refusal_tables_match_the_refusal_logic(mechanism, platform):
  """On each platform a known mechanism runs on without extra options (so
  flash on TPU runs JAX's TPU kernel), its mechanism's own refusal logic
  refuses exactly the traits of its table there, naming each."""
  table = expected_refusals(mechanism, platform)
  dtype = next(d for d in DTYPES if d not in table)
  assert registry.unsupported_reason(
      mechanism, _request(platform, dtype)) is None
  for trait, request in trait_requests(platform, dtype).items():
    if trait in SHAPE_LIMITS and request.features & table:
      continue  # The feature itself is refused (checked too).
    reason = registry.unsupported_reason(mechanism, request)
    if trait in table:
      assert reason is not None and re.search(refusal_message(trait),
                                              reason), (trait, reason)
    else:
      assert reason is None, (trait, reason)


class _KernelBuilt(Exception):
  """Raised instead of building a kernel: the call passed every check."""


def _stop_at_kernel(config, request):
  del config, request
  raise _KernelBuilt


@pytest.mark.parametrize("mechanism,platform", [
    (m, p) for m in sorted(EXPECTED_REFUSALS) for p in PLATFORMS
    if p != BACKEND])
def test_cases_on_other_platforms_get_the_tables_verdict(
    mechanism, platform, monkeypatch):
  """The battery's verdict on each case on a platform this host is not (a
  refusal naming a refused trait, or a run) is the module's there, up to
  building the kernel: the modules see `platform` as their backend, and
  building a kernel stops the call."""
  monkeypatch.setattr(base.AttentionModule, "_platform",
                      lambda self: platform)
  for name in MECHANISMS:
    monkeypatch.setattr(registry.get_mechanism(name), "make_kernel",
                        staticmethod(_stop_at_kernel))
  for case in CASES:
    dtype = case.dtype or preferred_dtype(mechanism, backend=platform)
    q, k, v, _, bias, call = build_inputs(case, dtype)
    options = case_options(mechanism, case, platform)
    run = lambda: helpers.call_mechanism(  # pylint: disable=cell-var-from-loop
        mechanism, q, k, v, options=options, bias=bias, **call)
    if not expect_refusal(mechanism, case.traits(dtype, platform), run,
                          platform):
      with pytest.raises(_KernelBuilt):
        run()


@pytest.mark.parametrize("mechanism", sorted(EXPECTED_REFUSALS))
def test_feature_refusals_name_the_feature(mechanism):
  """Each refused feature, on a platform the mechanism runs on, gets a
  message naming the feature and the mechanisms that support it."""
  caps = fa.capabilities(mechanism)
  for feature in sorted(EXPECTED_REFUSALS[mechanism] & set(FEATURES)):
    reason = registry.unsupported_reason(
        mechanism, _request(caps.platforms[0], caps.dtypes[0], (feature,)))
    assert reason is not None and f"'{feature}'" in reason, (feature, reason)
    for other in registry.mechanisms_supporting(feature):
      assert other in reason


def test_every_feature_is_exercised_by_the_battery():
  used = set().union(*(case.traits("float32") for case in CASES))
  # Dropout, weights and the cache have dedicated tests below; the
  # log-sum-exp and paged caches in tests/test_decoding.py, sinks in
  # tests/test_sinks.py, score / mask mods in tests/test_mods.py.
  assert set(FEATURES) - {"dropout", "cache", "lse", "sinks", "score_mod",
                          "mask_mod"} <= used


# --- The battery --------------------------------------------------------------


_REFERENCES: dict[tuple[str, str], helpers.Reference] = {}


def case_reference(case: Case, dtype: str) -> helpers.Reference:
  """The reference of `case` (computed once, shared by the mechanisms)."""
  if (case.name, dtype) not in _REFERENCES:
    q, k, v, ct, bias, call = build_inputs(case, dtype)
    _REFERENCES[case.name, dtype] = helpers.reference_vjp(
        q, k, v, ct, bias=bias, call=call, sliding_window=case.window,
        logits_soft_cap=case.softcap, return_weights=case.return_weights)
  return _REFERENCES[case.name, dtype]


# --- Mechanisms that hand the call to another one -----------------------------
#
# `auto` on CPU serves every call of this battery with `vanilla` (the score
# matrices are small), and `ulysses` on no sequence-sharded mesh is its local
# mechanism, `blockwise`: each builds the delegate's kernel from the very
# config and request the delegate builds it from, so the program is the
# delegate's (their compiled programs are byte-identical, measured on every
# case). Running them again compares the same numbers twice; instead, on all
# but `DELEGATE_CASES`, the battery checks (tracing only, nothing compiled)
# that the call builds the delegate's kernel exactly as a call of the
# delegate does, and the delegate's own case checks the numbers. Refusals are
# checked on every case as before.
DELEGATES = {"ulysses": "blockwise"}
if BACKEND == "cpu":
  DELEGATES["auto"] = "vanilla"
# The cases a delegating mechanism still runs in full: `weights` and
# `everything` (auto must pick the one mechanism returning weights; every
# feature at once); the head sizes (Dv != D) and a causal window with
# explicit positions for ulysses (which refuses both former); and the cases
# about jit (op by op; under `hk.remat` for auto, ulysses refusing the
# bias), where their own code runs outside jit or is recomputed.
DELEGATE_CASES = {"auto": ("weights", "everything",
                           "causal_sq_shorter_than_sk", "bias_broadcast"),
                  "ulysses": ("odd_head_dims", "positions_permuted",
                              "causal_sq_shorter_than_sk")}


def _kernel_builds(built: str, run):
  """The `(config, request)` pairs `built`'s kernel is built from by
  `run()` (traced only: building the kernel stops it)."""
  seen = []

  def spy(config, request):
    seen.append((config, request))
    raise _KernelBuilt

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(registry.get_mechanism(built), "make_kernel",
                  staticmethod(spy))
    with pytest.raises(_KernelBuilt):
      jax.eval_shape(run)
  return seen


def assert_delegates(mechanism: str, q, k, v, *, options, delegate_options,
                     rng=None, **call):
  """`mechanism`'s call builds its delegate's kernel from the config and
  request a call of the delegate builds it from (the request's options up
  to those only `mechanism` has, e.g. auto's `autotune`)."""
  assert_delegates_in(
      mechanism, lambda name, options: helpers.call_mechanism(
          name, q, k, v, options=options, rng=rng, **call),
      options, delegate_options)


def assert_delegates_in(mechanism: str, run, options, delegate_options):
  """`run(mechanism, options)` (a call inside any transform) builds the
  delegate's kernel as `run(delegate, delegate_options)` does, like
  `assert_delegates`."""
  delegate = DELEGATES[mechanism]
  got = _kernel_builds(delegate, lambda: run(mechanism, options))
  want = _kernel_builds(delegate, lambda: run(delegate, delegate_options))
  assert len(got) == len(want) == 1, (got, want)
  (got_config, got_request), (want_config, want_request) = got[0], want[0]
  assert got_config == want_config, (got_config, want_config)
  assert want_request.options.items() <= got_request.options.items(), (
      got_request.options, want_request.options)
  strip = lambda r: dataclasses.replace(r, options=registry.Options())
  assert strip(got_request) == strip(want_request), (got_request,
                                                     want_request)


# Cases built to contain queries that see no key.
CASES_WITH_EMPTY_ROWS = ("kv_lengths_with_zero", "mask_empty_rows",
                         "causal_sq_longer_than_sk_has_empty_rows",
                         "segments_pair", "everything")


# Cases a mechanism's own tests run with exactly the case's features at other
# sizes, against the same reference and tolerances: splash's in
# tests/test_tpu_kernels.py over several tiles of 128 (the battery's lengths
# fit in one, which the other cases run).
RUN_ELSEWHERE = {
    "splash": {
        "causal_sq_longer_than_sk_has_empty_rows":
            "causal_more_queries_empty_rows",
        "window_pair": "window_pair_padded_keys",
        "bfloat16": "bfloat16_causal",
    },
}


def test_cases_run_elsewhere_are_run_there():
  """Each case of `RUN_ELSEWHERE` names a case of the mechanism's own tests
  with the same features (dtype, causal, window, grouping, Sq vs Sk)."""
  import test_tpu_kernels  # pylint: disable=g-import-not-at-top
  for name, other in RUN_ELSEWHERE["splash"].items():
    case = next(c for c in CASES if c.name == name)
    spec = dict(dict(sq=200, sk=200, h=4, hkv=2, dtype="float32"),
                **test_tpu_kernels.SPLASH_CASES[other])
    assert spec.get("call", {}).get("causal", False) == case.causal, name
    assert (spec.get("window") is None) == (case.window is None), name
    assert isinstance(spec.get("window"), tuple) == isinstance(
        case.window, tuple), name
    assert spec["dtype"] == (case.dtype or "float32"), name
    assert spec["h"] // spec["hkv"] == case.num_heads // case.num_kv_heads
    assert np.sign(spec["sq"] - spec["sk"]) == np.sign(
        case.q_len - case.kv_len), name
    features = ("segments", "kv_lengths", "softcap", "bias_shape", "d", "dv")
    assert not any(f in spec for f in features), name
    assert (case.softcap, case.segments, case.kv_lengths, case.positions,
            case.bias, case.mask, case.value_dim) == (None,) * 7, name


@pytest.mark.parametrize("mechanism,case", [
    pytest.param(m, c, id=f"{m}-{c.name}") for m in MECHANISMS for c in CASES
    if c.name not in RUN_ELSEWHERE.get(m, {})])
def test_matches_reference(mechanism, case):
  dtype = case.dtype or preferred_dtype(mechanism)
  q, k, v, ct, bias, call = build_inputs(case, dtype)
  options = case_options(mechanism, case)
  if expect_refusal(mechanism, case.traits(dtype),
                    lambda: helpers.call_mechanism(
                        mechanism, q, k, v, options=options, bias=bias,
                        **call)):
    return
  if (mechanism in DELEGATES and
      case.name not in DELEGATE_CASES.get(mechanism, ())):
    assert_delegates(mechanism, q, k, v, options=options,
                     delegate_options=case_options(DELEGATES[mechanism],
                                                   case), bias=bias, **call)
    return
  result = helpers.run_mechanism(mechanism, q, k, v, ct, bias=bias,
                                 call=call, options=options,
                                 use_jit=case.use_jit,
                                 wrap=hk.remat if case.remat else None)
  ref = case_reference(case, dtype)
  what = f"{mechanism}/{case.name}/{dtype}"
  helpers.assert_matches_reference(result, ref.out, ref.grads, what)
  if case.return_weights:
    helpers.assert_close(result.weights, ref.weights, dtype,
                         f"{what}: weights")
  # Queries that see no key give exactly zero (never NaN; gradients were
  # checked finite above).
  rows = np.broadcast_to(ref.empty_rows, result.out.shape[:3])
  assert np.all(result.out[rows] == 0.0), f"{what}: empty rows are not 0"
  # Nor does their cotangent reach their queries: dq is exactly 0 there.
  assert np.all(result.grads[0][rows] == 0.0), f"{what}: dq of empty rows"
  if case.name in CASES_WITH_EMPTY_ROWS:
    assert rows.any(), f"{case.name} is meant to have fully-masked rows"


# --- Dropout ------------------------------------------------------------------

DROPOUT_RATE = 0.3
# Dropout inputs: `value = [random | one-hot of the key index]`, so the last
# Sk output features of a query are exactly its applied weights (zero where
# dropped): the keep decisions of any mechanism can be read off its output
# and compared bit for bit with the reference's.
DROPOUT_SHAPE = dict(batch=2, q_len=21, kv_len=37, num_heads=4, num_kv_heads=2,
                     head_dim=16)
RANDOM_VALUE_DIM = 8


def dropout_inputs(name: str, batch, q_len, kv_len, num_heads, num_kv_heads,
                   head_dim, dtype="float32"):
  """`(q, k, v, ct, value_dim)` with the one-hot value features appended."""
  rng = helpers.rng_for("dropout", name)
  q, k, v = helpers.random_qkv(rng, batch, q_len, kv_len, num_heads,
                               num_kv_heads, head_dim, RANDOM_VALUE_DIM, dtype)
  eye = jnp.broadcast_to(jnp.eye(kv_len, dtype=dtype)[None, :, None, :],
                         (batch, kv_len, num_kv_heads, kv_len))
  v = jnp.concatenate([v, eye], axis=-1)
  ct = helpers.random_array(rng, q.shape[:3] + v.shape[3:], dtype)
  return q, k, v, ct, v.shape[-1]


def kept(out: np.ndarray) -> np.ndarray:
  """The keep decisions `[B, H, Sq, Sk]` read off a dropout output."""
  return np.moveaxis(out[..., RANDOM_VALUE_DIM:], 1, 2) != 0


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_dropout_is_bit_identical_to_reference_with_same_key(mechanism):
  dtype = preferred_dtype(mechanism)
  q, k, v, ct, value_dim = dropout_inputs("battery", dtype=dtype,
                                          **DROPOUT_SHAPE)
  with_weights = "weights" not in refusals(mechanism)
  call = dict(causal=True, deterministic=False,
              return_weights=with_weights)
  options = module_options(mechanism, dropout_rate=DROPOUT_RATE,
                           value_dim=value_dim)
  rng = jax.random.key(42)
  traits = {"dropout", "causal", "gqa", "value_dim_differs",
            "unaligned_causal_or_window", dtype, BACKEND}
  if expect_refusal(mechanism, traits, lambda: helpers.call_mechanism(
      mechanism, q, k, v, options=options, rng=rng, **call)):
    return
  if mechanism in DELEGATES:  # The delegate's own run checks the program.
    assert_delegates(mechanism, q, k, v, options=options, rng=rng,
                     delegate_options=module_options(
                         DELEGATES[mechanism], dropout_rate=DROPOUT_RATE,
                         value_dim=value_dim), **call)
    return
  result = helpers.run_mechanism(mechanism, q, k, v, ct, call=call,
                                 options=options, rng=rng)
  ref = helpers.reference_vjp(
      q, k, v, ct, call=call, return_weights=True,
      dropout=helpers.reference_dropout(rng, DROPOUT_RATE))
  helpers.assert_matches_reference(result, ref.out, ref.grads,
                                   f"{mechanism}/dropout")
  ref_kept = ref.weights != 0
  np.testing.assert_array_equal(kept(result.out), ref_kept)
  # The reference really drops about `rate` of the visible probabilities.
  visible = np.asarray(fa.canonicalize(q, k, v, causal=True).visibility
                       .dense())
  fraction = 1.0 - ref_kept.sum() / np.broadcast_to(visible,
                                                    ref_kept.shape).sum()
  assert abs(fraction - DROPOUT_RATE) < 0.05, fraction
  if with_weights:
    # The returned weights are the applied (dropped, rescaled) ones.
    helpers.assert_close(result.weights, ref.weights, dtype,
                         f"{mechanism}/dropout: weights")


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_dropout_is_off_when_deterministic(mechanism):
  case = Case("deterministic_dropout", causal=True)
  dtype = preferred_dtype(mechanism)
  q, k, v, _, _, call = build_inputs(case, dtype)
  options = module_options(mechanism, dropout_rate=0.5)
  if expect_refusal(mechanism, case.traits(dtype), lambda: (
      helpers.call_mechanism(mechanism, q, k, v, options=options, **call))):
    return
  if mechanism in DELEGATES:  # The delegate's own run checks the program.
    assert_delegates(mechanism, q, k, v, options=options,
                     rng=jax.random.key(0), delegate_options=module_options(
                         DELEGATES[mechanism], dropout_rate=0.5), **call)
    return
  result = helpers.run_mechanism(mechanism, q, k, v, call=call,
                                 options=options, rng=jax.random.key(0))
  ref = helpers.reference_vjp(q, k, v, None, call=call)
  helpers.assert_close(result.out, ref.out, dtype, f"{mechanism}: output")


# --- Returned weights ---------------------------------------------------------
# (the `weights` case of CASES compares them without dropout; the dropout test
# above with dropout.)

# --- KV cache -----------------------------------------------------------------

CACHE_SHAPE = dict(batch=2, num_heads=4, num_kv_heads=2, head_dim=16)
CACHE_LENGTH = 16  # L, the cache slots.
PREFILL = 5  # Tokens written at once before decoding one at a time.
TOTAL = 13  # Tokens in all.
CACHE_TRAITS = {"cache", "positions", "kv_lengths", "causal", "gqa",
                "unaligned_causal_or_window"}


def _cache_inputs(dtype):
  rng = helpers.rng_for("cache")
  return helpers.random_qkv(rng, CACHE_SHAPE["batch"], TOTAL, TOTAL,
                            CACHE_SHAPE["num_heads"],
                            CACHE_SHAPE["num_kv_heads"],
                            CACHE_SHAPE["head_dim"], dtype=dtype)


def _decode(step, q, k, v, state):
  """Prefill `PREFILL` tokens, then decode the rest one at a time."""
  outs = []
  for start, stop in [(0, PREFILL)] + [(t, t + 1)
                                       for t in range(PREFILL, TOTAL)]:
    out, state = step(q[:, start:stop], k[:, start:stop], v[:, start:stop],
                      state)
    outs.append(out)
  return np.concatenate([np.asarray(o, np.float32) for o in outs], axis=1)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_cache_decode_equals_full_causal_forward(mechanism):
  dtype = preferred_dtype(mechanism)
  q, k, v = _cache_inputs(dtype)
  options = module_options(mechanism)
  h, d, hkv = (CACHE_SHAPE["num_heads"], CACHE_SHAPE["head_dim"],
               CACHE_SHAPE["num_kv_heads"])
  make_for = lambda name, options, **extra: fa.create_attention(
      name, num_heads=h, head_dim=d, num_kv_heads=hkv, **options, **extra)
  make = lambda **extra: make_for(mechanism, options, **extra)
  empty = fa.init_cache(CACHE_SHAPE["batch"], CACHE_LENGTH, hkv, d, dtype)
  if expect_refusal(mechanism, CACHE_TRAITS | {dtype, BACKEND},
                    lambda: helpers.call_mechanism(
                        mechanism, q, k, v, options=options, causal=True,
                        cache=empty)):
    return
  if mechanism in DELEGATES:  # The delegate's own run checks the programs.
    delegate_options = module_options(DELEGATES[mechanism])
    # A prefill with `cache=`, one step at ragged lengths, decode=True.
    ragged = empty._replace(lengths=jnp.asarray([3, 9], jnp.int32))
    for cache, n in ((empty, PREFILL), (ragged, 1)):
      assert_delegates(mechanism, q[:, :n], k[:, :n], v[:, :n],
                       options=options, delegate_options=delegate_options,
                       causal=True, cache=cache)
    assert_delegates_in(
        mechanism, lambda name, options: hk.transform_with_state(
            lambda q, k, v: make_for(name, options, decode=True,
                                     max_cache_length=CACHE_LENGTH)(
                                         q, k, v, causal=True)).init(
                                             None, q[:, :PREFILL],
                                             k[:, :PREFILL], v[:, :PREFILL]),
        options, delegate_options)
    return
  expected = helpers.reference_vjp(q, k, v, None, call=dict(causal=True)).out

  # Explicit cache=.
  explicit = hk.without_apply_rng(hk.transform(
      lambda q, k, v, cache: make()(q, k, v, causal=True, cache=cache)))

  @helpers.jit
  def explicit_step(q, k, v, cache):
    result = explicit.apply({}, q, k, v, cache)
    return result.attention_outputs, result.cache

  got = _decode(explicit_step, q, k, v, empty)
  helpers.assert_close(got, expected, dtype, f"{mechanism}: cache= decode")

  # Haiku state: decode=True, max_cache_length=.
  stateful = hk.without_apply_rng(hk.transform_with_state(
      lambda q, k, v: make(decode=True, max_cache_length=CACHE_LENGTH)(
          q, k, v, causal=True).attention_outputs))
  # (Compiled, as the steps: op by op, init ran the module's forward as
  # dozens of separately compiled programs.)
  _, state = helpers.jit(lambda *qkv: stateful.init(
      None, *(x[:, :PREFILL] for x in qkv)))(q, k, v)
  state_step = helpers.jit(
      lambda q, k, v, state: stateful.apply({}, state, q, k, v))
  got = _decode(state_step, q, k, v, state)
  helpers.assert_close(got, expected, dtype, f"{mechanism}: decode=True")

  # Rows at different lengths, with random (stale) slots past each length: one
  # decode step writes each row's token at its own length and sees only its
  # own valid prefix.
  rng = helpers.rng_for("ragged cache")
  lengths = np.array([3, 9], np.int32)
  keys = helpers.random_array(rng, empty.keys.shape, dtype)
  values = helpers.random_array(rng, empty.values.shape, dtype)
  cache = fa.KVCache(keys, values, jnp.asarray(lengths))
  new_q, new_k, new_v = (x[:, :1] for x in (q, k, v))
  out, new_cache = explicit_step(new_q, new_k, new_v, cache)
  want_keys, want_values = np.array(keys), np.array(values)
  for b, length in enumerate(lengths):
    want_keys[b, length] = new_k[b, 0]
    want_values[b, length] = new_v[b, 0]
  np.testing.assert_array_equal(np.asarray(new_cache.keys), want_keys)
  np.testing.assert_array_equal(np.asarray(new_cache.values), want_values)
  np.testing.assert_array_equal(np.asarray(new_cache.lengths), lengths + 1)
  positions = np.broadcast_to(np.arange(CACHE_LENGTH), (2, CACHE_LENGTH))
  expected = helpers.reference_vjp(
      new_q, jnp.asarray(want_keys), jnp.asarray(want_values), None,
      call=dict(causal=True, kv_lengths=jnp.asarray(lengths + 1),
                q_positions=jnp.asarray(lengths[:, None]),
                kv_positions=jnp.asarray(positions, jnp.int32))).out
  helpers.assert_close(out, expected, dtype, f"{mechanism}: ragged decode")


# --- Transforms: layer_stack (jit and remat are cases of CASES) ---------------


LAYERS = 3
# The reference of the layer stack per dtype (its inputs depend on the dtype
# only): compiled once, shared by the mechanisms.
_LAYER_STACK_REFERENCES: dict[str, tuple[jax.Array, jax.Array]] = {}


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_layer_stack_matches_reference(mechanism):
  """`LAYERS` stacked residual attention layers (`hk.layer_stack`), each
  with its own per-layer query scale, against the reference in a loop."""
  batch, seq, heads, kv_heads, dim = 2, 22, 4, 2, 16
  dtype = preferred_dtype(mechanism, forced=False)  # Errors compound.
  rng = helpers.rng_for("layer_stack")
  x = helpers.random_array(rng, (batch, seq, heads, dim), dtype)
  scales = jnp.asarray(rng.uniform(0.5, 2.0, (LAYERS,)), dtype)
  ct = helpers.random_array(rng, x.shape, dtype)
  options = module_options(mechanism)
  split = lambda x: (x, x[:, :, ::heads // kv_heads], -x[:, :, 1::2])

  def layer_of(name, options):
    def layer(x, scale):
      q, k, v = split(x)
      attn = fa.create_attention(name, num_heads=heads, head_dim=dim,
                                 num_kv_heads=kv_heads, **options)
      return x + attn(q * scale, k, v, causal=True).attention_outputs, None
    return layer

  def stack_of(name, options):
    return hk.without_apply_rng(hk.transform(
        lambda x, scales: hk.layer_stack(LAYERS, with_per_layer_inputs=True)(
            layer_of(name, options))(x, scales)[0]))

  traits = {"causal", "gqa", dtype, BACKEND}
  if expect_refusal(mechanism, traits, lambda: hk.transform(
      lambda x: layer_of(mechanism, options)(x, 1.0)).apply({}, None, x)):
    return
  if mechanism in DELEGATES:  # The delegate's own run checks the program.
    assert_delegates_in(
        mechanism, lambda name, options: stack_of(name, options).apply(
            {}, x, scales), options, module_options(DELEGATES[mechanism]))
    return
  stacked = stack_of(mechanism, options)

  @helpers.jit
  def got_fn(x, ct):
    out, vjp = jax.vjp(lambda x: stacked.apply({}, x, scales), x)
    return out, vjp(ct)[0]

  def want_fn(x):
    for scale in scales.astype(jnp.float32):
      q, k, v = split(x)
      inputs = fa.canonicalize(q * scale, k, v, causal=True)
      x = x + fa.reference_attention(
          inputs.query, inputs.key, inputs.value, None, inputs.visibility,
          sm_scale=dim**-0.5).out
    return x

  @helpers.jit
  def want_vjp(x, ct):
    out, vjp = jax.vjp(want_fn, x)
    return out, vjp(ct)[0]

  out, dx = got_fn(x, ct)
  if dtype not in _LAYER_STACK_REFERENCES:
    _LAYER_STACK_REFERENCES[dtype] = want_vjp(x.astype(jnp.float32),
                                              ct.astype(jnp.float32))
  want_out, want_dx = _LAYER_STACK_REFERENCES[dtype]
  helpers.assert_close(out, want_out, dtype, f"{mechanism}: layer_stack out")
  helpers.assert_close(dx, want_dx, dtype, f"{mechanism}: layer_stack dx")


# --- Meshes -------------------------------------------------------------------


def mesh_devices():
  """The devices meshes use: the backend's, or the 8 virtual CPU devices
  (tests/conftest.py) when the backend has fewer than 4."""
  devices = jax.devices()
  return devices if len(devices) >= 4 else jax.devices("cpu")


def mesh_layout(name: str):
  """`(axis_dims, batch, num_heads, num_kv_heads)` of a test mesh
  (axes `("dp", "fsdp", "tp", "sp")`, `fa.PartitionAxis()`'s defaults)."""
  n = len(mesh_devices())
  if name == "batch":  # ("dp", "fsdp") shards the batch.
    return (1, n, 1, 1), n, 4, 2
  if name == "heads":  # "tp" shards the heads.
    return (1, 1, n, 1), 1, 2 * n, n
  if name == "batch_and_heads":
    return (2, 1, n // 2, 1), 2, n, n // 2
  # "sp" shards both sequences; the KV heads of a head shard are a multiple
  # of the sequence shards (what `ulysses` needs to trade one for the other).
  if name == "sequence":
    return (1, 1, 1, n), 1, 2 * n, n
  assert name == "heads_and_sequence"
  return (1, 1, 2, n // 2), 1, 2 * n, n


SHARDED_FEATURES = ("causal", "kv_lengths", "bias", "segments", "mask")


# The meshes a delegating mechanism (`DELEGATES`) still runs in full.
DELEGATE_MESHES = {"auto": (("heads_and_sequence", True),)}

# Dropout runs on the meshes that offset several coordinates at once.
MESH_CASES = (("batch", False), ("heads", False), ("batch_and_heads", False),
              ("batch_and_heads", True), ("sequence", False),
              ("heads_and_sequence", True))

# On the `heads` mesh a kernel that never sees the mesh gets the very shards
# it gets on `batch_and_heads` (one batch row, 2 query heads and 1 KV head
# per device, with their bias, mask, segment ids and kv length): for these
# three the compiled per-device programs are the same but for constants XLA
# folds (measured). On the `batch` mesh it gets one batch row with 4 query
# and 2 KV heads per device: the same shards with twice the heads in the
# same groups (the heads the unsharded battery runs). What differs between
# the meshes is the mechanism-independent sharding wrapper, which vanilla,
# ring and ulysses still check on each.
SAME_SHARDS_AS_BATCH_AND_HEADS = ("blockwise", "flash", "splash")


def sequence_sharded_elsewhere(mechanism: str) -> bool:
  """Whether tests/test_context_parallel.py runs `mechanism` on sequence
  meshes: the mechanisms that shard the sequence themselves (ring, ulysses).

  It runs each of them with every feature (causal, a window, segment ids,
  kv lengths and grouped heads in one call; plain; user-permuted; dropout)
  on meshes of 2, 4 and 8 sequence shards beside data and head axes, against
  the same reference; here the `sequence` and `heads_and_sequence` meshes
  would run the same ring passes and all-to-alls at other sizes. The
  mechanisms that gather the sequence (vanilla, blockwise, flash) keep both
  meshes here, with the bias and mask that file does not shard.
  """
  return (registry.get_mechanism(mechanism).sequence_parallel and
          BACKEND in fa.capabilities(mechanism).platforms)


@pytest.mark.parametrize("mechanism,mesh_name,with_dropout", [
    pytest.param(m, mesh, d, id=f"{m}-{mesh}{'_dropout' if d else ''}")
    for m in MECHANISMS for mesh, d in MESH_CASES
    if not (mesh in ("heads", "batch") and
            m in SAME_SHARDS_AS_BATCH_AND_HEADS)
    and not ("sequence" in mesh and sequence_sharded_elsewhere(m))])
def test_sharded_matches_reference(mechanism, mesh_name, with_dropout):
  """Sharded over a mesh, a mechanism still computes the semantics, and its
  dropout keep decisions are bit-identical to the unsharded reference's."""
  axis_dims, batch, heads, kv_heads = mesh_layout(mesh_name)
  mesh = fa.make_mesh(axis_dims, devices=mesh_devices())
  platform = mesh.devices.flat[0].platform
  dtype = preferred_dtype(mechanism)
  seq, dim = 32, 16
  traits = {dtype, platform, "causal"}
  if "sequence" in mesh_name:
    traits.add("sharded_sequence")
  if kv_heads != heads:
    traits.add("gqa")
  if with_dropout:
    traits |= {"dropout", "value_dim_differs"}
    q, k, v, ct, value_dim = dropout_inputs(
        f"sharded {mesh_name}", batch, seq, seq, heads, kv_heads, dim, dtype)
    features = ("causal",)
  else:
    rng = helpers.rng_for("sharded", mesh_name)
    q, k, v = helpers.random_qkv(rng, batch, seq, seq, heads, kv_heads, dim,
                                 dtype=dtype)
    ct = helpers.random_array(rng, q.shape, dtype)
    value_dim = dim
    # Each structured input is sharded with the batch (and bias/mask with the
    # heads); keep those the mechanism supports (on any platform).
    features = tuple(f for f in SHARDED_FEATURES
                     if f not in refusals(mechanism))
  call, bias = {"causal": True}, None
  rng = helpers.rng_for("sharded inputs", mesh_name)
  if "kv_lengths" in features:
    call["kv_lengths"] = jnp.asarray(rng.integers(1, seq + 1, (batch,)),
                                     jnp.int32)
  if "bias" in features:
    bias = helpers.random_array(rng, (batch, heads, seq, seq), dtype)
  if "segments" in features:
    call["segment_ids"] = jnp.asarray(
        np.sort(rng.integers(0, 3, (batch, seq)), axis=1))
  if "mask" in features:
    call["mask"] = jnp.asarray(rng.random((batch, 1, seq, seq)) < 0.8)
  options = module_options(mechanism, mesh=mesh, value_dim=value_dim,
                           dropout_rate=DROPOUT_RATE if with_dropout else 0.)
  rng_key = jax.random.key(7)
  if with_dropout:
    call["deterministic"] = False
  if expect_refusal(mechanism, traits, lambda: helpers.call_mechanism(
      mechanism, q, k, v, options=options, rng=rng_key, bias=bias, **call)):
    return
  delegate = DELEGATES.get(mechanism)
  if (delegate and
      (mesh_name, with_dropout) not in DELEGATE_MESHES.get(mechanism, ()) and
      not (registry.get_mechanism(mechanism).sequence_parallel and
           "sequence" in mesh_name) and
      (with_dropout or features == tuple(
          f for f in SHARDED_FEATURES if f not in refusals(delegate)))):
    # The delegate's own case runs this very call on this mesh.
    assert_delegates(mechanism, q, k, v, rng=rng_key, bias=bias,
                     options=options, delegate_options=module_options(
                         delegate, mesh=mesh, value_dim=value_dim,
                         dropout_rate=options["dropout_rate"]), **call)
    return
  # The kernel really runs under shard_map on this mesh.
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: helpers.call_mechanism(
      mechanism, q, k, v, options=options, rng=rng_key, bias=bias, **call))(
          q, k, v))
  assert "shard_map" in jaxpr
  result = helpers.run_mechanism(mechanism, q, k, v, ct, bias=bias,
                                 call=call, options=options, rng=rng_key)
  dropout = (helpers.reference_dropout(rng_key, DROPOUT_RATE)
             if with_dropout else None)
  ref = helpers.reference_vjp(q, k, v, ct, bias=bias, call=call,
                              dropout=dropout, return_weights=with_dropout)
  helpers.assert_matches_reference(result, ref.out, ref.grads,
                                   f"{mechanism}/{mesh_name}")
  if with_dropout:
    np.testing.assert_array_equal(kept(result.out), ref.weights != 0)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_sharded_op_by_op_matches_reference(mechanism):
  """Called without `jit` on a mesh (as when debugging), a mechanism runs
  and computes the semantics, gradients included. An eagerly evaluated
  `shard_map` cannot run a custom_vjp with symbolic zeros: flash on any
  mesh raised JAX's NotImplementedError this way until the sharding
  wrapper jitted its `shard_map`."""
  mesh_name = ("heads_and_sequence" if sequence_sharded_elsewhere(mechanism)
               else "batch_and_heads")
  axis_dims, batch, heads, kv_heads = mesh_layout(mesh_name)
  mesh = fa.make_mesh(axis_dims, devices=mesh_devices())
  dtype = preferred_dtype(mechanism)
  traits = {dtype, mesh.devices.flat[0].platform, "causal"}
  if "sequence" in mesh_name:
    traits.add("sharded_sequence")
  if kv_heads != heads:
    traits.add("gqa")
  rng = helpers.rng_for("op by op", mesh_name)
  q, k, v = helpers.random_qkv(rng, batch, 16, 16, heads, kv_heads, 16,
                               dtype=dtype)
  ct = helpers.random_array(rng, q.shape, dtype)
  options = module_options(mechanism, mesh=mesh)
  call = {"causal": True}
  if expect_refusal(mechanism, traits, lambda: helpers.call_mechanism(
      mechanism, q, k, v, options=options, **call)):
    return
  what = f"{mechanism}/{mesh_name} op by op"
  ref = helpers.reference_vjp(q, k, v, ct, call=call)
  # The forward alone (differentiating traces the shard_map into a jaxpr).
  out = helpers.call_mechanism(mechanism, q, k, v, options=options, **call)
  helpers.assert_close(out.attention_outputs, ref.out, dtype, what)
  result = helpers.run_mechanism(mechanism, q, k, v, ct, call=call,
                                 options=options, use_jit=False)
  helpers.assert_matches_reference(result, ref.out, ref.grads, what)
