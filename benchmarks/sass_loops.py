"""Registers, spills and step loops of compiled Mosaic GPU kernels, from SASS.

The GPU machine compiles each Mosaic GPU kernel to PTX and hands it to
ptxas; with `MOSAIC_GPU_DUMP_PTX` set, one run of any script that compiles
the kernels prints that PTX to its standard output:

  MOSAIC_GPU_DUMP_PTX=1 python3 <script> > dump.txt

(`MOSAIC_GPU_DUMP_TO=<an existing folder>` writes files instead, but it
turns on every dump, the MLIR after each pass included: hundreds of MB a
kernel; a folder that does not exist sends all of it to the output). Any
machine then reads the kernels with CUDA's `ptxas` and `cuobjdump`, no GPU
needed:

  python3 benchmarks/sass_loops.py --dump=dump.txt   # Or `dump.txt.gz`.
  python3 benchmarks/sass_loops.py --ptx=flash_dkdv_dq_1.ptx

`--compile` is such a script: on the GPU machine it compiles `flash`'s
forward and backward (default launches, bf16, B = 1, H = 2, D =
`--head_dim`, causal unless `--full`) for each cell of `--compile`, at
`--seq` tokens, and runs nothing else:

  MOSAIC_GPU_DUMP_PTX=1 python3 benchmarks/sass_loops.py \
      --compile=plain,window,documents > dump.txt

With `--deviceless` the same cells compile on a machine with no GPU: the
Mosaic GPU kernels are lowered for CUDA there and compiled by the CUDA
plugin's own Mosaic compiler and ptxas (`deviceless.py` says what to
install; use the GPU machine's CUDA version, 13.0 in the notes' sessions),
then reported as `--dump` does:

  python3 benchmarks/sass_loops.py --compile=plain,window,documents \
      --deviceless [--head_dim=64] [--full] [--cuda_root=.../nvidia/cu13]

Per kernel: ptxas' report for sm_90a (registers, bytes of spill stores and
loads a thread; the same numbers ptxas gives on the GPU machine), and each
step loop, a loop of the machine code that issues `HGMMA`s and holds no
smaller such loop: its instructions per iteration and thread by opcode, and
the spill reloads (`LDL`) and stores (`STL`) inside it. Spills outside the
step loops cost once per program; inside, every step. How the fused
backward's spill was found this way: flash_notes.md, the session of
2026-12-06 (thirteenth).

`ptxas` and `cuobjdump` come from `--ptxas` and `--cuobjdump`, else the
PATH, else the copies Triton's wheel carries (`pip install triton`; the
kernels are not Triton's). ptxas must know the PTX's `.version`: jax
0.11.2 on the GPU machine writes PTX 9.0, which needs CUDA 13's ptxas
(Triton 3.9 carries CUDA 12.9's); any cuobjdump reads the cubin, and
`cuobjdump -sass` runs CUDA's `nvdisasm`, which must be on the PATH (or in
`NVDISASM_PATH`). Without a CUDA toolkit, the wheels `nvidia-cuda-nvcc`,
`nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm` carry all three (their
`nvidia/cu13/bin`).

`--stalls` reads where a kernel's warps wait instead, from Nsight Compute's
warp-state samples per SASS instruction (on the GPU machine; the page
exported as CSV is read anywhere):

  ncu --section SourceCounters --section WarpStateStats -k regex:dkdv \
      --launch-count 1 -o rep python3 benchmarks/profile_target.py
  ncu --import rep.ncu-rep --page source --csv --print-source sass > page.csv
  python3 benchmarks/sass_loops.py --stalls=page.csv

It prints the share of the samples by stall reason, by the kind of
instruction the warps were at (`WAIT_KINDS`; a barrier's retry loop is the
branch after `SYNCS.PHASECHK`) and the `--top` instructions. Every warp is
sampled, the producer's too: a producer waiting for a free slot is idle by
design, so read the shares of the consumers' code.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import flexible_attention as fa
from flexible_attention.comparison import cells
from flexible_attention.kernels import gpu
from flexible_attention.kernels import flash

import deviceless  # pylint: disable=g-bad-import-order

# `--compile`'s cells: `flash_attention`'s structure arguments (the
# documents' ids filled in by `compile_cells`).
COMPILE_CELLS = {"plain": {}, "window": {"sliding_window": 1024},
                 "documents": {"segment_ids": None}}

_PTX = flags.DEFINE_list("ptx", [], "PTX files of Mosaic GPU kernels.")
_DUMP = flags.DEFINE_list(
    "dump", [], "Standard outputs (`.gz` or not) of runs with "
    "`MOSAIC_GPU_DUMP_PTX=1`: every PTX module in them is read.")
_STALLS = flags.DEFINE_string(
    "stalls", None, "An Nsight Compute source page (CSV, SASS) to read.")
_COMPILE = flags.DEFINE_list(
    "compile", [], "Cells to compile (and only compile) on a GPU: "
    f"{', '.join(COMPILE_CELLS)}.")
_SEQ = flags.DEFINE_integer("seq", 16384, "Tokens of `--compile`'s calls.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "`--compile`'s head size.")
_FULL = flags.DEFINE_bool("full", False, "`--compile` bidirectional calls "
                          "(else causal).")
_DEVICELESS = flags.DEFINE_bool(
    "deviceless", False, "`--compile` on a machine with no GPU: lower for "
    "CUDA here and compile each Mosaic GPU kernel with the CUDA plugin's "
    "compiler (deviceless.py), then report them as --dump does.")
_PLUGIN = flags.DEFINE_string("plugin", None, "--deviceless: the CUDA "
                              "plugin's xla_cuda_plugin.so.")
_CUDA_ROOT = flags.DEFINE_string("cuda_root", None, "--deviceless: CUDA's "
                                 "root (bin/ptxas, nvvm/libdevice).")
_PTXAS = flags.DEFINE_string("ptxas", None, "CUDA's ptxas.")
_CUOBJDUMP = flags.DEFINE_string("cuobjdump", None, "CUDA's cuobjdump.")
_ARCH = flags.DEFINE_string("arch", "sm_90a", "ptxas' target.")
_TOP = flags.DEFINE_integer("top", 12, "Opcodes listed per loop, or "
                            "instructions with --stalls.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")

# `/*0a30*/  @!P0 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;`
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")
_BRANCH = re.compile(r"\bBRA\b.*?(0x[0-9a-f]+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def tool(name: str, given: str | None) -> str:
  """The path of CUDA's `name`: `given`, else the PATH's, else Triton's."""
  if given:
    return given
  found = shutil.which(name)
  if found:
    return found
  try:
    import triton  # pylint: disable=g-import-not-at-top
  except ImportError:
    triton = None
  if triton is not None:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends",
                           "nvidia", "bin", name)
    if os.path.exists(bundled):
      return bundled
  raise app.UsageError(f"No {name}: pass --{name}, put CUDA's bin folder "
                       "on the PATH or install triton.")


