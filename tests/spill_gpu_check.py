"""ptxas' register report of the fused backward's kernel (run by a test).

Mosaic GPU prints ptxas' report of each kernel it compiles when
`MOSAIC_GPU_DUMP_PTXAS=1` is set before it starts, so this runs in a
process of its own: `tests/test_flash_kernel.py::
test_hopper_fused_backward_does_not_spill` starts it with that variable and
reads the report from its output. It compiles and runs, once each, the
fused backward (dQ inside the Mosaic dK/dV kernel, in float32 in any order
and in int32 fixed point) of a bf16 causal call at padded head sizes 64 and
128 (B = 1, S = 1024, H = 4).
"""

from __future__ import annotations

import itertools
import sys

import jax
import jax.numpy as jnp

import flexible_attention as fa
from flexible_attention.kernels import flash as flash_kernel


def main():
  assert jax.default_backend() == "gpu", jax.default_backend()
  for d, deterministic in itertools.product((64, 128), (False, True)):
    launch = flash_kernel.hopper_launch_config(
        d, True, dq="fused", deterministic_dq=deterministic)
    q = jax.random.normal(jax.random.key(d), (1, 1024, 4, d), jnp.bfloat16)

    def loss(q, k, v, launch=launch):
      inputs = fa.canonicalize(q, k, v, causal=True)
      out = flash_kernel.flash_attention(inputs, sm_scale=d**-0.5,
                                         launch=launch)[0]
      return jnp.sum(out.astype(jnp.float32))

    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, q, q)
    jax.block_until_ready(grads)
    print(f"compiled and ran the fused backward at D = {d}, "
          f"deterministic_dq={deterministic}", flush=True)


if __name__ == "__main__":
  sys.exit(main())
