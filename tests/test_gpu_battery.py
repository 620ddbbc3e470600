"""GPU battery: odd shapes x head sizes x features, compiled on a real GPU.

Skipped unless a GPU is present. For each head size D in {59, 64, 111, 128,
256}, five grouped cases (few compiles: one case combines several
features) run in bfloat16 and float16 through `fa.create_attention` inside
`hk.transform` (`helpers.run_mechanism`: jitted forward + backward), for
`flash`, `cudnn` and `auto`; the output and dq / dk / dv are checked against
the float32 reference (`helpers.reference_vjp`, the same dropout):

- `bias`: B = 2, Sq = 113, Sk = 211, H = Hkv = 4, a `[B, H, Sq, Sk]` bias
  (the launch that once exceeded an H200's shared memory at D = 59 / 64);
- `mask_segments_softcap_gqa`: Sq = 97, Sk = 161, H = 8, Hkv = 2, a dense
  `[B, 1, Sq, Sk]` mask with fully masked rows, a `(q_ids, kv_ids)`
  segment pair, soft cap 20;
- `decode_dropout_window_lengths`: Sq = 1, Sk = 203, H = 4, Hkv = 2,
  causal, window 64, kv lengths (one row sees no key), dropout 0.1;
- `even_bias_lengths_gqa`: Sq = 96, Sk = 224, H = 8, Hkv = 2, a
  `[1, H, Sq, Sk]` bias and kv lengths: a call cuDNN serves when D allows.
- `long_causal_window_softcap`: Sq = 200, Sk = 333, H = Hkv = 4, causal,
  window 100, soft cap 30: on Hopper at D = 64, 128, 256 the Mosaic GPU
  forward and dK/dV kernels serve it (structure only, Sq >= 128).
- `fused_documents_dropout_gqa` (D = 111 and 128 only): Sq = Sk =
  `launch.FUSED_DQ_MIN_KV_LEN` + 37 (4133), H = 4, Hkv = 2, causal, segment
  ids, dropout 0.1: on Hopper the default launches run the fused backward
  (dQ inside the Mosaic dK/dV kernel, its lagged step: padded D = 128 from
  `launch.FUSED_DQ_MIN_KV_LEN` keys), which the shorter cases never reach.

Lengths are multiples of no tile (except `even_bias_lengths_gqa`'s, for
cuDNN). A refusal (`NotImplementedError`) is an acceptable outcome only for
`cudnn`, and only where its capabilities say so (a feature its record
lacks, D not a multiple of 8, odd lengths); `flash` and `auto` must compute
every case, and
`cudnn` must compute `even_bias_lengths_gqa` at D = 64, 128, 256. `auto`
runs every case in bfloat16 and the cuDNN case in float16 too (elsewhere it
picks `flash`, which the battery already compiled in float16).

Tolerances (relative to the largest reference magnitude,
`helpers.TOLERANCES["gpu"]`): bfloat16 1.5e-2, float16 2e-3.

Run on the GPU machine (about 90 jitted forward + backward compiles):
  python -m pytest -q tests/test_gpu_battery.py
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.kernels.flash import launch as flash_launch

import helpers

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="the GPU battery needs a GPU")

HEAD_DIMS = (59, 64, 111, 128, 256)
DTYPES = (jnp.bfloat16, jnp.float16)
MECHANISMS = ("flash", "cudnn", "auto")


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  features: frozenset[str]  # As `fa.capabilities` names them.
  causal: bool = False
  window: int | None = None
  softcap: float | None = None
  dropout: float = 0.0
  head_dims: tuple[int, ...] = HEAD_DIMS  # Those it runs at.


_FUSED_LEN = flash_launch.FUSED_DQ_MIN_KV_LEN + 37  # The fused backward's.
CASES = (
    Case("bias", 2, 113, 211, 4, 4, frozenset({"bias"})),
    Case("mask_segments_softcap_gqa", 2, 97, 161, 8, 2,
         frozenset({"mask", "segments", "softcap", "gqa"}), softcap=20.0),
    Case("decode_dropout_window_lengths", 3, 1, 203, 4, 2,
         frozenset({"causal", "window", "kv_lengths", "dropout", "gqa"}),
         causal=True, window=64, dropout=0.1),
    Case("even_bias_lengths_gqa", 2, 96, 224, 8, 2,
         frozenset({"bias", "kv_lengths", "gqa"})),
    Case("long_causal_window_softcap", 1, 200, 333, 4, 4,
         frozenset({"causal", "window", "softcap"}), causal=True, window=100,
         softcap=30.0),
    Case("fused_documents_dropout_gqa", 1, _FUSED_LEN, _FUSED_LEN, 4, 2,
         frozenset({"causal", "segments", "dropout", "gqa"}), causal=True,
         dropout=0.1, head_dims=(111, 128)),
)


def _inputs(case: Case, head_dim: int, dtype):
  """`(q, k, v, ct, bias, call)` of a case; `call` holds the arrays and
  static arguments other than the bias."""
  rng = helpers.rng_for("gpu-battery", case.name, head_dim,
                        np.dtype(dtype).name)
  q, k, v = helpers.random_qkv(rng, case.batch, case.q_len, case.kv_len,
                               case.heads, case.kv_heads, head_dim,
                               dtype=dtype)
  ct = helpers.random_array(rng, q.shape, dtype)
  b, sq, sk = case.batch, case.q_len, case.kv_len
  call, bias = {}, None
  if case.causal:
    call["causal"] = True
  if "bias" in case.features:
    heads = case.heads
    shape = (b, heads, sq, sk) if case.name == "bias" else (1, heads, sq, sk)
    bias = helpers.random_array(rng, shape, dtype)
  if "mask" in case.features:
    mask = rng.random((b, 1, sq, sk)) < 0.6
    mask[0, :, ::7] = False  # Fully masked rows.
    call["mask"] = jnp.asarray(mask)
  if "segments" in case.features:
    q_ids = np.sort(rng.integers(0, 3, (b, sq)), axis=1)
    kv_ids = np.sort(rng.integers(0, 3, (b, sk)), axis=1)
    call["segment_ids"] = (jnp.asarray(q_ids, jnp.int32),
                           jnp.asarray(kv_ids, jnp.int32))
  if "kv_lengths" in case.features:
    lengths = [sk, sk - 33, 1][:b]  # Sq = 1: the last row sees no key.
    call["kv_lengths"] = jnp.asarray(lengths, jnp.int32)
  return q, k, v, ct, bias, call


def _cudnn_may_refuse(case: Case, head_dim: int) -> bool:
  """Whether cuDNN's capabilities (record and documented shape limits)
  say it refuses the case."""
  caps = fa.capabilities("cudnn", "gpu")
  lacks = any(not caps.supports(f) for f in case.features)
  return (lacks or head_dim % 8 != 0 or case.q_len % 2 or case.kv_len % 2 or
          (case.q_len != case.kv_len and (case.causal or case.window)))


def _runs(case: Case, dtype):
  for mechanism in MECHANISMS:
    if (mechanism == "auto" and dtype != jnp.bfloat16 and
        case.name != "even_bias_lengths_gqa"):
      continue
    yield mechanism


@pytest.mark.parametrize("case, head_dim", [
    pytest.param(c, d, id=f"{d}-{c.name}") for c in CASES for d in HEAD_DIMS
    if d in c.head_dims])
def test_gpu_battery(case, head_dim):
  failures = []
  for dtype in DTYPES:
    q, k, v, ct, bias, call = _inputs(case, head_dim, dtype)
    apply_rng = jax.random.PRNGKey(11)
    dropout = None
    options = {}
    if case.softcap is not None:
      options["logits_soft_cap"] = case.softcap
    if case.window is not None:
      options["sliding_window"] = case.window
    if case.dropout:
      options["dropout_rate"] = case.dropout
      call["deterministic"] = False
      dropout = helpers.reference_dropout(apply_rng, case.dropout)
    expected = helpers.reference_vjp(
        q, k, v, ct, bias=bias, call=call, sliding_window=case.window,
        logits_soft_cap=case.softcap, dropout=dropout)
    mech_call = dict(call) if bias is None else dict(call, bias=bias)
    for mechanism in _runs(case, dtype):
      what = f"{mechanism} {case.name} D={head_dim} {np.dtype(dtype).name}"
      try:
        result = helpers.run_mechanism(mechanism, q, k, v, ct,
                                       call=mech_call, options=options,
                                       rng=apply_rng)
      except NotImplementedError as e:
        if mechanism == "cudnn" and _cudnn_may_refuse(case, head_dim):
          continue
        failures.append(f"{what}: refused: {e}")
        continue
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f"{what}: {type(e).__name__}: {str(e)[:400]}")
        continue
      checks = [("out", result.out, expected.out)] + list(
          zip(("dq", "dk", "dv"), result.grads[:3], expected.grads[:3]))
      for name, got, want in checks:
        try:
          helpers.assert_close(got, want, dtype, f"{what}: {name}")
        except AssertionError as e:
          failures.append(str(e))
  assert not failures, "\n".join(failures)


def test_cudnn_computes_the_case_it_serves():
  """The battery's refusal rule is not vacuous: cuDNN serves the even case
  at D = 64, 128, 256 (the assertions are in `test_gpu_battery`)."""
  case = CASES[3]
  assert case.name == "even_bias_lengths_gqa"
  for head_dim in (64, 128, 256):
    assert not _cudnn_may_refuse(case, head_dim)


def test_auto_serves_flash_and_reproduces_gradients_under_deterministic_ops():
  """Under `--xla_gpu_deterministic_ops=true` (in a process of its own:
  XLA reads the flag when the backend starts) `auto` picks `flash`, and
  `auto`'s and `cudnn`'s gradients are correct and bitwise reproducible
  (`tests/deterministic_gpu_check.py`)."""
  here = os.path.dirname(os.path.abspath(__file__))
  flags = os.environ.get("XLA_FLAGS", "")
  env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_gpu_deterministic_ops=true",
             PYTHONPATH=os.pathsep.join(
                 [here, os.path.dirname(here), os.environ.get("PYTHONPATH",
                                                              "")]))
  done = subprocess.run(
      [sys.executable, os.path.join(here, "deterministic_gpu_check.py")],
      env=env, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
  assert '"served": "flash"' in done.stdout