def opcode(text: str) -> str:
  """`@!P0 HGMMA.64x64x16.F32.BF16 R24, ...` -> `HGMMA`."""
  return _PREDICATE.sub("", text).split()[0].split(".")[0]


def instructions(sass: str) -> list[tuple[int, str]]:
  """`(address, text)` of every instruction of a `cuobjdump -sass` listing."""
  return [(int(m.group(1), 16), m.group(2))
          for m in map(_INSTRUCTION.match, sass.splitlines()) if m]


@dataclasses.dataclass(frozen=True)
class Loop:
  start: int  # The address of its first instruction (a branch's target).
  end: int  # The address of the branch back.
  opcodes: dict[str, int]

  @property
  def size(self) -> int:
    return sum(self.opcodes.values())


def step_loops(code: list[tuple[int, str]]) -> list[Loop]:
  """The loops that issue `HGMMA`s and hold no smaller such loop, in
  address order. A loop is an instruction range from a predicated backward
  branch's target to the branch. (ptxas places a barrier wait's retries
  out of line, after the kernel's last instruction, and returns from them
  with an unconditional backward branch: not a loop.)"""
  loops = []
  for address, text in code:
    match = _BRANCH.search(text)
    if (match and _PREDICATE.match(text)
        and int(match.group(1), 16) < address):
      start = int(match.group(1), 16)
      ops = collections.Counter(opcode(t) for a, t in code
                                if start <= a <= address)
      if ops["HGMMA"]:
        loops.append(Loop(start, address, dict(ops)))
  inner = [loop for loop in loops
           if not any(other is not loop and loop.start <= other.start
                      and other.end <= loop.end for other in loops)]
  return sorted(inner, key=lambda loop: loop.start)


