"""flash's fused backward on Hopper: dQ inside the Mosaic GPU dK/dV kernel.

`LaunchConfig(dkv_backend="mosaic", atomic_dq=True)` runs the backward as
one Mosaic GPU kernel (`mosaic_bwd.dkdv` with dQ: TMA reduce-adds of float32
`[64, Dp]` tiles) at padded head sizes 64 and 128. Mosaic GPU has no
interpreter, so on CPU each served structure is lowered for CUDA (the whole
Pallas -> Mosaic GPU lowering runs, shared-memory budget included) and the
program's kernels are counted; the launch policy's acceptance and refusals
are traced. On an H200, `benchmarks/fused_bwd_probe.py` checks the gradients
against the float32 reference and times the kernel.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

import flexible_attention as fa
from flexible_attention.kernels import flash as flash_kernel
from flexible_attention.kernels import gpu
from flexible_attention.kernels.flash import mosaic_bwd
from flexible_attention.kernels.flash import mosaic_common
import helpers


def _fused(head_dim: int, causal: bool = False, atomic_dq: bool = True,
           mosaic_forward: bool = True) -> flash_kernel.LaunchConfig:
  """Hopper launches with the Mosaic dK/dV kernel and, with `atomic_dq`, dQ
  in it; the Mosaic forward unless `mosaic_forward=False` (Triton's)."""
  launch = dataclasses.replace(
      flash_kernel.default_launch_config(head_dim, causal, 9.0),
      dkv=flash_kernel.mosaic_dkv_launch(head_dim), dkv_backend="mosaic",
      atomic_dq=atomic_dq)
  if not mosaic_forward:
    return launch
  return dataclasses.replace(launch, fwd=flash_kernel.mosaic_launch(head_dim),
                             fwd_backend="mosaic")


# name: (canonicalize's structure, shape and options). Lengths are not
# multiples of the tiles (padded rows and keys), Sq < Sk.
CASES = {
    "plain": ({}, dict(h=2, hkv=2)),
    "causal_window_softcap_gqa": (dict(causal=True, sliding_window=(96, 0)),
                                  dict(h=4, hkv=2, softcap=20.0)),
    "sinks": (dict(causal=True), dict(h=2, hkv=1, sinks=True)),
}


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
  """The gradient of q, k, v (and sinks) lowers with one backward kernel,
  the fused Mosaic one: no Triton dQ. With sinks the forward is Triton's
  (the Mosaic forward has none), the backward still the fused kernel."""
  call, options = CASES[name]
  options = dict(options)
  softcap, sinks = options.pop("softcap", None), options.pop("sinks", False)
  b, sq, sk, h, hkv = 2, 200, 328, options["h"], options["hkv"]
  q = jax.ShapeDtypeStruct((b, sq, h, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, sk, hkv, head_dim), jnp.bfloat16)
  sink = jax.ShapeDtypeStruct((h,), jnp.float32)
  launch = _fused(head_dim, call.get("causal", False), mosaic_forward=not sinks)

  def loss(q, k, v, sink):
    inputs = fa.canonicalize(q, k, v, sinks=sink if sinks else None, **call)
    out = flash_kernel.flash_attention(inputs, sm_scale=head_dim**-0.5,
                                       softcap=softcap, launch=launch).out
    return jnp.sum(out.astype(jnp.float32))

  text = helpers.lower_for_cuda(jax.grad(loss, (0, 1, 2, 3)), q, kv, kv, sink)
  forward = dict(mosaic=0, triton=1) if sinks else dict(mosaic=1, triton=0)
  assert _kernels(text) == dict(mosaic=forward["mosaic"] + 1,
                                triton=forward["triton"], aliased=1)


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
            **call) -> flash_kernel.LaunchConfig:
  """The launches `prepare` picks for a call on an sm_90 GPU (traced)."""
  monkeypatch.setattr(gpu, "compute_capability", lambda: 9.0)
  x = jax.ShapeDtypeStruct((1, 256, 2, head_dim), dtype)
  chosen = []
  jax.eval_shape(lambda q: chosen.append(flash_kernel.prepare(
      fa.canonicalize(q, q, q, **call), sm_scale=0.1,
      launch=launch).static.launch), x)
  return chosen[0]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_mosaic_dkv_with_atomic_dq_is_the_fused_backward(head_dim,
                                                         monkeypatch):
  launch = _fused(head_dim)
  flash_kernel.check_launch_config(launch)  # No longer refused.
  chosen = _launch(monkeypatch, launch=launch, head_dim=head_dim, causal=True)
  assert (chosen.dkv_backend, chosen.atomic_dq) == ("mosaic", True)


def test_fused_backward_is_off_by_default(monkeypatch):
  """Not bitwise reproducible and not yet measured: the default launches
  keep the split backward (dQ through Triton)."""
  chosen = _launch(monkeypatch, causal=True)
  assert (chosen.dkv_backend, chosen.atomic_dq) == ("mosaic", False)


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
     "dkv_backend='mosaic' cannot serve this call: it takes no bias, dense "
     "mask or dropout"),
    (dataclasses.replace(_fused(128), dkv=flash_kernel.Launch(32, 128, 4, 3)),
     {}, "takes dkv tiles 64 x 128"),
])
def test_fused_backward_refusals(launch, call, match, monkeypatch):
  with pytest.raises(ValueError, match=match):
    _launch(monkeypatch, launch=launch, **call)


def test_fused_dq_reason_names_the_head_sizes():
  assert mosaic_common.fused_dq_reason(64) is None
  assert mosaic_common.fused_dq_reason(128) is None
  assert "atomic_dq=False" in mosaic_common.fused_dq_reason(256)


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
