"""One process of the two-process test in test_multihost.py (not a test).

  python tests/multihost_worker.py PROCESS_ID PORT

Joins a 2-process x 4-CPU-device JAX cluster on 127.0.0.1:PORT (gloo), runs
sequence-sharded attention over a mesh spanning both processes with global
arrays, and checks this process's shards of the output and of dq/dk/dv
against the single-process float32 reference. Prints `ok MECHANISM` per
mechanism and exits non-zero on any mismatch.
"""

import os
import sys

# 4 devices per process, after the compile flags test_multihost.py passes.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4")

# pylint: disable=g-import-not-at-top,wrong-import-position
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flexible_attention as fa
from flexible_attention.sharding import distributed

TOLERANCE = 2e-5  # float32, relative to the largest reference value.


def main(process_id: int, port: int):
  distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  batch, seq, heads, kv_heads, dim = 2, 64, 4, 2, 8
  rng = np.random.default_rng(0)  # The same inputs in both processes.
  q = rng.standard_normal((batch, seq, heads, dim)).astype(np.float32)
  k = rng.standard_normal((batch, seq, kv_heads, dim)).astype(np.float32)
  v = rng.standard_normal((batch, seq, kv_heads, dim)).astype(np.float32)
  ct = rng.standard_normal((batch, seq, heads, dim)).astype(np.float32)
  kv_lengths = np.array([seq, 40], np.int32)

  def reference(q, k, v):
    inputs = fa.canonicalize(q, k, v, causal=True, kv_lengths=kv_lengths)
    return fa.reference_attention(inputs.query, inputs.key, inputs.value,
                                  None, inputs.visibility,
                                  sm_scale=dim**-0.5).out

  def out_and_grads(f):
    """One program: `f`'s output and its dq, dk, dv for the cotangent."""
    def run(q, k, v, ct):
      out, vjp = jax.vjp(f, q, k, v)
      return (out,) + vjp(ct)
    return jax.jit(run)

  ref_out, *ref_grads = (np.asarray(x) for x in out_and_grads(reference)(
      q, k, v, ct))

  # The ring spans all 8 devices, so K/V cross between the processes.
  mesh = fa.make_mesh((1, 1, 1, 8))
  sharding = NamedSharding(mesh, P("dp", "sp", None, None))
  to_global = lambda x: jax.make_array_from_callback(
      x.shape, sharding, lambda index: x[index])
  args = [to_global(x) for x in (q, k, v)]
  ct_global = to_global(ct)
  for mechanism in ("ring", "blockwise"):
    def forward(q, k, v, mechanism=mechanism):
      return fa.create_attention(
          mechanism, num_heads=heads, head_dim=dim, num_kv_heads=kv_heads,
          mesh=mesh, block_sizes=fa.BlockSizes(block_q=8, block_k=8))(
              q, k, v, causal=True,
              kv_lengths=jnp.asarray(kv_lengths)).attention_outputs
    apply = hk.without_apply_rng(hk.transform(forward)).apply
    out, *grads = out_and_grads(lambda q, k, v: apply({}, q, k, v))(
        *args, ct_global)
    for got, want in [(out, ref_out)] + list(zip(grads, ref_grads)):
      scale = float(np.max(np.abs(want)))
      for shard in got.addressable_shards:
        error = float(np.max(np.abs(np.asarray(shard.data) -
                                    want[shard.index]))) / scale
        if not error <= TOLERANCE:
          print(f"mismatch {mechanism}: {error:.2e}", flush=True)
          sys.exit(1)
    print(f"ok {mechanism}", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]))