# The instructions warps are sampled at, by kind: (name, opcode prefix).
WAIT_KINDS = (("wgmma wait", "WARPGROUP.DEPBAR"), ("wgmma issue", "HGMMA"),
              ("named barrier", "BAR.SYNC"), ("memory fence", "MEMBAR"))


def stall_samples(page: str, top: int = 12) -> dict:
  """Warp-state samples of one kernel's Nsight Compute source page (`ncu
  --page source --csv --print-source sass`'s text): their count, the share
  of each stall reason and of each `WAIT_KINDS` kind ("barrier wait": the
  branch that retries a `SYNCS.PHASECHK` wait; "other": the rest), and the
  `top` instructions by samples."""
  rows = list(csv.reader(page.splitlines()))
  start = next(i for i, row in enumerate(rows) if row[:2] == ["Address",
                                                              "Source"])
  names = {name: i for i, name in enumerate(rows[start])}
  code = [row for row in rows[start + 1:] if len(row) == len(names)]
  count = lambda row, name: int(row[names[name]] or 0)
  samples = [count(row, "Warp Stall Sampling (All Samples)") for row in code]
  total = sum(samples) or 1
  reasons = {name[len("stall_"):]: sum(count(row, name) for row in code)
             / total for name in names
             if name.startswith("stall_") and "(" not in name}
  kinds, previous = collections.Counter(), ""
  for row, n in zip(code, samples):
    text = _PREDICATE.sub("", row[names["Source"]].strip())
    kind = next((k for k, prefix in WAIT_KINDS if text.startswith(prefix)),
                "barrier wait" if text.startswith("BRA")
                and "SYNCS.PHASECHK" in previous else "other")
    kinds[kind] += n / total
    previous = text
  order = sorted(range(len(code)), key=lambda i: -samples[i])[:top]
  return dict(
      samples=sum(samples),
      reasons=dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
      kinds=dict(kinds.most_common()),
      top=[dict(address=code[i][names["Address"]],
                source=code[i][names["Source"]].strip(),
                share=samples[i] / total,
                reason=max(reasons, key=lambda r: count(code[i],
                                                        "stall_" + r)))
           for i in order])


def read_dumps(paths, folder: str) -> list[str]:
  """Writes the PTX modules of `--dump` files into `folder`, one file each
  (`<kernel>_<n>.ptx`); returns their paths."""
  written = []
  for path in paths:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
      modules = deviceless.ptx_modules(f.read())
    for name, text in modules:
      out = os.path.join(folder, f"{name}_{len(written)}.ptx")
      with open(out, "w") as f:
        f.write(text)
      written.append(out)
  return written


def report(ptx_path: str) -> dict:
  """ptxas' numbers and the step loops of one kernel's PTX."""
  with tempfile.TemporaryDirectory() as scratch:
    cubin = os.path.join(scratch, "kernel.cubin")
    ptxas = subprocess.run(
        [tool("ptxas", _PTXAS.value), f"-arch={_ARCH.value}", "-v", ptx_path, "-o", cubin],
        capture_output=True, text=True, check=True)
    dump = subprocess.run([tool("cuobjdump", _CUOBJDUMP.value), "-sass",
                           cubin], capture_output=True, text=True, check=False)
    if dump.returncode != 0:  # E.g. no nvdisasm beside it (docstring).
      raise RuntimeError(f"cuobjdump -sass failed: {dump.stderr.strip()}")
    sass = dump.stdout
  info = ptxas.stdout + ptxas.stderr
  spills = _SPILLS.search(info)
  registers = _REGISTERS.search(info)
  return dict(
      ptx=os.path.basename(ptx_path),
      registers=int(registers.group(1)) if registers else None,
      spill_stores=int(spills.group(1)) if spills else None,
      spill_loads=int(spills.group(2)) if spills else None,
      step_loops=[dict(start=hex(loop.start), end=hex(loop.end),
                       instructions=loop.size, opcodes=loop.opcodes)
                  for loop in step_loops(instructions(sass))])


