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
This is the program Triton receives.

With `--compile` (needs the standalone `triton` package, not a GPU) each
kernel's IR is also compiled by that Triton for `--arch` (sm_90 by
default) with the kernel's own warps and stages, after Triton's `make_ttir`
passes (which XLA's Triton pipeline runs too), and the report adds what the
Triton IR cannot show: registers per thread, spilled bytes, shared memory,
and instruction counts of the PTX (`wgmma` vs `mma.sync`, atomics, local
memory traffic) and, through `cuobjdump`, of the machine code (`HGMMA` vs
`HMMA`). XLA compiles the same IR with its own copy of Triton, so the
counts describe what Triton makes of these kernels, not byte for byte the
binary XLA runs; `--write_dir` keeps the IR, PTX and SASS of every kernel.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile

from absl import app
from absl import flags
import jax
from jax._src.lib.mlir import ir  # pylint: disable=g-direct-tensorflow-import
from jax._src.lib.triton import dialect as tt_dialect  # pylint: disable=g-direct-tensorflow-import
import jax.numpy as jnp

import flexible_attention as fa
from flexible_attention.kernels import flash as ft

_HEAD_DIMS = flags.DEFINE_list("head_dims", ["128"], "Head sizes.")
_CAUSAL = flags.DEFINE_bool("causal", False, "Causal cells.")
_SEQ = flags.DEFINE_integer("seq", 4096, "Sequence length.")
_ATOMIC = flags.DEFINE_bool("atomic_dq", False,
                            "The one-kernel backward (`atomic_dq`).")
_COMPILE = flags.DEFINE_bool(
    "compile", False, "Also compile each kernel with the standalone Triton "
    "(no GPU needed) and report registers, spills and instructions.")
_WRITE_DIR = flags.DEFINE_string(
    "write_dir", None, "Keep each kernel's .ttir (and with --compile its "
    ".ttgir, .ptx and .sass) and a summary.json here.")
_RUN = flags.DEFINE_bool(
    "run", False, "Also run each cell's forward and backward once on the "
    "attached GPU, so that a profiler wrapped around this command (ncu) "
    "reads the binaries XLA itself built.")
_ARCH = flags.DEFINE_integer(
    "arch", 90, "Compute capability to compile for with --compile.")
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


_PTX_COUNTS = {
    "wgmma": r"\bwgmma\.mma_async",
    "wgmma_wait": r"\bwgmma\.wait_group",
    "mma_sync": r"\bmma\.sync",
    "ldmatrix": r"\bldmatrix",
    "cp_async": r"\bcp\.async\.(?:ca|cg)",
    "cp_async_bulk": r"\bcp\.async\.bulk",
    "atom_red": r"\b(?:atom|red)\.global",
    "local_mem": r"\b(?:ld|st)\.local",
    "ex2": r"\bex2\.approx",
    "bar_sync": r"\bbar\.sync|\bbarrier\.sync",
}
_SASS_COUNTS = {
    "HGMMA": r"\bHGMMA\.", "HMMA": r"\bHMMA\.", "MUFU_EX2": r"MUFU\.EX2",
    "RED_ATOM": r"\b(?:RED|ATOM|ATOMG)\.", "LDL_STL": r"\b(?:LDL|STL)\b",
}


def _count(patterns, text):
  return {k: len(re.findall(p, text)) for k, p in patterns.items()}


def _cuobjdump():
  """cuobjdump from the PATH, else the copy Triton's wheel carries."""
  import triton  # pylint: disable=g-import-not-at-top
  bundled = os.path.join(os.path.dirname(triton.__file__), "backends",
                         "nvidia", "bin", "cuobjdump")
  return shutil.which("cuobjdump") or (
      bundled if os.path.exists(bundled) else None)


def _make_ttir(ttir: str, target, scratch: str) -> str:
  """Runs Triton's `make_ttir` stage (canonicalize, combine, CSE, ...) on
  the IR Pallas emits, as XLA's Triton pipeline does first.

  `triton.compile` treats a `.ttir` file as already past that stage, and
  without it every `acc + dot(a, b)` stays a matmul into zeros plus an add
  (no accumulating `wgmma`), which is not what XLA compiles.
  """
  from triton._C.libtriton import ir as triton_ir  # pylint: disable=g-import-not-at-top
  from triton.backends import nvidia  # pylint: disable=g-import-not-at-top
  with open(scratch, "w") as f:
    f.write(ttir)
  backend = nvidia.compiler.CUDABackend(target)
  context = triton_ir.context()
  triton_ir.load_dialects(context)
  backend.load_dialects(context)
  module = triton_ir.parse_mlir_module(scratch, context)
  module.context = context
  backend.make_ttir(module, {}, None, target.arch)
  return str(module)


def _compile(config, ttir: str, write_dir):
  """Compiles one kernel's Triton IR with the standalone Triton; the stats.

  Needs no GPU: Triton's wheel carries ptxas and cuobjdump, and registers,
  stack (spills) and shared memory are read off the cubin.
  """
  import triton  # pylint: disable=g-import-not-at-top
  from triton.backends import compiler  # pylint: disable=g-import-not-at-top
  name = ir.StringAttr(config["name"]).value
  target = compiler.GPUTarget("cuda", _ARCH.value, 32)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f"{name}.ttir")
    with open(path, "w") as f:
      f.write(_make_ttir(ttir, target, os.path.join(tmp, "pallas.ttir")))
    kernel = triton.compile(path, target=target, options=dict(
        num_warps=_int(config["num_warps"]),
        num_stages=_int(config["num_stages"])))
    cubin = os.path.join(tmp, f"{name}.cubin")
    with open(cubin, "wb") as f:
      f.write(kernel.asm["cubin"])
    tool = _cuobjdump()
    if tool is None:
      raise RuntimeError("--compile reads registers and SASS with cuobjdump: "
                         "none on the PATH nor in Triton's wheel.")
    run = lambda *a: subprocess.run([tool, *a, cubin], capture_output=True,
                                    text=True, check=True).stdout
    sass, usage = run("--dump-sass"), run("--dump-resource-usage")
    if write_dir:
      for ext, text in (("ttgir", kernel.asm["ttgir"]),
                        ("ptx", kernel.asm["ptx"]), ("sass", sass)):
        with open(os.path.join(write_dir, f"{name}.{ext}"), "w") as f:
          f.write(text)
  resources = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
  return dict(triton=triton.__version__, arch=f"sm_{_ARCH.value}",
              resources={k: int(v) for k, v in resources.items()},
              shared_bytes=kernel.metadata.shared,
              ptx=_count(_PTX_COUNTS, kernel.asm["ptx"]),
              sass=_count(_SASS_COUNTS, sass))


