"""flash with dropout on Hopper: the Mosaic GPU kernels, checked, then timed.

Dropout runs in every Mosaic GPU kernel of `flash` (forward, dK/dV, dQ:
`mosaic_common.TileDropout`, the library's hash). On an H200:

  python3 benchmarks/dropout_probe.py --out=$OUT/dropout.json

1. Checks (one JSON line each): out, dq, dk, dv of the Mosaic kernels
   (forward, dK/dV and the Mosaic dQ kernel, all asked for explicitly)
   against the float32 reference with the same dropout (bf16 inputs; error =
   max |x - ref| / max |ref|, tolerance 1.5e-2), at D = 64, 128 and 256,
   causal and not, grouped heads.
2. Only when every check passed: forward+backward (the vjp's call, jitted;
   median of `--repeats` samples round-robin) at B * S = 16k, H * D = 2048,
   bf16, rate 0.1, causal and not: the default launches with dropout
   (Mosaic on Hopper), the Triton kernels with dropout (what served it
   before), and the default launches without dropout; a table last.
"""

from __future__ import annotations

import dataclasses
import json
import zlib

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import flexible_attention as fa
from flexible_attention import timing
from flexible_attention.comparison import compare
from flexible_attention.core import dropout as dropout_lib
from flexible_attention.kernels import flash as flash_kernel

_CELLS = flags.DEFINE_list(
    "cells", ["128:4096:causal", "128:16384:causal", "128:16384:full",
              "64:16384:causal"], "Timed cells, `D:S:full` or `D:S:causal`.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timing samples.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")

TOL = 1.5e-2
RATE = 0.1
CHECKS = {  # name: (d, causal, h, hkv, sq, sk)
    "d128_causal_gqa": (128, True, 4, 2, 900, 1000),
    "d128_full": (128, False, 2, 2, 640, 640),
    "d64_causal": (64, True, 2, 1, 520, 700),
    "d256_causal": (256, True, 2, 2, 384, 384),
}


def _launch(d: int, causal: bool, backend: str | None):
  """Every kernel through `backend` ("mosaic", "triton"), or the defaults
  (None)."""
  launch = flash_kernel.default_launch_config(d, causal, 9.0)
  if backend == "triton":
    return dataclasses.replace(launch, fwd_backend="triton",
                               dkv_backend="triton", dq_backend="triton")
  if backend is None:
    return None
  launch = dataclasses.replace(
      launch, fwd=flash_kernel.mosaic_launch(d), fwd_backend="mosaic",
      dkv=flash_kernel.mosaic_dkv_launch(d), dkv_backend="mosaic")
  if d < 256:
    launch = dataclasses.replace(launch, dq=flash_kernel.mosaic_dq_launch(d),
                                 dq_backend="mosaic")
  return launch


def _attend(d: int, causal: bool, dropout, launch, reference=False):
  def attend(q, k, v):
    inputs = fa.canonicalize(q, k, v, causal=causal)
    if reference:
      return fa.reference_attention(
          inputs.query, inputs.key, inputs.value, None, inputs.visibility,
          dropout, sm_scale=d**-0.5).out
    return flash_kernel.flash_attention(inputs, dropout, sm_scale=d**-0.5,
                                        launch=launch).out
  return attend


def _vjp(attend):
  def run(q, k, v, dout):
    out, pullback = jax.vjp(attend, q, k, v)
    return (out, *pullback(dout.astype(out.dtype)))
  return jax.jit(run)


def _check(name: str) -> dict:
  d, causal, h, hkv, sq, sk = CHECKS[name]
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  q, k, v, dout = arr(2, sq, h, d), arr(2, sk, hkv, d), arr(2, sk, hkv, d), \
      arr(2, sq, h, d)
  dropout = dropout_lib.make_dropout(jax.random.key(1), RATE)
  row = dict(check=name, d=d, causal=causal, h=h, hkv=hkv, sq=sq, sk=sk)
  try:
    f32 = lambda x: x.astype(jnp.float32)
    want = _vjp(_attend(d, causal, dropout, None, reference=True))(
        f32(q), f32(k), f32(v), f32(dout))
    got = _vjp(_attend(d, causal, dropout, _launch(d, causal, "mosaic")))(
        q, k, v, dout)
    row["errors"] = {n: compare.relative_error(x, w) for n, x, w in
                     zip(("out", "dq", "dk", "dv"), got, want)}
    row["status"] = ("ok" if all(e <= TOL for e in row["errors"].values())
                     else "fail")
  except Exception as e:  # pylint: disable=broad-except
    row.update(status="error", type=type(e).__name__, message=str(e)[:500])
  print(json.dumps(row), flush=True)
  return row


def _time(cell: str) -> dict:
  d, s, mask = cell.split(":")
  d, s, causal = int(d), int(s), mask == "causal"
  b, h = max(1, 16384 // s), max(1, 2048 // d)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, dout = (jax.random.normal(key, (b, s, h, d), jnp.bfloat16)
                   for key in keys)
  dropout = dropout_lib.make_dropout(jax.random.key(1), RATE)
  variants = {"mosaic_dropout": _attend(d, causal, dropout, None),
              "triton_dropout": _attend(d, causal, dropout,
                                        _launch(d, causal, "triton")),
              "no_dropout": _attend(d, causal, None, None)}
  compiled = {name: jax.jit(lambda q, k, v, dout, f=f: jax.vjp(f, q, k, v)[1](
      dout)).lower(q, k, v, dout).compile() for name, f in variants.items()}
  seconds = timing.median_seconds_each(
      [(fn, (q, k, v, dout)) for fn in compiled.values()],
      repeats=_REPEATS.value)
  row = dict(cell=cell, B=b, H=h, fwd_bwd_ms={
      n: t * 1e3 for n, t in zip(compiled, seconds)})
  print(json.dumps(row), flush=True)
  return row


def main(argv):
  del argv
  results = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                 rate=RATE, checks=[], timing=[])
  write = lambda: _OUT.value and open(_OUT.value, "w").write(
      json.dumps(results, indent=1))
  for name in CHECKS:
    results["checks"].append(_check(name))
    write()
  if not all(r["status"] == "ok" for r in results["checks"]):
    print("Not timed: a check failed.")
    return
  for cell in _CELLS.value:
    results["timing"].append(_time(cell))
    write()
  print(f"\n{results['device']}, jax {results['jax']}; forward+backward ms, "
        f"dropout {RATE}\n| cell | Mosaic, dropout | Triton, dropout | "
        "no dropout | Mosaic over Triton | dropout's cost |\n|---|---|---|---|"
        "---|---|")
  for r in results["timing"]:
    t = r["fwd_bwd_ms"]
    print(f"| {r['cell']} | {t['mosaic_dropout']:.3f} | "
          f"{t['triton_dropout']:.3f} | {t['no_dropout']:.3f} | "
          f"{t['triton_dropout'] / t['mosaic_dropout']:.2f}x | "
          f"{t['mosaic_dropout'] / t['no_dropout']:.2f}x |")


if __name__ == "__main__":
  app.run(main)
