"""One forward+backward of a mechanism, for a kernel profiler to attach to.

Builds `create_attention(mechanism, ...)` inside `hk.transform` at one
shape (default B = 1, S = 16384, H = 16, D = 128, bf16, the standard grid's
D = 128, S = 16k cell per head), jits its forward+backward, checks the
output of the last 128 queries against the float32 reference, then runs
the program `--runs` times. `--list` runs it once under `jax.profiler`
instead and prints the device kernels' names, longest first. Under Nsight
Compute (every launch of the first run profiled, the check's after them),
`--summarize` reads its report back as one line per kernel of at least
`--min_us`. `--backward=fused|fused_any` runs the fused backward instead of
the default one (dQ inside the Mosaic dK/dV kernel, in a fixed or any
order):

  python3 benchmarks/profile_target.py --list
  ncu --section SpeedOfLight --section ComputeWorkloadAnalysis \\
      --section WarpStateStats --section Occupancy --section LaunchStats \\
      --launch-count 40 python3 benchmarks/profile_target.py > ncu.txt
  python3 benchmarks/profile_target.py --summarize=ncu.txt
"""

from __future__ import annotations

import collections
import json

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import flexible_attention as fa
from flexible_attention import timing
from flexible_attention.comparison import compare
from flexible_attention.kernels import flash as flash_kernel

_MECHANISM = flags.DEFINE_string("mechanism", "flash", "What to run.")
_SHAPE = flags.DEFINE_string("shape", "1,16384,16,128", "B,S,H,D.")
_CAUSAL = flags.DEFINE_bool("causal", False, "Causal attention.")
_RUNS = flags.DEFINE_integer("runs", 1, "Runs after the check.")
_BACKWARD = flags.DEFINE_enum(
    "backward", None, ["fused", "fused_any"],
    "flash only, on an sm_90 GPU: the Mosaic kernels with dQ inside the "
    "dK/dV program, its adds in the key tiles' order (fused) or in any "
    "order (fused_any); unset, flash's default launches.")
_LIST = flags.DEFINE_bool("list", False, "Print the kernels' names.")
_SUMMARIZE = flags.DEFINE_string("summarize", None,
                                 "An Nsight Compute text report to summarise.")
_MIN_US = flags.DEFINE_float("min_us", 100.0,
                             "Kernels shorter than this are left out.")

# The report's lines kept per kernel, by their metric names.
_METRICS = {"Duration": "us", "Compute (SM) Throughput": "sm%",
            "Memory Throughput": "mem%", "Registers Per Thread": "regs",
            "Achieved Occupancy": "occ%", "Issue Slots Busy": "issue%",
            "Warp Cycles Per Issued Instruction": "cyc/inst"}

TOL = 2e-2  # bf16 against the float32 reference.


def _launch(d: int) -> dict:
  """`create_attention`'s `launch=` for `--backward`, else nothing."""
  if _BACKWARD.value is None:
    return {}
  if _MECHANISM.value != "flash":
    raise SystemExit("--backward is flash's")
  return dict(launch=flash_kernel.hopper_launch_config(
      d, _CAUSAL.value, dq="fused",
      deterministic_dq=_BACKWARD.value == "fused"))


def _program(b, s, h, d):
  def forward(q, k, v):
    attention = fa.create_attention(_MECHANISM.value, num_heads=h,
                                    head_dim=d, **_launch(d))
    return attention(q, k, v, causal=_CAUSAL.value).attention_outputs

  apply = hk.without_apply_rng(hk.transform(forward)).apply

  def step(q, k, v, dout):
    out, pullback = jax.vjp(lambda *a: apply({}, *a), q, k, v)
    return (out, *pullback(dout))
  return jax.jit(step)


def summarize(path: str, min_us: float) -> list[dict]:
  """One dict per kernel launch of an Nsight Compute text report: its name,
  the `_METRICS` values and its stall advice (the report's first "spends
  ... cycles being stalled" sentence, cut to the stall's kind)."""
  launches, current = [], None
  with open(path) as f:
    for line in f:
      text = line.strip()
      if ", Context " in text and ", Stream " in text:
        current = {"kernel": text.split(" (")[0]}
        launches.append(current)
      elif current is not None:
        for name, key in _METRICS.items():
          if text.startswith(name + " ") and key not in current:
            value = text.split()[-1].replace(",", "")
            try:
              current[key] = float(value)
            except ValueError:
              continue
            if name == "Duration":  # In us, ms or ns.
              unit = text.split()[-2]
              current[key] *= {"ms": 1e3, "ns": 1e-3}.get(unit, 1.0)
        if "stalled" in text and "stall" not in current:
          current["stall"] = text.split("stalled", 1)[1].strip()[:60]
  return [r for r in launches if r.get("us", 0.0) >= min_us]


def main(argv):
  del argv
  if _SUMMARIZE.value:
    for row in summarize(_SUMMARIZE.value, _MIN_US.value):
      print(json.dumps(row))
    return
  b, s, h, d = (int(x) for x in _SHAPE.value.split(","))
  rng = np.random.default_rng(0)
  arr = lambda: jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.bfloat16)
  q, k, v, dout = arr(), arr(), arr(), arr()
  step = _program(b, s, h, d)
  out = step(q, k, v, dout)[0]
  rows = slice(s - 128, s)
  f32 = lambda x: x.astype(jnp.float32)
  inputs = fa.canonicalize(f32(q[:, rows]), f32(k), f32(v),
                           causal=_CAUSAL.value,
                           q_positions=jnp.broadcast_to(
                               jnp.arange(s - 128, s), (b, 128)))
  want = fa.reference_attention(inputs.query, inputs.key, inputs.value, None,
                                inputs.visibility, sm_scale=d**-0.5)[0]
  error = compare.relative_error(out[:, rows], want)
  print(json.dumps({"device": jax.devices()[0].device_kind,
                    "jax": jax.__version__, "mechanism": _MECHANISM.value,
                    "shape": [b, s, h, d], "causal": _CAUSAL.value,
                    "error": error}))
  if not error <= TOL:
    raise SystemExit(f"output error {error:.3g} > {TOL}: not profiled")
  if _LIST.value:
    total = collections.Counter()
    for (_, name), durations in timing.traced_kernel_times(
        lambda: step(q, k, v, dout), 1).items():
      total[name] += sum(durations)
    for name, us in total.most_common():
      print(f"{us:10.1f} us  {name}")
    return
  for _ in range(_RUNS.value):
    jax.block_until_ready(step(q, k, v, dout))


if __name__ == "__main__":
  app.run(main)
