"""flash with float32 inputs on a GPU: forward + backward against the float32
reference at head sizes 64, 128, 256 (causal and not), with the default
launches (which shrink to the shared memory of 4-byte tiles:
`launch.fit_shared_memory`). Prints one JSON line per case.

  python3 benchmarks/float32_probe.py
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

import flexible_attention as fa
from flexible_attention.kernels.flash import interface
from flexible_attention.kernels.flash import launch as launch_lib

INTERPRET = jax.default_backend() != "gpu"  # Off a GPU: a smoke run.


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def main():
  print(json.dumps({"device": jax.devices()[0].device_kind,
                    "jax": jax.__version__}))
  rng = np.random.default_rng(0)
  for d in ((16,) if INTERPRET else (64, 128, 256)):
    for causal in (False, True):
      b, s, h = (1, 40, 2) if INTERPRET else (2, 384, 4)
      q, k, v, ct = (jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32)
                     for _ in range(4))

      def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * ct)

      flash = lambda q, k, v: interface.flash_attention(
          fa.canonicalize(q, k, v, causal=causal), sm_scale=d**-0.5,
          interpret=INTERPRET).out
      ref = lambda q, k, v: fa.reference_attention(
          *(lambda r: (r.query, r.key, r.value, None, r.visibility))(
              fa.canonicalize(q, k, v, causal=causal)), sm_scale=d**-0.5).out
      row = dict(D=d, causal=causal)
      try:
        got = jax.jit(jax.value_and_grad(loss(flash), (0, 1, 2)))(q, k, v)
        want = jax.jit(jax.value_and_grad(loss(ref), (0, 1, 2)))(q, k, v)
        row.update(out=_rel(jax.jit(flash)(q, k, v), jax.jit(ref)(q, k, v)),
                   **{n: _rel(g, w) for n, g, w in
                      zip(("dq", "dk", "dv"), got[1], want[1])})
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = str(e)[:200]
      launch = launch_lib.choose_launch(
          dtype=jnp.float32, head_dim=d, value_dim=d, q_len=s, kv_len=s,
          causal=causal, bias=False, mask=False, precision=None,
          interpret=False, block_sizes=None, launch=None,
          float32_results=False, groups=1)
      row["launch"] = str(launch)
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
