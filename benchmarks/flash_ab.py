"""Times this tree's `flash` kernels against other versions of them.

One command on the GPU machine (see benchmarks/flash_notes.md):

  git archive REV flexible_attention/kernels/flash | tar -x -C /tmp/old
  python3 benchmarks/flash_ab.py \\
      --baselines=/tmp/old/flexible_attention/kernels/flash \\
      --cells=128:full,128:causal,256:full --out=$OUT/flash_ab.json

`--patch='module.NAME=value;...'` adds a copy of this tree's package with
those module constants set (each value a Python literal), as the version
`patched: module.NAME=value;...`: an opt-in choice such as
`structure.GROUPED_CAUSAL_DKV=True` timed beside the default. Each
`--patch` is a version of its own, so several choices and their
combination time in one command:

  python3 benchmarks/flash_ab.py --cudnn \
      --patch=structure.GROUPED_CAUSAL_DKV=True \
      --patch=structure.GROUPED_CAUSAL_DQ=False \
      --patch='structure.GROUPED_CAUSAL_DKV=True;structure.GROUPED_CAUSAL_DQ=False'

`--baselines` are other versions of the `kernels/flash/` package (folders,
e.g. from `git archive` as above); each is copied under a name of its own,
its imports of itself renamed to that name, and imported beside this
tree's, in the same process, so all run on the same device in the same
state. (Versions from before the package, single `flash_triton.py` files,
imported a `flash_hopper` module this tree no longer has: check such a
revision out whole to time it.) Per cell (bf16, B * S = `--tokens`, H * D = 2048,
default launches of each version):

1. each version's forward output and dq/dk/dv are checked against the
   float32 reference (relative to its largest entry); a version that
   differs by more than the bf16 tolerance is not timed;
2. the forward pass (`forward_pass`, with its `prepare`) and the backward
   (`backward_pass`: delta, dK/dV, dQ) of every version are timed
   round-robin (`timing.median_seconds_each`), so drifts of the device fall
   on all alike; with `--cudnn` cuDNN's forward and forward+backward too
   (checked first likewise), the baseline of the project's targets.
"""

from __future__ import annotations

import ast
import glob
import importlib
import os
import shutil
import sys
import tempfile

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import flexible_attention as fa
from flexible_attention import timing
from flexible_attention.comparison import compare
from flexible_attention.comparison import report
from flexible_attention.kernels import flash as flash_kernel

_BASELINES = flags.DEFINE_list(
    "baselines", [], "Folders holding other versions of the "
    "kernels/flash package (each named after its parent folders).")
_CELLS = flags.DEFINE_list("cells", ["128:full", "128:causal"],
                           "Cells, `D:full` or `D:causal`, optionally "
                           "`:S` after (else --seq).")
