"""The Triton IR that Pallas hands to XLA for the `flash` kernels.

Runs anywhere, no GPU needed (see benchmarks/flash_notes.md):

  python3 benchmarks/flash_ttir.py --head_dims=64,128,256

Lowers the forward and backward passes of one cell (bf16, B = 1, S = 4096,
H * D = 2048, the default launches) for CUDA on this machine, reads each
kernel's Triton IR out of the lowered program (the `__gpu$xla.gpu.triton`
custom calls carry it as MLIR bytecode) and reports per kernel: warps,
stages, the matmuls (`tt.dot`) in its inner loop body with their operand
shapes, the tile transposes feeding them (`tt.trans`), the elementwise
functions it calls from libdevice, and the memory semantics of its atomics.
This is the program Triton receives; what Triton's Hopper passes make of it
(`wgmma`, software pipelining, registers) is only visible on the GPU.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import re

from absl import app
from absl import flags
import jax
from jax._src.lib.mlir import ir  # pylint: disable=g-direct-tensorflow-import
from jax._src.lib.triton import dialect as tt_dialect  # pylint: disable=g-direct-tensorflow-import
import jax.numpy as jnp

import flexible_attention as fa
from flexible_attention.kernels import flash_triton as ft

_HEAD_DIMS = flags.DEFINE_list("head_dims", ["128"], "Head sizes.")
_CAUSAL = flags.DEFINE_bool("causal", False, "Causal cells.")
_SEQ = flags.DEFINE_integer("seq", 4096, "Sequence length.")
_ATOMIC = flags.DEFINE_bool("atomic_dq", False,
                            "The one-kernel backward (`atomic_dq`).")
_DEVICE_KIND = flags.DEFINE_string(
    "device_kind", "NVIDIA H200",
    "The GPU to lower for (jax >= 0.11 asks for one when none is attached).")


def _ops(op, name):
  """Every op called `name` nested in `op`."""
  found = []

  def walk(o):
    o = o.operation
    if o.name == name:
      found.append(o)
    for region in o.regions:
      for block in region.blocks:
        for inner in block.operations:
          walk(inner)

  walk(op)
  return found


def _triton_calls(lowered):
  """`(backend_config, Triton module)` of every Triton custom call."""
  calls = []
  for op in _ops(lowered.compiler_ir("stablehlo").operation,
                 "stablehlo.custom_call"):
    if "mhlo.backend_config" not in op.attributes:
      continue
    config = ir.DictAttr(op.attributes["mhlo.backend_config"])
    if "ir" not in config:
      continue
    context = ir.Context()
    tt_dialect.register_dialect(context)
    with context:
      module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
    calls.append((config, module))
  return calls


def _gpu_target():
  """A context naming the GPU to lower for: jax >= 0.11 reads it from an
  abstract mesh's device when no GPU is attached; earlier versions need
  none."""
  device = getattr(jax.sharding, "AbstractDevice", None)
  if device is None or jax.default_backend() == "gpu":
    return contextlib.nullcontext()
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), abstract_device=device(
          device_kind=_DEVICE_KIND.value, num_cores=None, platform="gpu"))
  return jax.sharding.use_abstract_mesh(mesh)


def _int(attr) -> int:
  return ir.IntegerAttr(attr).value


def _summary(config, module) -> dict:
  loops = _ops(module.operation, "scf.for")
  body = max(loops, key=lambda l: len(_ops(l, "tt.dot")), default=None)
  dots = [] if body is None else _ops(body, "tt.dot")
  shape = lambda value: re.sub(r"tensor<|>", "", str(value.type))
  text = str(module)
  return dict(
      kernel=ir.StringAttr(config["name"]).value,
      warps=_int(config["num_warps"]), stages=_int(config["num_stages"]),
      loops=len(loops),
      dots_per_tile=[f"{shape(d.operands[0])} @ {shape(d.operands[1])}"
                     for d in dots],
      transposes=0 if body is None else len(_ops(body, "tt.trans")),
      libdevice=dict(collections.Counter(
          re.findall(r'symbol = "(__nv_\w+)"', text))),
      atomics=sorted(set(re.findall(r"tt\.atomic_rmw (\w+), (\w+), (\w+)",
                                    text))))


def main(argv):
  del argv
  for d in map(int, _HEAD_DIMS.value):
    x = jax.ShapeDtypeStruct((1, _SEQ.value, 2048 // d, d), jnp.bfloat16)
    launch = dataclasses.replace(ft.default_launch_config(d, _CAUSAL.value),
                                 atomic_dq=_ATOMIC.value)

    def fwd_bwd(q, k, v, dout, launch=launch, d=d):
      call = ft.prepare(fa.canonicalize(q, k, v, causal=_CAUSAL.value),
                        sm_scale=d**-0.5, launch=launch)
      out, lse = ft.forward_pass(call)[:2]
      return ft.backward_pass(call, out, lse, dout)[:3]

    with _gpu_target():
      lowered = jax.jit(fwd_bwd).trace(x, x, x, x).lower(
          lowering_platforms=("cuda",))
    print(f"\nD = {d}, causal = {_CAUSAL.value}, atomic_dq = "
          f"{_ATOMIC.value}: {launch}")
    print("| kernel | warps | stages | loops | matmuls in the inner loop "
          "(bf16 tiles) | tile transposes | libdevice calls | atomics |")
    print("|---|---|---|---|---|---|---|---|")
    for config, module in _triton_calls(lowered):
      s = _summary(config, module)
      print(f"| {s['kernel']} | {s['warps']} | {s['stages']} | {s['loops']} "
            f"| {len(s['dots_per_tile'])}: {'; '.join(s['dots_per_tile'])} "
            f"| {s['transposes']} | {s['libdevice']} | {s['atomics']} |")


if __name__ == "__main__":
  app.run(main)
