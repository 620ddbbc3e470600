"""Reproducible gradients under XLA's deterministic GPU ops (run by a test).

XLA reads `XLA_FLAGS` once, when its GPU backend starts, so this runs in a
process of its own: `tests/test_gpu_battery.py::
test_auto_serves_flash_and_reproduces_gradients_under_deterministic_ops`
starts it with `--xla_gpu_deterministic_ops=true`. For a plain bf16 causal
call (B = 2, S = 1024, H = 8, Hkv = 2, D = 128) it checks that:

- `auto` serves it with `flash` (`tuning.xla_deterministic_ops`);
- `auto`'s and `cudnn`'s forward+backward, jitted, match the float32
  reference (bfloat16's GPU tolerance) and give bitwise equal dQ, dK and
  dV over two calls (cuDNN's deterministic backward under this option).

Prints one JSON line and exits non-zero on the first failed check.
"""

from __future__ import annotations

import json
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import flexible_attention as fa
from flexible_attention.mechanisms import tuning

import helpers


def main():
  assert jax.default_backend() == "gpu", jax.default_backend()
  assert tuning.xla_deterministic_ops(), "run with XLA's deterministic ops"
  rng = helpers.rng_for("deterministic-gpu-check")
  q, k, v = helpers.random_qkv(rng, 2, 1024, 1024, 8, 2, 128,
                               dtype=jnp.bfloat16)
  ct = helpers.random_array(rng, q.shape, jnp.bfloat16)
  call = {"causal": True}
  expected = helpers.reference_vjp(q, k, v, ct, call=call)
  report = {}
  for mechanism in ("auto", "cudnn"):
    served = []

    def forward(q, k, v, mechanism=mechanism, served=served):
      attention = fa.create_attention(mechanism, num_heads=8, head_dim=128,
                                      num_kv_heads=2)
      out = attention(q, k, v, **call).attention_outputs
      served.append(getattr(attention, "selected_mechanism", mechanism))
      return out

    apply = hk.without_apply_rng(hk.transform(forward)).apply

    @jax.jit
    def fwd_bwd(q, k, v):
      out, vjp = jax.vjp(lambda q, k, v: apply({}, q, k, v), q, k, v)
      return (out, *vjp(ct))

    first, second = fwd_bwd(q, k, v), fwd_bwd(q, k, v)
    for name, got, want in zip(("out", "dq", "dk", "dv"), first,
                               (expected.out, *expected.grads[:3])):
      helpers.assert_close(got, want, jnp.bfloat16, f"{mechanism} {name}")
    bitwise = {name: bool(np.array_equal(np.asarray(a), np.asarray(b)))
               for name, a, b in zip(("dq", "dk", "dv"), first[1:],
                                     second[1:])}
    report[mechanism] = dict(served=served[0], bitwise_run_to_run=bitwise)
  print(json.dumps(report), flush=True)
  assert report["auto"]["served"] == "flash", report
  for mechanism, row in report.items():
    assert all(row["bitwise_run_to_run"].values()), (mechanism, row)


if __name__ == "__main__":
  sys.exit(main())