def compile_cells(names, seq: int, heads: int = 2, head_dim: int = 128,
                  causal: bool = True, without_gpu: bool = False):
  """Compiles the forward and backward of `flash` (default launches) for
  each of `COMPILE_CELLS`' `names`: on the GPU machine by XLA, on a CPU the
  Triton kernels in Pallas' interpreter, or `without_gpu` only the
  Mosaic GPU kernels, lowered for CUDA here (`deviceless.compile_ptx`).

  Returns:
    `without_gpu`, the kernels as `(cell, deviceless.Kernel)` in program
    order; else [] (XLA keeps what it compiled).
  """
  unknown = set(names) - set(COMPILE_CELLS)
  if unknown:
    raise app.UsageError(f"--compile cells are {sorted(COMPILE_CELLS)}, got "
                         f"{sorted(unknown)}.")
  x = jax.ShapeDtypeStruct((1, seq, heads, head_dim), jnp.bfloat16)
  interpret = not without_gpu and jax.default_backend() == "cpu"
  kernels = []
  for name in names:
    call = dict(COMPILE_CELLS[name])
    if "segment_ids" in call:
      call["segment_ids"] = jnp.asarray(cells.packed_segment_ids(1, seq, 0))

    def loss(q, k, v, call=call):
      inputs = fa.canonicalize(q, k, v, causal=causal, **call)
      out = flash.flash_attention(inputs, None, sm_scale=head_dim**-0.5,
                                  interpret=interpret).out
      return jnp.sum(out.astype(jnp.float32))

    grad = jax.grad(loss, (0, 1, 2))
    if without_gpu:  # The default launches of an H100 or H200.
      with mock.patch.object(gpu, "compute_capability", lambda: 9.0), \
          mock.patch.object(gpu, "core_count", lambda: 132):
        modules = deviceless.mosaic_modules(
            deviceless.lower_for_cuda(grad, x, x, x))
      kernels += [(name, kernel) for kernel in deviceless.compile_ptx(
          modules, plugin=_PLUGIN.value, cuda_root=_CUDA_ROOT.value)]
    else:
      jax.jit(grad).lower(x, x, x).compile()
    print(f"compiled {name}", file=sys.stderr)
  return kernels


def main(argv):
  del argv
  compiled = []  # `(cell, deviceless.Kernel)` of --deviceless.
  if _COMPILE.value:
    compiled = compile_cells(_COMPILE.value, _SEQ.value,
                             head_dim=_HEAD_DIM.value, causal=not _FULL.value,
                             without_gpu=_DEVICELESS.value)
    if not _DEVICELESS.value:
      return
  if not (_PTX.value or _DUMP.value or _STALLS.value or compiled):
    raise app.UsageError("Give --ptx or --dump files or a --stalls page.")
  if _STALLS.value:
    with open(_STALLS.value) as f:
      stalls = stall_samples(f.read(), _TOP.value)
    share = lambda d: ", ".join(f"{k} {v:.1%}" for k, v in d.items() if v)
    print(f"{stalls['samples']} samples\nby reason: "
          f"{share(stalls['reasons'])}\nby kind: {share(stalls['kinds'])}")
    print("| address | share | reason | instruction |\n|---|---|---|---|")
    for row in stalls["top"]:
      print(f"| {row['address']} | {row['share']:.1%} | {row['reason']} | "
            f"`{row['source']}` |")
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(stalls, f, indent=1)
    return
  with tempfile.TemporaryDirectory() as folder:
    paths = []
    for n, (cell, kernel) in enumerate(compiled):
      paths.append(os.path.join(folder, f"{cell}_{kernel.name}_{n}.ptx"))
      with open(paths[-1], "w") as f:
        f.write(kernel.ptx)
    paths += list(_PTX.value) + read_dumps(_DUMP.value, folder)
    results = [report(path) for path in paths]
  for kernel in results:
    print(f"\n{kernel['ptx']}: {kernel['registers']} registers at launch, "
          f"{kernel['spill_stores']} / {kernel['spill_loads']} bytes of spill "
          "stores / loads a thread")
    print("| loop | instructions | HGMMA | LDL | STL | most frequent |")
    print("|---|---|---|---|---|---|")
    for loop in kernel["step_loops"]:
      ops = collections.Counter(loop["opcodes"])
      common = ", ".join(f"{k} {n}" for k, n in ops.most_common(_TOP.value))
      print(f"| {loop['start']}-{loop['end']} | {loop['instructions']} | "
            f"{ops['HGMMA']} | {ops['LDL']} | {ops['STL']} | {common} |")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
