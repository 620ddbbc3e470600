"""The elementwise work in `flash`'s Mosaic GPU kernels, counted.

Runs anywhere, no GPU needed (see benchmarks/flash_notes.md):

  python3 benchmarks/mosaic_census.py --cells=plain,alibi,alibi_per_element

Lowers one `flash` forward + backward per cell (bf16, causal, B = 1, the
launch policy's Hopper kernels: Mosaic forward, dK/dV and dQ) for CUDA on
this machine, keeps each Mosaic GPU kernel's module as Pallas hands it to
XLA (before LLVM and ptxas) and counts its elementwise vector operations
by kind (`arith.addf` ... on `vector<...>` values: a thread's registers,
two 32-bit values each in `wgmma`'s layout). A cell's count against
`plain`'s says how many operations per thread a score_mod adds to each
kernel, in all its copies of the step (the masked and unmasked loops).

This is a static count before LLVM's optimisations, not a timing: LLVM may
fold or fuse some of it (an add after a multiply into an FMA), and it says
nothing of registers or spills (ptxas': `MOSAIC_GPU_DUMP_PTXAS=1` on the
GPU machine, or `sass_loops.py --compile=... --deviceless` on any).

Cells: `plain` (causal, no mod); `alibi` (causal ALiBi as a score_mod,
split by the kernels: `mosaic_mod_split`); `alibi_per_element` (the same,
the split turned off, so the kernels evaluate the mod per element).
"""

from __future__ import annotations

import collections
import json
import re
import sys
from unittest import mock

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import flexible_attention as fa
from flexible_attention.core import inputs as inputs_lib
from flexible_attention.kernels import gpu
from flexible_attention.kernels.flash import interface
from flexible_attention.kernels.flash import launch as flash_launch
from flexible_attention.kernels.flash import mosaic_bwd
from flexible_attention.kernels.flash import mosaic_dq
from flexible_attention.kernels.flash import mosaic_fwd
from flexible_attention.kernels.flash import mosaic_mod_rows
from flexible_attention.kernels.flash import mosaic_mod_split
from flexible_attention.kernels.flash import mosaic_mods

_CELLS = flags.DEFINE_list("cells", ["plain", "alibi", "alibi_per_element"],
                           "Cells: plain, alibi, alibi_per_element.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "D.")
_SEQ = flags.DEFINE_integer("seq", 512, "S (the counts do not depend on it).")
_HEADS = flags.DEFINE_integer("heads", 4, "H.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")

OPS = ("addf", "subf", "mulf", "divf", "maximumf", "select", "sitofp",
       "addi", "subi", "muli", "cmpf", "cmpi")
KERNELS = ("forward", "dkdv", "dq")  # The order Pallas lowers them in.


def _count(text: str) -> dict[str, int]:
  """Vector operations by kind in one module's text."""
  found = collections.Counter()
  for op in OPS:
    found[op] = len(re.findall(
        rf"= arith\.{op}\b[^\n]*: vector<", text))
  return {op: n for op, n in found.items() if n}


def _lower(cell: str) -> list[str]:
  """The Mosaic GPU modules of one cell's forward + backward."""
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir import passmanager  # pylint: disable=g-import-not-at-top
  from jax.experimental.mosaic.gpu import core as mgpu_core  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, "tests")
  import helpers  # pylint: disable=g-import-not-at-top

  modules = []
  lower = mgpu_core._mosaic_gpu_lowering_rule  # pylint: disable=protected-access

  def keep(ctx, *args, module, **kwargs):
    # A copy with common subexpressions merged (as LLVM will: a broadcast
    # vector is the same registers in every row, and so are the results
    # of an operation on it), then counted.
    with module.context:
      copy = ir.Module.parse(str(module))
      passmanager.PassManager.parse("builtin.module(cse)").run(
          copy.operation)
    modules.append(str(copy))
    return lower(ctx, *args, module=module, **kwargs)

  h, d, s = _HEADS.value, _HEAD_DIM.value, _SEQ.value
  slopes = jnp.asarray(fa.alibi_slopes(h))
  score_mod = None if cell == "plain" else fa.alibi_score_mod

  def loss(q, k, v):
    record = inputs_lib.canonicalize(
        q, k, v, causal=True, score_mod=score_mod,
        mod_args=(slopes,) if score_mod else ())
    out = interface.flash_attention(record, sm_scale=d**-0.5).out
    return jnp.sum(out.astype(jnp.float32))

  patches = [mock.patch.object(mgpu_core, "_mosaic_gpu_lowering_rule", keep),
             mock.patch.object(gpu, "compute_capability", lambda: 9.0),
             mock.patch.object(flash_launch, "MOSAIC_DQ_MIN_KV_LEN", 0)]
  if cell == "alibi_per_element":
    never = lambda *args: None
    patches += [mock.patch.object(m, "split_slot", never) for m in (
        mosaic_mod_split, mosaic_fwd, mosaic_dq, mosaic_bwd)]
    patches.append(mock.patch.object(
        mosaic_mod_rows, "read_counts",
        lambda km, causal: mosaic_mods.plan(km).counts))
  x = jax.ShapeDtypeStruct((1, s, h, d), jnp.bfloat16)
  for patch in patches:
    patch.start()
  try:
    helpers.lower_for_cuda(jax.grad(loss, (0, 1, 2)), x, x, x)
  finally:
    for patch in patches:
      patch.stop()
  return modules


def main(argv):
  del argv
  rows = {}
  for cell in _CELLS.value:
    modules = _lower(cell)
    rows[cell] = {name: _count(text) for name, text in zip(KERNELS, modules)}
  base = rows.get("plain")
  print(f"vector operations per kernel (D = {_HEAD_DIM.value}, all copies "
        "of the step; + against plain)")
  for cell, kernels in rows.items():
    for name, counts in kernels.items():
      extra = ""
      if base and cell != "plain":
        delta = {op: n - base[name].get(op, 0) for op, n in counts.items()
                 if n != base[name].get(op, 0)}
        extra = f"  +{sum(delta.values())} {delta}"
      print(f"{cell:18s} {name:8s} {sum(counts.values()):6d}{extra}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(dict(head_dim=_HEAD_DIM.value, jax=jax.__version__,
                     counts=rows), f, indent=1)


if __name__ == "__main__":
  app.run(main)
