"""Times `flash` with its Triton and Mosaic GPU kernels against cuDNN.

One command on a Hopper GPU (see benchmarks/flash_notes.md):

  python3 benchmarks/flash_backends.py --cells=128:4096:full,128:4096:causal \\
      --out=$OUT/flash_backends.json

Per cell (bf16, B * S = `--tokens`, H * D = 2048), forward+backward
(`jax.vjp` of the output, jitted) of:

- `triton`: every kernel through Triton (`fwd_backend="triton"`);
- `mosaic_fwd`: the Mosaic GPU forward, Triton backward;
- `mosaic_fwd_dkv`: the Mosaic GPU forward and dK/dV kernels, Triton dQ;
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`.

Each variant's output and dq/dk/dv are first checked against the float32
XLA reference on the first batch row and `--check_heads` heads (attention
is independent per row and head, so this bounds the reference's memory);
a variant off by more than the bf16 tolerance is not timed. Then all are
timed round-robin (`timing.median_seconds_each`), so drifts of the device
fall on all alike. Ratios printed are cuDNN's time over each variant's.
"""

from __future__ import annotations

import dataclasses

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import flexible_attention as fa
from flexible_attention import timing
from flexible_attention.comparison import compare
from flexible_attention.comparison import report
from flexible_attention.kernels import flash as flash_kernel

_CELLS = flags.DEFINE_list(
    "cells", ["128:4096:full", "128:4096:causal", "64:4096:full"],
    "Cells, `D:S:full` or `D:S:causal`.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "B * S.")
_CHECK_HEADS = flags.DEFINE_integer("check_heads", 4,
                                    "Heads checked against the reference.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Samples per timing.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_INTERPRET = flags.DEFINE_bool(
    "interpret", False, "Only the Triton variant, in Pallas' interpreter (a "
    "CPU smoke test of this script: Mosaic GPU and cuDNN have no CPU path, "
    "and the timings then mean nothing).")

TOL = 2e-2  # bf16, relative to the largest entry (flash_probe.py's).


def _flash(d: int, causal: bool, fwd: str, dkv: str):
  launch = flash_kernel.default_launch_config(d, causal, 9.0)
  if fwd == "mosaic":
    launch = dataclasses.replace(launch, fwd=flash_kernel.mosaic_launch(d),
                                 fwd_backend="mosaic")
  if dkv == "mosaic":
    launch = dataclasses.replace(launch, dkv=flash_kernel.mosaic_dkv_launch(d),
                                 dkv_backend="mosaic")

  def attend(q, k, v):
    inputs = fa.canonicalize(q, k, v, causal=causal)
    return flash_kernel.flash_attention(inputs, sm_scale=d**-0.5,
                                        launch=launch,
                                        interpret=_INTERPRET.value).out
  return attend


def _variants(d: int, causal: bool) -> dict:
  variants = {"triton": _flash(d, causal, "triton", "triton")}
  if not _INTERPRET.value:
    variants.update(
        mosaic_fwd=_flash(d, causal, "mosaic", "triton"),
        mosaic_fwd_dkv=_flash(d, causal, "mosaic", "mosaic"),
        cudnn=lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"))
  return variants


def _cell(d: int, s: int, causal: bool) -> dict:
  b, h = max(1, _TOKENS.value // s), 2048 // d
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, dout = (jax.random.normal(key, (b, s, h, d), jnp.bfloat16)
                   for key in keys)
  part = lambda x: x[:1, :, :_CHECK_HEADS.value].astype(jnp.float32)
  reference = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, implementation="xla")
  ref_out, ref_vjp = jax.vjp(reference, part(q), part(k), part(v))
  ref_grads = ref_vjp(part(dout))

  row = dict(D=d, S=s, B=b, H=h, causal=causal, error={}, fwd_bwd_ms={})
  calls = []
  for name, attend in _variants(d, causal).items():
    # The vjp's call runs the forward and the backward: what is timed.
    forward_backward = jax.jit(lambda q, k, v, dout, attend=attend: jax.vjp(
        attend, q, k, v)[1](dout))
    got = (jax.jit(attend)(q, k, v), *forward_backward(q, k, v, dout))
    error = max(compare.relative_error(part(x), want)
                for x, want in zip(got, (ref_out, *ref_grads)))
    row["error"][name] = error
    if error <= TOL:
      calls.append((name, forward_backward))
  seconds = timing.median_seconds_each(
      [(fn, (q, k, v, dout)) for _, fn in calls], repeats=_REPEATS.value)
  for (name, _), t in zip(calls, seconds):
    row["fwd_bwd_ms"][name] = t * 1e3
  return row


def main(argv):
  del argv
  rows = []
  for cell in _CELLS.value:
    d, s, mask = cell.split(":")
    rows.append(_cell(int(d), int(s), mask == "causal"))
    report.write_probe_rows(_OUT.value, rows)
  print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}; "
        "forward+backward ms (cuDNN's time over each)")
  print("| D | S | mask | " + " | ".join(rows[0]["error"]) + " |")
  print("|---|---|---|" + "---|" * len(rows[0]["error"]))
  for r in rows:
    cudnn = r["fwd_bwd_ms"].get("cudnn")
    cells = []
    for name in r["error"]:
      t = r["fwd_bwd_ms"].get(name)
      cells.append("-" if t is None else f"{t:.3f}" + (
          f" ({cudnn / t:.2f})" if cudnn else ""))
    print(f"| {r['D']} | {r['S']} | {'causal' if r['causal'] else 'full'} | "
          + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