def main(argv):
  del argv
  summaries = []
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
    if _RUN.value:
      keys = jax.random.split(jax.random.key(0), 4)
      args = [jax.random.normal(key, x.shape, x.dtype) for key in keys]
      jax.block_until_ready(jax.jit(fwd_bwd)(*args))
    print(f"\nD = {d}, causal = {_CAUSAL.value}, atomic_dq = "
          f"{_ATOMIC.value}: {launch}")
    print("| kernel | warps | stages | loops | matmuls in the inner loop "
          "(bf16 tiles) | tile transposes | libdevice calls | atomics |")
    print("|---|---|---|---|---|---|---|---|")
    compiled = []
    for config, module in _triton_calls(lowered):
      s = _summary(config, module)
      print(f"| {s['kernel']} | {s['warps']} | {s['stages']} | {s['loops']} "
            f"| {len(s['dots_per_tile'])}: {'; '.join(s['dots_per_tile'])} "
            f"| {s['transposes']} | {s['libdevice']} | {s['atomics']} |")
      ttir = module.operation.get_asm(enable_debug_info=False)
      if _WRITE_DIR.value:
        os.makedirs(_WRITE_DIR.value, exist_ok=True)
        with open(os.path.join(_WRITE_DIR.value, f"{s['kernel']}.ttir"),
                  "w") as f:
          f.write(ttir)
      if _COMPILE.value:
        compiled.append(dict(s, d=d, causal=_CAUSAL.value,
                             **_compile(config, ttir, _WRITE_DIR.value)))
    if compiled:
      print(f"\nCompiled by Triton {compiled[0]['triton']} for "
            f"{compiled[0]['arch']}:")
      print("| kernel | resources per thread (bytes) | shared bytes | PTX "
            "counts | SASS counts |")
      print("|---|---|---|---|---|")
      for c in compiled:
        print(f"| {c['kernel']} | {c['resources']} | {c['shared_bytes']} | "
              f"{c['ptx']} | {c['sass']} |")
      summaries.extend(compiled)
  if summaries and _WRITE_DIR.value:
    with open(os.path.join(_WRITE_DIR.value, "summary.json"), "w") as f:
      json.dump(summaries, f, indent=1)


if __name__ == "__main__":
  app.run(main)