_SEQ = flags.DEFINE_integer("seq", 4096, "Sequence length.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "B * S.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Samples per timing.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_CUDNN = flags.DEFINE_bool(
    "cudnn", False, "Time cuDNN (`jax.nn.dot_product_attention`, checked "
    "against the reference too) in the same round-robin: its forward and "
    "its forward+backward (a vjp under one jit).")
_PATCH = flags.DEFINE_multi_string(
    "patch", [], "`module.NAME=value;...`: constants of this tree's package "
    "set in a copy of it, timed as a version of its own (one per --patch).")
_INTERPRET = flags.DEFINE_bool(
    "interpret", False, "Run the kernels in Pallas' interpreter (a CPU smoke "
    "test of this script; the timings then mean nothing).")

TOL = 2e-2  # bf16, relative to the largest entry (flash_probe.py's).


def _load(path: str, index: int):
  """Imports the `kernels/flash` package at `path` as `baseline_<index>`:
  a copy whose imports of `flexible_attention.kernels.flash` name the copy
  (the library modules it imports besides, `core`, are this tree's)."""
  name = f"baseline_{index}"
  root = tempfile.mkdtemp()
  shutil.copytree(path, os.path.join(root, name))
  for file in glob.glob(os.path.join(root, name, "*.py")):
    with open(file) as f:
      text = f.read()
    with open(file, "w") as f:
      f.write(text.replace("flexible_attention.kernels.flash", name))
  sys.path.insert(0, root)
  return importlib.import_module(name)


def _passes(kernels, d: int, causal: bool):
  """The jitted forward `(q, k, v) -> (out, lse)` and backward `(q, k, v,
  out, lse, dout) -> (dq, dk, dv)` of one version of the kernels."""

  def prepare(q, k, v):
    return kernels.prepare(fa.canonicalize(q, k, v, causal=causal),
                           sm_scale=d**-0.5, interpret=_INTERPRET.value)

  forward = jax.jit(lambda q, k, v: kernels.forward_pass(prepare(q, k, v))[:2])
  backward = jax.jit(lambda q, k, v, out, lse, dout: kernels.backward_pass(
      prepare(q, k, v), out, lse, dout)[:3])
  return forward, backward


def _cell(d: int, causal: bool, s: int, versions) -> list[dict]:
  b, h = max(1, _TOKENS.value // s), 2048 // d
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, dout = (jax.random.normal(key, (b, s, h, d), jnp.bfloat16)
                   for key in keys)
  f32 = lambda x: x.astype(jnp.float32)
  ref_in = fa.canonicalize(f32(q), f32(k), f32(v), causal=causal)

  def reference(q, k, v):
    # One head at a time (`lax.map`): all heads' float32 scores at S = 16k
    # would take 16 GiB, one head's 1 GiB. Rematerialised in the backward
    # (`jax.checkpoint`): else the vjp keeps every head's probabilities
    # (16 GiB again; out of an H100's memory at 16k).
    @jax.checkpoint
    def head(qkv):
      return fa.reference_attention(
          *(x[:, :, None] for x in qkv), None, ref_in.visibility,
          sm_scale=d**-0.5).out[:, :, 0]
    heads = lambda x: jnp.moveaxis(x, 2, 0)
    return jnp.moveaxis(jax.lax.map(head, (heads(q), heads(k), heads(v))),
                        0, 2)

  ref_out, ref_vjp = jax.vjp(reference, ref_in.query, ref_in.key,
                             ref_in.value)
  ref_grads = ref_vjp(f32(dout))

  rows, calls = [], []
  if _CUDNN.value:
    attend = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=d**-0.5, is_causal=causal, implementation="cudnn")
    forward = jax.jit(attend)
    both = jax.jit(lambda q, k, v, dout: jax.vjp(attend, q, k, v)[1](dout))
    out, grads = forward(q, k, v), both(q, k, v, dout)
    error = max(compare.relative_error(x, want) for x, want in
                zip((out, *grads), (ref_out, *ref_grads)))
    row = dict(version="cudnn", D=d, causal=causal, S=s, B=b, H=h,
               error=error, status="ok" if error <= TOL else
               "differs from the reference: not timed")
    rows.append(row)
    if row["status"] == "ok":
      calls += [(row, "forward_ms", forward, (q, k, v)),
                (row, "fwd_bwd_ms", both, (q, k, v, dout))]
  for name, kernels in versions:
    forward, backward = _passes(kernels, d, causal)
    out, lse = forward(q, k, v)
    grads = backward(q, k, v, out, lse, dout)
    error = max(compare.relative_error(x, want) for x, want in
                zip((out, *grads), (ref_out, *ref_grads)))
    row = dict(version=name, D=d, causal=causal, S=s, B=b, H=h,
               error=error)
    rows.append(row)
    if not np.isfinite(error) or error > TOL:
      row["status"] = "differs from the reference: not timed"
      continue
    row["status"] = "ok"
    calls += [(row, "forward_ms", forward, (q, k, v)),
              (row, "backward_ms", backward, (q, k, v, out, lse, dout))]
  seconds = timing.median_seconds_each([(fn, args) for *_, fn, args in calls],
                                       repeats=_REPEATS.value)
  for (row, key, *_), t in zip(calls, seconds):
    row[key] = t * 1e3
  for row in rows:
    if "backward_ms" in row:
      row["fwd_bwd_ms"] = row["forward_ms"] + row["backward_ms"]
  return rows


def main(argv):
  del argv
  versions = [(os.path.normpath(path), _load(path, i))
              for i, path in enumerate(_BASELINES.value)]
  for patches in _PATCH.value:
    patched = _load(os.path.dirname(flash_kernel.__file__), len(versions))
    for patch in patches.split(";"):
      target, value = patch.strip().split("=", 1)
      module, name = target.rsplit(".", 1)
      module = importlib.import_module(f"{patched.__name__}.{module}")
      if not hasattr(module, name):
        raise ValueError(f"--patch: {target} does not exist.")
      setattr(module, name, ast.literal_eval(value))
    versions.append((f"patched: {patches}", patched))
  versions.append(("this tree", flash_kernel))
  rows = []
  for cell in _CELLS.value:
    d, mask, *seq = cell.split(":")
    rows += _cell(int(d), mask == "causal", int(seq[0]) if seq else
                  _SEQ.value, versions)
    report.write_probe_rows(_OUT.value, rows)
  print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}")
  print("| D | S | mask | version | error | forward ms | backward ms | "
        "fwd+bwd ms |")
  print("|---|---|---|---|---|---|---|---|")
  fmt = lambda x: "-" if x is None else f"{x:.3f}"
  for r in rows:
    print(f"| {r['D']} | {r['S']} | {'causal' if r['causal'] else 'full'} "
          f"| {r['version']} | {r['error']:.1e} | "
          f"{fmt(r.get('forward_ms'))} | {fmt(r.get('backward_ms'))} | "
          f"{fmt(r.get('fwd_bwd_ms'))} |")


if __name__ == "__main__":
  app.run(main)
