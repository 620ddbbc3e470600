"""flash's Mosaic GPU backward on Hopper: dQ inside the dK/dV kernel (the
fused backward), and the Mosaic GPU dQ kernel (`mosaic_dq`).

`LaunchConfig(dkv_backend="mosaic", atomic_dq=True)` runs the backward as
one Mosaic GPU kernel (`mosaic_bwd.dkdv` with dQ: TMA reduce-adds of float32
`[64, Dp]` tiles) at padded head sizes 64 and 128. Mosaic GPU has no
interpreter, so on CPU each served structure is lowered for CUDA (the whole
Pallas -> Mosaic GPU lowering runs, shared-memory budget included) and the
program's kernels are counted; the launch policy's acceptance and refusals
are traced. `LaunchConfig(dq_backend="mosaic")` runs dQ through its own
Mosaic GPU kernel (padded head sizes 64 and 128), checked alike. On an
H200, `benchmarks/fused_bwd_probe.py` checks the gradients of both against
the float32 reference and times them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.core import dropout as dropout_lib
from flexible_attention.kernels import flash as flash_kernel
from flexible_attention.kernels import gpu
from flexible_attention.kernels.flash import mosaic_bwd
from flexible_attention.kernels.flash import launch as flash_launch
from flexible_attention.kernels.flash import mosaic_common
from flexible_attention.kernels.flash import mosaic_numerics
from flexible_attention.kernels.flash import mod_lowering
from flexible_attention.kernels.flash import mosaic_dq
from flexible_attention.kernels.flash import mosaic_mod_rows
import helpers


def _fused(head_dim: int, causal: bool = False, atomic_dq: bool = True,
           mosaic_forward: bool = True,
           deterministic: bool = True) -> flash_kernel.LaunchConfig:
  """Hopper launches with the Mosaic dK/dV kernel and, with `atomic_dq`, dQ
  in it (int32 fixed point unless `deterministic=False`); the Mosaic
  forward unless `mosaic_forward=False` (Triton's)."""
  launch = flash_kernel.hopper_launch_config(
      head_dim, causal, dq="fused" if atomic_dq else "triton",
      deterministic_dq=deterministic)
  if mosaic_forward:
    return launch
  triton = flash_kernel.default_launch_config(head_dim, causal, 9.0)
  return dataclasses.replace(launch, fwd=triton.fwd, fwd_backend="triton")


# name: (canonicalize's structure, shape and options). Lengths are not
# multiples of the tiles (padded rows and keys), Sq < Sk.
CASES = {
    "plain": ({}, dict(h=2, hkv=2)),
    "causal_window_softcap_gqa": (dict(causal=True, sliding_window=(96, 0)),
                                  dict(h=4, hkv=2, softcap=20.0)),
    "sinks": (dict(causal=True), dict(h=2, hkv=1, sinks=True)),
    "dropout_gqa": (dict(causal=True), dict(h=4, hkv=2, dropout=0.2)),
}


def _dropout(options: dict):
  """The case's `Dropout`, or None."""
  rate = options.get("dropout")
  return rate and dropout_lib.make_dropout(jax.random.key(0), rate)


def _kernels(text: str) -> dict[str, int]:
  """The kernels of a lowered program: Mosaic GPU and Triton custom calls,
  and the Mosaic GPU ones with an output aliased to an operand (the fused
  kernel's dQ, which it adds into)."""
  calls = [(match.group(1), line) for line in text.splitlines()
           if (match := re.search(r"stablehlo\.custom_call @([\w$.]+)", line))]
  mosaic = [line for target, line in calls if target.startswith("mosaic_gpu")]
  return dict(mosaic=len(mosaic),
              triton=sum(target.endswith(".triton") for target, _ in calls),
              aliased=sum("output_operand_aliases" in line for line in mosaic))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_backward_lowers_for_cuda(name, head_dim):
  """The gradient of q, k, v (and sinks) lowers with two Mosaic kernels,
  the forward and the fused backward (its dQ adds in a fixed order): no
  Triton dQ."""
  _check_fused_lowering(name, head_dim, deterministic=True)


@pytest.mark.parametrize("name, head_dim", [
    ("plain", 128), ("causal_window_softcap_gqa", 64)])
def test_fused_backward_in_any_order_lowers_for_cuda(name, head_dim):
  """With `deterministic_dq=False` (no semaphores, one dQ) too."""
  _check_fused_lowering(name, head_dim, deterministic=False)


@pytest.mark.parametrize("name, head_dim", [
    ("plain", 128), ("dropout_gqa", 64)])
def test_fused_backward_with_rotated_steps_lowers_for_cuda(name, head_dim):
  """With `rotate_dq=True` (each unmasked program starts at its key tile's
  index) too."""
  _check_fused_lowering(name, head_dim, deterministic=True, rotate=True)


def _check_fused_lowering(name: str, head_dim: int, deterministic: bool,
                          rotate: bool = False):
  call, options = CASES[name]
  options = dict(options)
  softcap, sinks = options.pop("softcap", None), options.pop("sinks", False)
  b, sq, sk, h, hkv = 2, 200, 328, options["h"], options["hkv"]
  q = jax.ShapeDtypeStruct((b, sq, h, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, sk, hkv, head_dim), jnp.bfloat16)
  sink = jax.ShapeDtypeStruct((h,), jnp.float32)
  launch = dataclasses.replace(
      _fused(head_dim, call.get("causal", False), deterministic=deterministic),
      rotate_dq=rotate)

  def loss(q, k, v, sink):
    inputs = fa.canonicalize(q, k, v, sinks=sink if sinks else None, **call)
    out = flash_kernel.flash_attention(inputs, _dropout(options),
                                       sm_scale=head_dim**-0.5,
                                       softcap=softcap, launch=launch).out
    return jnp.sum(out.astype(jnp.float32))

  text = helpers.lower_for_cuda(jax.grad(loss, (0, 1, 2, 3)), q, kv, kv, sink)
  assert _kernels(text) == dict(mosaic=2, triton=0, aliased=1)


def test_split_backward_keeps_the_triton_dq():
  """The same launches without `atomic_dq`: dK/dV by Mosaic, dQ by Triton,
  nothing aliased."""
  q = jax.ShapeDtypeStruct((1, 192, 2, 64), jnp.bfloat16)
  launch = _fused(64, atomic_dq=False)

  def loss(q, k, v):
    out = flash_kernel.flash_attention(fa.canonicalize(q, k, v),
                                       sm_scale=0.125, launch=launch).out
    return jnp.sum(out.astype(jnp.float32))

  text = helpers.lower_for_cuda(jax.grad(loss, (0, 1, 2)), q, q, q)
  assert _kernels(text) == dict(mosaic=2, triton=1, aliased=0)


def _launch(monkeypatch, *, launch=None, head_dim=128, dtype=jnp.bfloat16,
            dropout=None, block_sizes=None, length=256,
            **call) -> flash_kernel.LaunchConfig:
  """The launches `prepare` picks for a call on an sm_90 GPU (traced; Sq =
  Sk = `length`)."""
  monkeypatch.setattr(gpu, "compute_capability", lambda: 9.0)
  x = jax.ShapeDtypeStruct((1, length, 2, head_dim), dtype)
  chosen = []
  jax.eval_shape(lambda q: chosen.append(flash_kernel.prepare(
      fa.canonicalize(q, q, q, **call), dropout, sm_scale=0.1,
      block_sizes=block_sizes, launch=launch).static.launch), x)
  return chosen[0]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_mosaic_dkv_with_atomic_dq_is_the_fused_backward(head_dim,
                                                         monkeypatch):
  launch = _fused(head_dim)
  flash_kernel.check_launch_config(launch)  # No longer refused.
  chosen = _launch(monkeypatch, launch=launch, head_dim=head_dim, causal=True)
  assert (chosen.dkv_backend, chosen.atomic_dq) == ("mosaic", True)


def test_fused_backward_is_off_by_default_on_short_keys(monkeypatch):
  """Below `FUSED_DQ_MIN_KV_LEN` keys the default launches keep the split
  backward (dQ through Triton at this length)."""
  chosen = _launch(monkeypatch, causal=True)
  assert (chosen.dkv_backend, chosen.atomic_dq) == ("mosaic", False)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_backward_serves_long_keys_by_default(causal, monkeypatch):
  """At Dp = `FUSED_DQ_HEAD_DIM` from `FUSED_DQ_MIN_KV_LEN` keys on, where
  it measured faster than either dQ kernel, the default launches fuse dQ
  into the Mosaic dK/dV kernel, reproducible (int32 fixed point); the dQ
  launch, not launched, stays Triton's default. Dropout changes nothing."""
  dropout = dropout_lib.Dropout(jnp.zeros(2, jnp.uint32), jnp.int32(0),
                                jnp.int32(0), 0.1)
  for options in ({}, dict(dropout=dropout)):
    chosen = _launch(monkeypatch, causal=causal,
                     length=flash_launch.FUSED_DQ_MIN_KV_LEN, **options)
    default = flash_kernel.default_launch_config(128, causal, 9.0)
    assert (chosen.fwd_backend, chosen.dkv_backend, chosen.dq_backend) == (
        "mosaic", "mosaic", "triton")
    assert (chosen.atomic_dq, chosen.deterministic_dq) == (True, True)
    assert chosen.dq == default.dq
    assert not chosen.rotate_dq  # Rotated only from ROTATE_DQ_MIN_KV_LEN.


def test_fused_backward_rotates_its_steps_on_long_keys(monkeypatch):
  """From `ROTATE_DQ_MIN_KV_LEN` keys (where it measured faster) the
  default fused backward walks each unmasked program's query tiles from
  its own key tile's index (`rotate_dq`); at half that length it does not."""
  rotated = flash_launch.ROTATE_DQ_MIN_KV_LEN
  for length, rotate in ((rotated // 2, False), (rotated, True)):
    chosen = _launch(monkeypatch, causal=False, length=length)
    assert (chosen.atomic_dq, chosen.rotate_dq) == (True, rotate), length


# The schedules other than the default (`DQ_LAG+STAGGER`, which the tests
# above lower in every case) with every case once, their adds in fixed
# point and float32 alternately (each schedule meets both, and each case):
# a covering set of the three factors, not their product.
@pytest.mark.parametrize("name, head_dim, flags, deterministic", [
    (name, head_dim, flags, (i + j) % 2 == 0)
    for i, (name, head_dim) in enumerate([
        ("plain", 128), ("causal_window_softcap_gqa", 64), ("sinks", 128),
        ("dropout_gqa", 64)])
    for j, flags in enumerate(["DQ_ADD_BESIDE_DK", "DQ_LAG"])])
def test_fused_backward_step_schedules_lower_for_cuda(name, head_dim, flags,
                                                      deterministic,
                                                      monkeypatch):
  """With `mosaic_bwd_rows`' other step schedules (the flags named on, the
  others off): dQ added while dK's runs (`DQ_ADD_BESIDE_DK`), each step's
  dQ a step late without the consumers half a step apart (`DQ_LAG`
  without `STAGGER`), its adds in fixed point or float32."""
  helpers.use_step_schedule(monkeypatch, flags)
  _check_fused_lowering(name, head_dim, deterministic=deterministic)


# Each mod with each schedule once, the head sizes alternating (each
# schedule at both, each mod at both).
@pytest.mark.parametrize("mod, head_dim, schedules", [
    (mod, 64 if (i + j) % 2 else 128, schedules)
    for i, mod in enumerate(["alibi", "prefix_lm"])
    for j, schedules in enumerate(["", "DQ_ADD_BESIDE_DK", "DQ_LAG+STAGGER"])])
def test_fused_backward_with_mods_lowers_for_cuda(mod, head_dim,
                                                  schedules, monkeypatch):
  """An explicit fused launch runs ALiBi (a score_mod whose [H] slopes get
  their gradient in the kernel) and a prefix-LM mask_mod in the dK/dV
  kernel that adds dQ: the gradients of q, k, v (and the slopes) lower as
  the Mosaic forward and one Mosaic dK/dV kernel, aliased to dQ; with
  `mosaic_bwd_rows`' step schedules (`schedules`, the flags on,
  "+"-separated; none: the step before `DQ_LAG`)."""
  helpers.use_step_schedule(monkeypatch, schedules)
  b, s, h, hkv = 2, 256, 4, 2
  q = jax.ShapeDtypeStruct((b, s, h, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, s, hkv, head_dim), jnp.bfloat16)
  if mod == "alibi":
    call = dict(causal=True, score_mod=fa.alibi_score_mod)
    args = jnp.asarray(fa.alibi_slopes(h))
  else:
    call = dict(mask_mod=fa.prefix_lm_mask_mod)
    args = jnp.asarray([40, 150], jnp.int32)
  launch = _fused(head_dim, call.get("causal", False))

  def loss(q, k, v, args):
    inputs = fa.canonicalize(q, k, v, mod_args=(args,), **call)
    out = flash_kernel.flash_attention(inputs, sm_scale=0.125,
                                       launch=launch).out
    return jnp.sum(out.astype(jnp.float32))

  argnums = (0, 1, 2, 3) if mod == "alibi" else (0, 1, 2)
  text = helpers.lower_for_cuda(jax.grad(loss, argnums), q, kv, kv, args)
  # The forward and the fused dK/dV kernel (no dQ kernel).
  assert _kernels(text) == dict(mosaic=2, triton=0, aliased=1)


def test_fused_backward_refuses_mods_beyond_its_shared_memory():
  """128 query heads a KV head: the consumers' rows of ALiBi's slopes (128
  bytes a head each) exceed what the fused kernel leaves to mods at Dp =
  128 (`mosaic_common.FUSED_MODS_SMEM`): an explicit fused launch is an
  error naming `atomic_dq`."""
  b, s, h, d = 1, 128, 128, 128
  q = jnp.zeros((b, s, h, d), jnp.bfloat16)
  kv = jnp.zeros((b, s, 1, d), jnp.bfloat16)

  def loss(q, k, v):
    inputs = fa.canonicalize(q, k, v, causal=True,
                             score_mod=fa.alibi_score_mod,
                             mod_args=(jnp.ones((h,)),))
    return flash_kernel.flash_attention(
        inputs, sm_scale=0.125, launch=_fused(d, True)).out.sum()

  with pytest.raises(ValueError, match=(
      r"its fused dQ \(atomic_dq=True\) leaves 24576 bytes of shared "
      r"memory to score_mod / mask_mod at padded head size 128, and this "
      r"call's take \d+ .* of the "
      r"group's 128 query heads .*use atomic_dq=False")):
    jax.eval_shape(jax.grad(loss, (0, 1, 2)), q, kv, kv)


@pytest.mark.parametrize("dq", flash_launch.DQ_PATHS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_launch_config_pins_the_mosaic_kernels(dq, head_dim,
                                                      monkeypatch):
  """`hopper_launch_config` gives every kernel's fixed Mosaic launch, and
  the policy takes it as it is (checked, unchanged)."""
  launch = flash_kernel.hopper_launch_config(head_dim, True, dq=dq)
  flash_kernel.check_launch_config(launch)
  assert (launch.fwd, launch.dkv) == (
      flash_kernel.mosaic_launch(head_dim),
      flash_kernel.mosaic_dkv_launch(head_dim, fused=dq == "fused"))
  assert (launch.fwd_backend, launch.dkv_backend) == ("mosaic", "mosaic")
  assert launch.atomic_dq == (dq == "fused")
  assert launch.dq_backend == ("mosaic" if dq == "mosaic" else "triton")
  assert _launch(monkeypatch, launch=launch, head_dim=head_dim,
                 causal=True) == launch


def test_hopper_launch_config_refuses_an_unknown_dq():
  with pytest.raises(ValueError, match=r"dq must be one of \('triton', "
                     r"'mosaic', 'fused'\), got 'cuda'"):
    flash_kernel.hopper_launch_config(128, dq="cuda")


_LONGEST = flash_launch.FUSED_DQ_MAX_KV_LEN


@pytest.mark.parametrize("head_dim, length, dtype, block_sizes, fused", [
    (64, flash_launch.FUSED_DQ_MIN_KV_LEN, jnp.bfloat16, None, False),
    (256, flash_launch.FUSED_DQ_MIN_KV_LEN, jnp.bfloat16, None, False),
    (128, flash_launch.FUSED_DQ_MIN_KV_LEN // 2, jnp.bfloat16, None, False),
    (128, flash_launch.FUSED_DQ_MIN_KV_LEN, jnp.bfloat16,
     fa.BlockSizes(block_q_dq=32), False),
    # Precision: the fixed point's error grows with Sk.
    (128, _LONGEST[jnp.dtype(jnp.bfloat16)], jnp.bfloat16, None, True),
    (128, 2 * _LONGEST[jnp.dtype(jnp.bfloat16)], jnp.bfloat16, None, False),
    (128, _LONGEST[jnp.dtype(jnp.float16)], jnp.float16, None, True),
    (128, 2 * _LONGEST[jnp.dtype(jnp.float16)], jnp.float16, None, False),
], ids=["head_dim_64", "head_dim_256", "shorter", "user_dq_tiles",
        "bf16_longest", "bf16_longer", "fp16_longest", "fp16_longer"])
def test_fused_backward_by_default_only_where_it_measured_fastest_and_exact(
    head_dim, length, dtype, block_sizes, fused, monkeypatch):
  """D = 64 measured slower, D = 256 has no fused kernel (`fused_dq_reason`),
  the user's dQ tiles are for the dQ kernel, and from `FUSED_DQ_MAX_KV_LEN`
  keys on the fixed point's summation error would near the dtype's
  rounding."""
  chosen = _launch(monkeypatch, head_dim=head_dim, length=length,
                   dtype=dtype, block_sizes=block_sizes, causal=True)
  assert chosen.dkv_backend == "mosaic"
  assert chosen.atomic_dq == fused


@pytest.mark.parametrize("heads, kv_heads, fused", [
    (2, 2, True), (8, 2, True),
    # 128 query heads a KV head: their rows of ALiBi's slopes exceed the
    # shared memory the fused kernel leaves to mods.
    (128, 1, False)])
def test_fused_backward_by_default_with_mods_that_fit(heads, kv_heads, fused,
                                                      monkeypatch):
  """The default launches fuse calls with score_mod / mask_mod (ALiBi, its
  slopes' gradient in the kernel) where the mods' shared memory fits
  (`mosaic_mod_rows.fused_mods_reason`); elsewhere the Mosaic dQ kernel
  serves them at this length, never a launch the kernel refuses."""
  monkeypatch.setattr(gpu, "compute_capability", lambda: 9.0)
  q = jnp.zeros((1, 256, heads, 128), jnp.bfloat16)
  kv = jnp.zeros((1, 256, kv_heads, 128), jnp.bfloat16)
  inputs = fa.canonicalize(q, kv, kv, score_mod=fa.alibi_score_mod,
                           mod_args=(jnp.ones((heads,)),))
  km = mod_lowering.kernel_mods(inputs.mods)
  groups = heads // kv_heads
  assert (mosaic_mod_rows.fused_mods_reason(km, 128, groups) is None) == fused
  chosen = flash_launch.choose_launch(
      dtype=jnp.bfloat16, head_dim=128, value_dim=128, q_len=256,
      kv_len=flash_launch.MOSAIC_DQ_MIN_KV_LEN, causal=True, bias=False,
      mask=False, precision=None, interpret=False, block_sizes=None,
      launch=None, float32_results=False, mods=km, groups=groups)
  assert (chosen.dkv_backend, chosen.atomic_dq) == ("mosaic", fused)
  assert chosen.dq_backend == ("triton" if fused else "mosaic")


@pytest.mark.parametrize("launch, call, match", [
    # D = 256 (the columns layout) keeps the split backward.
    (_fused(256), dict(head_dim=256), "dkv_backend='mosaic' cannot serve this "
     r"call: its fused dQ \(atomic_dq=True\) takes padded head sizes below "
     "256, got 256"),
    # What the Mosaic dK/dV kernel refuses, the fused one refuses alike.
    (_fused(128), dict(dtype=jnp.float32), "cannot serve this call: it takes "
     "bfloat16 or float16"),
    (_fused(128, mosaic_forward=False),
     dict(mask=jnp.ones((1, 1, 256, 256), bool)),
     "dkv_backend='mosaic' cannot serve this call: it takes no bias or "
     "dense mask"),
    (dataclasses.replace(_fused(128), dkv=flash_kernel.Launch(32, 128, 4, 3)),
     {}, "takes dkv tiles 64 x 128"),
    # rotate_dq orders the fused Mosaic backward's adds: nothing else has it.
    (dataclasses.replace(_fused(128, atomic_dq=False), rotate_dq=True), {},
     "rotate_dq=True .* needs atomic_dq=True and dkv_backend='mosaic', got "
     "atomic_dq=False"),
    (dataclasses.replace(_fused(128), dkv_backend="triton",
                         deterministic_dq=False, rotate_dq=True), {},
     "needs atomic_dq=True and dkv_backend='mosaic', got atomic_dq=True and "
     "dkv_backend='triton'"),
])
def test_fused_backward_refusals(launch, call, match, monkeypatch):
  with pytest.raises(ValueError, match=match):
    _launch(monkeypatch, launch=launch, **call)


def test_fused_dq_reason_names_the_head_sizes():
  assert mosaic_common.fused_dq_reason(64) is None
  assert mosaic_common.fused_dq_reason(128) is None
  assert "atomic_dq=False" in mosaic_common.fused_dq_reason(256)


def _scale_inputs(seed=0, b=2, s=200, h=4, hkv=2, d=64):
  """Random q, k, v, dO (bf16) with rows of dO spanning six decades, and
  the float32 reference's output, lse and delta."""
  keys = jax.random.split(jax.random.key(seed), 5)
  q, k, v, do = (jax.random.normal(key, shape, jnp.float32)
                 for key, shape in zip(keys, [(b, s, h, d), (b, s, hkv, d),
                                              (b, s, hkv, d), (b, s, h, d)]))
  do = do * 10.0**jax.random.uniform(keys[4], (b, s, h, 1), minval=-3,
                                     maxval=3)
  return tuple(x.astype(jnp.bfloat16).astype(jnp.float32)
               for x in (q, k, v, do))


@pytest.mark.parametrize("causal, rate", [(False, None), (True, 0.3)])
def test_fixed_point_scales_bound_every_partial_sum(causal, rate):
  """Every partial sum of a row's dQ over a set of keys (here: every
  prefix of the keys) times the row's scale stays within
  2^FIXED_POINT_BITS / FIXED_POINT_MARGIN (inside int32), on random rows
  of dO spanning six decades; the scales are powers of two."""
  q, k, v, do = _scale_inputs()
  b, s, h, d = q.shape
  groups, scale = h // k.shape[2], d**-0.5
  kk, vv = (jnp.repeat(x, groups, axis=2) for x in (k, v))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, kk) * scale
  if causal:
    logits = jnp.where(jnp.tril(jnp.ones((s, s), bool)), logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  keep = 1.0 - (rate or 0.0)
  # The largest dp a kept element can take: dO . v / (1 - rate).
  dp = jnp.einsum("bqhd,bkhd->bhqk", do, vv) / keep
  out = jnp.einsum("bhqk,bkhd->bqhd", p, vv)
  delta = jnp.einsum("bqhd,bqhd->bhq", do, out)
  ds = p * (dp - delta[..., None]) * scale
  terms = jnp.einsum("bhqk,bkhd->bhqkd", ds, kk)  # Each key's share of dQ.
  prefixes = jnp.cumsum(terms, axis=3)
  scales = mosaic_numerics.fixed_point_scales(
      k, v, do, delta, sm_scale=scale, groups=groups, dropout_rate=rate)
  assert scales.shape == (b, h, s)
  assert jnp.all(jnp.exp2(jnp.round(jnp.log2(scales))) == scales)
  largest = jnp.max(jnp.abs(prefixes), axis=(3, 4)) * scales
  assert jnp.max(largest) <= (2.0**mosaic_numerics.FIXED_POINT_BITS
                              / mosaic_numerics.FIXED_POINT_MARGIN) < 2**31


@pytest.mark.parametrize("rate", [None, 0.5])
def test_fixed_point_scales_are_tight_where_the_bound_is(rate):
  """Two keys seen with p = 1/2 each, values c e1 and -c e1, dO = c' e1
  (both kept under dropout, so dp = dO . v / (1 - rate)): delta = 0, and
  the partial sum over the first key is half of the bound `sm_scale
  max|k| ||dO|| max||v|| / (1 - rate)`, so times the scale it lies in
  (2^(BITS - 2) / MARGIN, 2^(BITS - 1) / MARGIN]: a scale off by a factor
  2 either way fails."""
  d, c, c2, scale = 64, 1.3, 0.7, 0.125
  e1 = jnp.zeros((d,)).at[0].set(1.0)
  k = jnp.full((1, 2, 1, d), 0.9)
  v = jnp.stack([c * e1, -c * e1])[None, :, None]
  do = (c2 * e1)[None, None, None]
  # p = 1/2: equal logits (q = 0); ds_1 = p dp_1 scale, dp_1 = c c2.
  partial = 0.5 * c * c2 / (1.0 - (rate or 0.0)) * scale * 0.9
  scales = mosaic_numerics.fixed_point_scales(
      k, v, do, jnp.zeros((1, 1, 1)), sm_scale=scale, groups=1,
      dropout_rate=rate)
  top = 2.0**mosaic_numerics.FIXED_POINT_BITS / mosaic_numerics.FIXED_POINT_MARGIN
  assert top / 4 < partial * scales[0, 0, 0] <= top / 2


def test_fixed_point_sums_stay_near_float32s():
  """The fused backward's dQ sums in fixed point, modelled: 16k keys, D =
  128, random rows (diffuse attention, where the scales' bound is loosest:
  ~4000x the row's largest |dQ|), each 128-key program's exact share
  truncated at the row's scale, in key-tile order. The sum stays within
  2^-13 of each row's largest entry (bf16's rounding of dQ is 2^-9; the
  model gives ~5e-5, and scales 4x coarser would give ~2e-4)."""
  rng = np.random.default_rng(0)
  rows, keys, d = 64, 16384, 128
  q, do = rng.standard_normal((2, rows, d))
  k, v = rng.standard_normal((2, keys, d))
  sm_scale = d**-0.5
  logits = q @ k.T * sm_scale
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  delta = np.sum(do * (p @ v), axis=1)
  ds = p * (do @ v.T - delta[:, None])
  shares = np.stack([sm_scale * ds[:, t:t + 128] @ k[t:t + 128]
                     for t in range(0, keys, 128)])  # [keys / 128, rows, d]
  exact = shares.sum(axis=0)
  scales = np.asarray(mosaic_numerics.fixed_point_scales(
      jnp.asarray(k[None, :, None], jnp.float32),
      jnp.asarray(v[None, :, None], jnp.float32),
      jnp.asarray(do[None, :, None], jnp.float32),
      jnp.asarray(delta[None, None], jnp.float32), sm_scale=sm_scale,
      groups=1), np.float64)[0, 0, :, None]  # [rows, 1]
  fixed = np.sum(np.trunc(shares * scales), axis=0) / scales
  error = np.max(np.abs(fixed - exact), axis=1) / np.max(np.abs(exact), axis=1)
  assert np.max(error) < 2.0**-13


@pytest.mark.parametrize("jit", [False, True])
def test_round_to_int32_is_exact(jit):
  """`round_to_int32` against float64 rounding (ties to even) on the whole
  range the fixed point uses (up to 2^31 / FIXED_POINT_MARGIN), small
  values, halves and the 2^9 steps of its split; jitted too (XLA would
  fold the rounding constant's add and subtract without the barrier)."""
  rng = np.random.default_rng(0)
  top = 2.0**mosaic_numerics.FIXED_POINT_BITS / mosaic_numerics.FIXED_POINT_MARGIN
  edges = np.array([0.0, -0.0, 0.5, -0.5, 1.5, 2.5, -2.5, 255.5, 256.0,
                    256.5, -256.5, 511.5, 512.0, 767.5, 2.0**22, 2.0**30,
                    top, -top])
  y = np.concatenate([rng.uniform(-top, top, 200_000),
                      rng.uniform(-600.0, 600.0, 50_000),
                      rng.standard_normal(10_000) * 1e-3, edges])
  y = y.astype(np.float32)
  convert = jax.jit(mosaic_numerics.round_to_int32) if jit else (
      mosaic_numerics.round_to_int32)
  got = np.asarray(convert(jnp.asarray(y)))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, np.rint(y.astype(np.float64)))


@pytest.mark.parametrize("jit", [False, True])
def test_small_int_to_float_is_exact(jit):
  """`small_int_to_float` against numpy's conversion on the whole range it
  serves (|n| < 2^22), its edges and small values; jitted too."""
  top = mosaic_numerics.SMALL_INT - 1
  rng = np.random.default_rng(1)
  n = np.concatenate([rng.integers(-top, top + 1, 200_000),
                      np.arange(-1000, 1000), [top, -top, 2**21, -2**21]])
  n = n.astype(np.int32)
  convert = (jax.jit(mosaic_numerics.small_int_to_float) if jit else
             mosaic_numerics.small_int_to_float)
  got = np.asarray(convert(jnp.asarray(n)))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, n.astype(np.float32))


def test_fixed_point_scales_of_zero_and_non_finite_rows():
  """A row whose bound is 0 gets 1 (its dQ is 0); one whose bound is not
  finite gets 0, so that XLA's division gives it NaN."""
  q, k, v, do = _scale_inputs(s=8)
  do = do.at[0, 3].set(0.0).at[1, 5, 2].set(jnp.nan)
  delta = jnp.zeros((do.shape[0], do.shape[2], do.shape[1]))  # [B, H, S]
  scales = mosaic_numerics.fixed_point_scales(k, v, do, delta, sm_scale=0.125,
                                            groups=2)
  assert jnp.all(scales[0, :, 3] == 1.0)
  assert scales[1, 2, 5] == 0.0
  assert jnp.all(scales[1, :2, 5] > 0.0) and jnp.all(scales[1, 3:, 5] > 0.0)
  assert jnp.sum(scales == 0.0) == 1


def test_kernel_refuses_dq_in_the_columns_layout():
  """`mosaic_bwd.dkdv` itself, called past the policy at Dp = 256."""
  x = jax.ShapeDtypeStruct((1, 64, 1, 256), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((1, 1, 64), jnp.float32)
  ints = jax.ShapeDtypeStruct((1, 1, 64), jnp.int32)
  bounds = jax.ShapeDtypeStruct((1, 1, 4), jnp.int32)
  statics = []  # A plain call's static record, with the fused launches.
  jax.eval_shape(lambda q: statics.append(flash_kernel.prepare(
      fa.canonicalize(q, q, q), sm_scale=0.1, interpret=True).static), x)
  static = dataclasses.replace(statics[0], launch=_fused(256))
  with pytest.raises(ValueError, match="fused dQ"):
    jax.eval_shape(lambda *a: mosaic_bwd.dkdv(static, *a), x, x, x, x, rows,
                   rows, bounds, ints, ints)


# --- The Mosaic GPU dQ kernel (`LaunchConfig.dq_backend="mosaic"`) ----------


def _mosaic_dq(head_dim: int, causal: bool = False,
               **fields) -> flash_kernel.LaunchConfig:
  """Hopper launches with every kernel through Mosaic GPU: the split
  backward, dQ by `mosaic_dq`."""
  return dataclasses.replace(
      flash_kernel.hopper_launch_config(head_dim, causal, dq="mosaic"),
      **fields)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", ["plain", "causal_window_softcap_gqa",
                                  "dropout_gqa"])
def test_mosaic_dq_lowers_for_cuda(name, head_dim):
  """dQ of the backward kernels alone (`backward_pass`, the cheapest to
  lower: the dK/dV kernel, unused, is dropped) lowers as one Mosaic GPU
  kernel and no Triton one."""
  call, options = CASES[name]
  b, sq, sk, h, hkv = 2, 200, 328, options["h"], options["hkv"]
  q = jax.ShapeDtypeStruct((b, sq, h, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, sk, hkv, head_dim), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((b, h, sq), jnp.float32)
  launch = _mosaic_dq(head_dim, call.get("causal", False))

  def backward(q, k, v, out, lse, dout):
    prepared = flash_kernel.prepare(
        fa.canonicalize(q, k, v, **call), _dropout(options),
        sm_scale=head_dim**-0.5,
        softcap=options.get("softcap"), launch=launch)
    return flash_kernel.backward_pass(prepared, out, lse, dout)[0]

  text = helpers.lower_for_cuda(backward, q, kv, kv, q, lse, q)
  assert _kernels(text) == dict(mosaic=1, triton=0, aliased=0)


@pytest.mark.parametrize("kv_len, backend", [
    (flash_launch.MOSAIC_DQ_MIN_KV_LEN // 2, "triton"),
    (flash_launch.MOSAIC_DQ_MIN_KV_LEN, "mosaic")])
def test_mosaic_dq_serves_long_calls_by_default(kv_len, backend,
                                                monkeypatch):
  """The Mosaic dQ measured faster than Triton's from 16k keys on, slower
  at 4k: the default launches take it from `MOSAIC_DQ_MIN_KV_LEN` on (at
  D = 64: at 128 the fused backward serves those calls)."""
  chosen = _launch(monkeypatch, head_dim=64, causal=True, length=kv_len)
  assert (chosen.dkv_backend, chosen.dq_backend) == ("mosaic", backend)


@pytest.mark.parametrize("head_dim, block_sizes, backend", [
    (64, None, "mosaic"), (128, None, "mosaic"),
    (256, None, "triton"),  # Does not fit (mosaic_common.dq_reason).
    (128, fa.BlockSizes(block_k_dq=32), "triton"),  # The user's tiles.
])
def test_mosaic_dq_by_default_where_it_serves(head_dim, block_sizes,
                                              backend, monkeypatch):
  """From `MOSAIC_DQ_MIN_KV_LEN` keys on, the default launches take the
  Mosaic dQ kernel wherever it serves the call, as for the forward and
  dK/dV."""
  monkeypatch.setattr(flash_launch, "MOSAIC_DQ_MIN_KV_LEN", 256)
  chosen = _launch(monkeypatch, head_dim=head_dim, block_sizes=block_sizes,
                   causal=True)
  assert chosen.dq_backend == backend
  if backend == "mosaic":
    assert chosen.dq == flash_kernel.mosaic_dq_launch(head_dim)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("call", [dict(causal=True), dict(sinks=jnp.zeros(2))],
                         ids=["causal", "sinks"])
def test_mosaic_dq_serves_what_the_dkv_kernel_serves(head_dim, call,
                                                     monkeypatch):
  """Attention sinks too: the backward reads the lse that counts them."""
  launch = _mosaic_dq(head_dim, call.get("causal", False))
  if "sinks" in call:  # The default forward with sinks (Triton's).
    launch = dataclasses.replace(
        launch, fwd=flash_kernel.default_launch_config(head_dim).fwd,
        fwd_backend="triton")
  chosen = _launch(monkeypatch, launch=launch, head_dim=head_dim, **call)
  assert (chosen.dq_backend, chosen.dq) == (
      "mosaic", flash_kernel.mosaic_dq_launch(head_dim))


_TRITON_REST = dict(fwd=flash_kernel.default_launch_config(128).fwd,
                    fwd_backend="triton",
                    dkv=flash_kernel.default_launch_config(128).dkv,
                    dkv_backend="triton")


@pytest.mark.parametrize("launch, options, match", [
    (_mosaic_dq(128, **_TRITON_REST), dict(bias=jnp.zeros((1, 2, 256, 256))),
     "dq_backend='mosaic' cannot serve this call: it takes no bias or dense "
     "mask"),
    (_mosaic_dq(128, **_TRITON_REST), dict(mask=jnp.ones((1, 1, 256, 256),
                                                          bool)),
     "dq_backend='mosaic' cannot serve this call: it takes no bias or dense "
     "mask"),
    (_mosaic_dq(256, dkv=flash_kernel.default_launch_config(256).dkv,
                dkv_backend="triton"), dict(head_dim=256),
     "dq_backend='mosaic' cannot serve this call: its dQ kernel takes padded "
     "head sizes below 256, got 256"),
    (_mosaic_dq(128, **_TRITON_REST), dict(dtype=jnp.float32),
     "dq_backend='mosaic' cannot serve this call: it takes bfloat16 or "
     "float16"),
    (_mosaic_dq(128, atomic_dq=True), {}, "dq_backend='mosaic' cannot serve "
     "a launch with atomic_dq=True"),
    (_mosaic_dq(128, dq=flash_kernel.Launch(128, 32, 8, 2)), {},
     "takes dq tiles 128 x 64"),
], ids=["bias", "mask", "head_dim_256", "float32", "atomic_dq", "tiles"])
def test_mosaic_dq_refusals(launch, options, match, monkeypatch):
  with pytest.raises(ValueError, match=match):
    _launch(monkeypatch, launch=launch, **options)


def test_mosaic_kernels_serve_dropout_by_default(monkeypatch):
  """Dropout keeps every kernel on Mosaic GPU (the library's hash in each,
  `mosaic_common.TileDropout`); a bias does not."""
  dropout = dropout_lib.Dropout(jnp.zeros(2, jnp.uint32), jnp.int32(0),
                                jnp.int32(0), 0.1)
  chosen = _launch(monkeypatch, dropout=dropout, causal=True, head_dim=64,
                   length=flash_launch.MOSAIC_DQ_MIN_KV_LEN)
  assert (chosen.fwd_backend, chosen.dkv_backend, chosen.dq_backend) == (
      "mosaic", "mosaic", "mosaic")
  chosen = _launch(monkeypatch, causal=True, bias=jnp.zeros((1, 2, 256, 256)))
  assert (chosen.fwd_backend, chosen.dkv_backend) == ("triton", "triton")


def test_mosaic_dq_backend_must_be_known():
  with pytest.raises(ValueError, match="dq_backend must be one of"):
    flash_kernel.check_launch_config(_mosaic_dq(128, dq_backend="cuda"))


def test_mosaic_dq_kernel_refuses_head_dim_256():
  """`mosaic_dq.dq` itself, called past the policy at Dp = 256."""
  x = jax.ShapeDtypeStruct((1, 128, 1, 256), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((1, 1, 128), jnp.float32)
  ints = jax.ShapeDtypeStruct((1, 1, 128), jnp.int32)
  bounds = jax.ShapeDtypeStruct((1, 1, 4), jnp.int32)
  statics = []
  jax.eval_shape(lambda q: statics.append(flash_kernel.prepare(
      fa.canonicalize(q, q, q), sm_scale=0.1, interpret=True).static), x)
  with pytest.raises(ValueError, match="dQ kernel takes padded head sizes"):
    jax.eval_shape(lambda *a: mosaic_dq.dq(statics[0], *a), x, x, x, x, rows,
                   rows, bounds, ints, ints)



@pytest.mark.parametrize("jit", [False, True])
def test_fused_bwd_probes_fma_conversion_is_the_kernels(jit):
  """`benchmarks/fused_bwd_probe.py`'s `fma_fixed_point` (the candidate it
  times in place of `mosaic_numerics.to_fixed_point`) gives the same int32,
  bit for bit, as the kernel's conversion: shares over the fixed point's
  whole range, small ones, halves (ties), the 2^9 steps of the split and
  their neighbours, and zeros, each as x * scale for random powers of two
  scale."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(
      __file__)), "..", "benchmarks"))
  import fused_bwd_probe  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  top = 2.0**mosaic_numerics.FIXED_POINT_BITS / mosaic_numerics.FIXED_POINT_MARGIN
  steps = np.arange(-64, 64) * 512.0
  y = np.concatenate([
      rng.uniform(-top, top, 100_000), rng.uniform(-600.0, 600.0, 50_000),
      np.arange(-2048, 2048) * 0.5,
      (steps[:, None] + np.array([-0.5, 0.0, 0.5])).ravel(), np.zeros(100)])
  scale = 2.0**rng.integers(-40, 40, y.size)
  x = jnp.asarray((y / scale).astype(np.float32))
  scale = jnp.asarray(scale.astype(np.float32))
  want = jax.jit(mosaic_numerics.to_fixed_point)(x, scale)
  convert = (jax.jit(fused_bwd_probe.fma_fixed_point) if jit
             else fused_bwd_probe.fma_fixed_point)
  np.testing.assert_array_equal(np.asarray(convert(x, scale)),
                                np.asarray(want))
