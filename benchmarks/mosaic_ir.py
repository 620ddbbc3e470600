"""Digests of the Mosaic GPU kernels `flash` lowers, without debug info.

Two trees whose digests match build the same Mosaic GPU kernels (the same
IR before CUDA's compiler), so what a GPU measured on one (the battery, a
timing) holds for the other: the check after a refactor that should not
change the default kernels. Any machine (the lowering runs on a CPU):

  python3 benchmarks/mosaic_ir.py > new.txt
  git worktree add /tmp/old <commit>
  (cd /tmp/old && PYTHONPATH=. python3 benchmarks/mosaic_ir.py) > old.txt
  diff old.txt new.txt

One line per call of `CALLS` (the forward and backward's gradient of q,
k, v through `hopper_launch_config`'s launches, B = 2, S = 384, H = 4,
Hkv = 2, bf16): its name and a digest per Mosaic GPU kernel, in the order
the program calls them. Triton kernels are not covered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

from absl import app
import jax
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib.mlir import ir
import jax.numpy as jnp
import numpy as np

import flexible_attention as fa
from flexible_attention.core import dropout as dropout_lib
from flexible_attention.kernels import flash as flash_kernel

import deviceless  # pylint: disable=g-bad-import-order

try:  # Parses the kernels' own dialect where this jaxlib has it.
  from jax._src.lib import mosaic_gpu_dialect  # pylint: disable=g-import-not-at-top
except ImportError:
  mosaic_gpu_dialect = None

# name: (padded head size, dQ path of `hopper_launch_config`, call options).
CALLS = {
    "d64_causal": (64, "mosaic", dict(causal=True)),
    "d128_full_fused": (128, "fused", {}),
    "d128_causal_fused": (128, "fused", dict(causal=True)),
    "d128_segments_dropout": (128, "mosaic", dict(segments=True, dropout=0.1)),
    "d128_alibi_fused": (128, "fused", dict(causal=True, alibi=True)),
    # ... and the slopes' gradient (the kernel's per-head sums).
    "d128_alibi_slopes_fused": (128, "fused", dict(causal=True, alibi=True,
                                                   slopes_grad=True)),
}


def kernel_texts(fn, *args) -> list[str]:
  """The Mosaic GPU kernels of `fn`'s program lowered for CUDA
  (`helpers.lower_for_cuda`), as MLIR text without locations or dump
  names."""
  texts = []
  for data in deviceless.mosaic_modules(deviceless.lower_for_cuda(fn, *args)):
    with jax_mlir.make_ir_context() as context:
      context.allow_unregistered_dialects = True
      if mosaic_gpu_dialect is not None:
        mosaic_gpu_dialect.register_dialect(context)
      kernel = ir.Module.parse(data).operation.get_asm(
          enable_debug_info=False)
    # The dump name counts the kernels lowered in the process.
    texts.append(re.sub(r'dump_basename = "[^"]*"', "", kernel))
  return texts


def call_digests(name: str) -> list[str]:
  """Digests of the Mosaic GPU kernels of `CALLS[name]`'s gradient."""
  head_dim, dq, options = CALLS[name]
  options = dict(options)
  causal = options.pop("causal", False)
  launch = flash_kernel.hopper_launch_config(
      head_dim, causal, dq="triton" if dq == "fused" else dq)
  launch = dataclasses.replace(launch, atomic_dq=dq == "fused")
  call = dict(causal=causal)
  if options.pop("segments", False):
    ids = jnp.asarray(np.sort(np.random.default_rng(0).integers(
        0, 3, (2, 384)), -1), jnp.int32)
    call["segment_ids"] = (ids, ids)
  slopes = jnp.asarray(fa.alibi_slopes(4))
  if options.pop("alibi", False):
    call.update(score_mod=fa.alibi_score_mod)
  argnums = (0, 1, 2, 3) if options.pop("slopes_grad", False) else (0, 1, 2)
  rate = options.pop("dropout", None)
  drop = rate and dropout_lib.make_dropout(jax.random.key(0), rate)
  assert not options, options

  def loss(q, k, v, slopes):
    mods = dict(mod_args=(slopes,)) if "score_mod" in call else {}
    out = flash_kernel.flash_attention(
        fa.canonicalize(q, k, v, **call, **mods), drop, sm_scale=0.1,
        launch=launch).out
    return jnp.sum(out.astype(jnp.float32))

  q = jax.ShapeDtypeStruct((2, 384, 4, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 384, 2, head_dim), jnp.bfloat16)
  return [hashlib.sha256(text.encode()).hexdigest()[:16]
          for text in kernel_texts(jax.grad(loss, argnums), q, kv, kv,
                                   slopes)]


def main(argv):
  del argv
  print(f"jax {jax.__version__}")
  for name in CALLS:
    print(name, " ".join(call_digests(name)))


if __name__ == "__main__":
  app.run(main)
