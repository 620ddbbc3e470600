"""Where a decoding call's time goes on the GPU: a kernel-by-kernel profile.

For each cell (`--cells=B:L:cache:new`, e.g. `8:4096:dense:1`, cache `dense`
or `paged<size>`; H/Hkv, D and dtype from the flags), the program the decode
benchmark times (`comparison.decode.step_fn`: `create_attention(...)(q, k,
v, cache=cache, causal=True)` inside `hk.transform`, jitted with the cache
donated and fed back) is checked against the float32 reference
(`comparison.decode.reference_output`), timed (median of `--repeats`), then
run `--calls` times under `jax.profiler.trace` (a Perfetto trace). The
trace's device events are summed per name and thread (XLA's op lines and
the stream's kernels) and divided by the calls: microseconds per call of
each kernel, their sum (busy time) and the wall time per call (the
difference: launches and gaps between kernels).

  python3 benchmarks/decode_trace.py --out=$OUT/decode_trace.json
  python3 benchmarks/decode_trace.py --smoke   # CPU: interpreted, tiny

Prints one JSON line per cell, then a table per cell.
"""

from __future__ import annotations

import collections
import json

from absl import app
from absl import flags
import jax
import numpy as np

from flexible_attention import timing
from flexible_attention.comparison import compare
from flexible_attention.comparison import decode

_CELLS = flags.DEFINE_list(
    "cells", ["8:4096:dense:1", "8:4096:paged16:1", "64:4096:dense:1",
              "1:131072:dense:1"], "B:L:cache:new of each cell.")
_HEADS = flags.DEFINE_string("heads", "32/8", "H/Hkv.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "D.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "The cache's dtype.")
_MECHANISM = flags.DEFINE_string("mechanism", "flash", "What serves the call.")
_CALLS = flags.DEFINE_integer("calls", 20, "Calls inside the trace.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timing samples.")
_TOP = flags.DEFINE_integer("top", 12, "Rows per thread in the table.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny cell, interpreted (CPU).")

TOL = 2e-2  # bf16 against the float32 reference, relative to its largest.


def _profile(cell: decode.DecodeCell) -> dict:
  """One cell: checked, timed, traced."""
  options = {"interpret": True} if _SMOKE.value else {}
  fn = jax.jit(decode.step_fn(_MECHANISM.value, cell, options=options),
               donate_argnums=0)
  cache, q, k, v = decode.cell_inputs(cell)
  want = decode.reference_output(cell, cache, q, k, v)
  out, cache = fn(cache, q, k, v)
  error = compare.relative_error(out, want)
  row = dict(cell=cell.name, error=error)
  if not error <= TOL:
    return dict(row, status=f"fail: error {error:.3g} > {TOL}")
  holder = {"cache": cache}
  call = decode.FedBack(holder, fn, q, k, v)
  wall = timing.median_seconds_each([(call, ())],
                                   repeats=_REPEATS.value)[0] * 1e6
  events = timing.traced_kernel_times(call, _CALLS.value)
  kernels = sorted(
      ({"thread": thread, "name": name,
        "per_call": len(durs) / _CALLS.value,
        "us_per_call": sum(durs) / _CALLS.value}
       for (thread, name), durs in events.items()),
      key=lambda r: (r["thread"], -r["us_per_call"]))
  busy = {}
  for r in kernels:
    busy[r["thread"]] = busy.get(r["thread"], 0.0) + r["us_per_call"]
  return dict(row, status="ok", wall_us=wall, busy_us_per_thread=busy,
              kernels=kernels, kv_tbps=cell.kv_bytes / wall / 1e6)


def _table(row: dict) -> str:
  lines = [f"{row['cell']}: wall {row['wall_us']:.1f} us per call, "
           f"{row['kv_tbps']:.2f} TB/s of K/V, error {row['error']:.2g}"]
  shown = collections.Counter()
  for r in row["kernels"]:
    if shown[r["thread"]] >= _TOP.value:
      continue
    shown[r["thread"]] += 1
    lines.append(f"  {r['thread'][:24]:24s} {r['per_call']:5.1f}x "
                 f"{r['us_per_call']:9.2f} us  {r['name'][:90]}")
  for thread, busy in row["busy_us_per_thread"].items():
    lines.append(f"  {thread[:24]:24s} busy {busy:.1f} us per call")
  return "\n".join(lines)


def main(argv):
  del argv
  num_heads, num_kv_heads = (int(x) for x in _HEADS.value.split("/"))
  specs = ["2:64:dense:1"] if _SMOKE.value else _CELLS.value
  head_dim = 16 if _SMOKE.value else _HEAD_DIM.value
  print(json.dumps({"device": jax.devices()[0].device_kind,
                    "jax": jax.__version__}))
  rows = []
  for spec in specs:
    batch, length, cache, new = spec.split(":")
    cell = decode.DecodeCell(
        batch=int(batch), length=int(length),
        num_heads=2 if _SMOKE.value else num_heads,
        num_kv_heads=1 if _SMOKE.value else num_kv_heads,
        head_dim=head_dim, dtype="float32" if _SMOKE.value else _DTYPE.value,
        cache=cache, new_tokens=int(new))
    try:
      row = _profile(cell)
    except Exception as e:  # pylint: disable=broad-except
      row = dict(cell=cell.name, status=f"{type(e).__name__}: {e}"[:500])
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "kernels"}))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind,
                 "jax": jax.__version__, "rows": rows}, f, indent=1)
  for row in rows:
    if row["status"] == "ok":
      print(_table(row))
  failed = [row["cell"] for row in rows if row["status"] != "ok"]
  if failed:
    raise SystemExit(f"not profiled: {failed}")


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  app.run(main)
