"""The Mosaic forward's register split: ptxas' spills and the time of each.

The forward's warpgroups ask for registers with `plgpu.set_max_registers`:
each consumer thread `CONSUMER_REGISTERS`, each producer thread
`PRODUCER_REGISTERS` (`mosaic_common`; 2 * 128 * 232 + 128 * 40 of a
multiprocessor's 65536). One command on the GPU machine
(benchmarks/flash_notes.md):

  python3 benchmarks/fwd_registers_probe.py --splits=232:40,224:56 \\
      --head_dims=64,128,256 --seqs=1024,16384 --out=$OUT/fwd_registers.json

For each split `consumer:producer` and head size, the forward of a causal
bf16 call (B * S = `--tokens`, H * D = 2048, default Hopper launches) is
traced with the split patched into `mosaic_fwd` and compiled with
`MOSAIC_GPU_DUMP_PTXAS=1` (set here, before JAX starts), ptxas' report of
`flash_forward_mosaic_gpu_kernel` read from the process's own output; its
output is checked against the float32 reference (the first `--check_heads`
heads), then every checked variant of a cell is timed round-robin
(`timing.median_seconds_each`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

os.environ.setdefault("MOSAIC_GPU_DUMP_PTXAS", "1")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp

import flexible_attention as fa
from flexible_attention import timing
from flexible_attention.comparison import compare
from flexible_attention.comparison import report
from flexible_attention.kernels import flash as flash_kernel
from flexible_attention.kernels.flash import mosaic_fwd

_SPLITS = flags.DEFINE_list("splits", ["232:40", "224:56"],
                            "Register splits, `consumer:producer`.")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128", "256"],
                               "Head sizes D.")
_SEQS = flags.DEFINE_list("seqs", ["1024", "16384"], "Sequence lengths.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "B * S.")
_CHECK_HEADS = flags.DEFINE_integer("check_heads", 2,
                                    "Heads checked against the reference.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Samples per timing.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")

TOL = 2e-2  # bf16, relative to the largest entry (flash_ab.py's).
REGISTER_FILE = 65536  # 32-bit registers a multiprocessor has.
HEADER = "Function properties for flash_forward_mosaic_gpu_kernel"


@contextlib.contextmanager
def _output_to(path: str):
  """Sends this process's stdout and stderr (its file descriptors: ptxas'
  report is printed below Python) to `path`."""
  sys.stdout.flush()
  sys.stderr.flush()
  saved = [os.dup(1), os.dup(2)]
  with open(path, "w") as f:
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
  try:
    yield
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, old in zip((1, 2), saved):
      os.dup2(old, fd)
      os.close(old)


def _compiled(split, d: int, q, k, v):
  """`(jitted forward, its output, ptxas' lines for the forward kernel)`
  with `split = (consumer, producer)` registers patched in while it is
  traced and compiled."""
  launch = flash_kernel.hopper_launch_config(d, True)
  forward = jax.jit(lambda q, k, v: flash_kernel.flash_attention(
      fa.canonicalize(q, k, v, causal=True), sm_scale=d**-0.5,
      launch=launch)[0])
  saved = mosaic_fwd.CONSUMER_REGISTERS, mosaic_fwd.PRODUCER_REGISTERS
  mosaic_fwd.CONSUMER_REGISTERS, mosaic_fwd.PRODUCER_REGISTERS = split
  with tempfile.NamedTemporaryFile(suffix=".log") as log:
    try:
      with _output_to(log.name):
        out = jax.block_until_ready(forward(q, k, v))
    finally:
      mosaic_fwd.CONSUMER_REGISTERS, mosaic_fwd.PRODUCER_REGISTERS = saved
    lines = open(log.name).read().splitlines()
  report = [lines[n + 1].strip() for n, line in enumerate(lines[:-1])
            if line.endswith(HEADER)]
  return forward, out, report


def _cell(d: int, s: int, splits) -> list[dict]:
  b, h = max(1, _TOKENS.value // s), 2048 // d
  q, k, v = (jax.random.normal(key, (b, s, h, d), jnp.bfloat16)
             for key in jax.random.split(jax.random.key(d + s), 3))
  n = _CHECK_HEADS.value
  f32 = lambda x: x[:, :, :n].astype(jnp.float32)
  ref = fa.canonicalize(f32(q), f32(k), f32(v), causal=True)
  want = fa.reference_attention(ref.query, ref.key, ref.value, None,
                                ref.visibility, sm_scale=d**-0.5).out
  rows, calls = [], []
  for split in splits:
    forward, out, report = _compiled(split, d, q, k, v)
    error = compare.relative_error(out[:, :, :n], want)
    row = dict(D=d, S=s, B=b, H=h, consumer=split[0], producer=split[1],
               ptxas=report, error=error,
               status="ok" if error <= TOL else "differs: not timed")
    rows.append(row)
    if row["status"] == "ok":
      calls.append((row, forward))
  seconds = timing.median_seconds_each([(fn, (q, k, v)) for _, fn in calls],
                                       repeats=_REPEATS.value)
  for (row, _), t in zip(calls, seconds):
    row["forward_ms"] = t * 1e3
  return rows


def main(argv):
  del argv
  splits = [tuple(map(int, x.split(":"))) for x in _SPLITS.value]
  for consumer, producer in splits:
    if 2 * 128 * consumer + 128 * producer > REGISTER_FILE:
      raise ValueError(f"{consumer}:{producer} takes more than the "
                       f"{REGISTER_FILE} registers a multiprocessor has.")
  rows = []
  for d in map(int, _HEAD_DIMS.value):
    for s in map(int, _SEQS.value):
      rows += _cell(d, s, splits)
      report.write_probe_rows(_OUT.value, rows)
  print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}")
  print("| D | S | consumer:producer | ptxas (each compile) | error | "
        "forward ms |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    ms = r.get("forward_ms")
    print(f"| {r['D']} | {r['S']} | {r['consumer']}:{r['producer']} | "
          f"{'; '.join(r['ptxas']) or '-'} | {r['error']:.1e} | "
          f"{'-' if ms is None else f'{ms:.3f}'} |")


if __name__ == "__main__":
  app.run(main)
