"""The Mosaic GPU backwards on Hopper: checked, then timed.

Five variants of the backward (forward and dK/dV through Mosaic GPU in
each):

- `split`: dQ through the Triton kernel (the default launches below 16k
  keys, except where the fused one serves by default: `launch.
  FUSED_DQ_MIN_KV_LEN`);
- `fused`: `LaunchConfig(dkv_backend="mosaic", atomic_dq=True)`, dQ inside
  the Mosaic GPU dK/dV kernel (per step and program, each consumer
  reduce-adds a `[64, Dp / 2]` tile: its half of dQ's columns over the
  program's 128 keys; padded D of 64 and 128; issue 17, part 1), in int32
  fixed point (`deterministic_dq`: the same bits whatever the order of the
  adds; `mosaic_numerics.fixed_point_scales`);
- `fused_rotated`: `fused` with `rotate_dq=True` (each program whose
  query tiles are all unmasked walks them from its key tile's index on:
  the programs running at once add into different dQ tiles);
- `fused_any`: the same as `fused` with `deterministic_dq=False`: float32 adds,
  landing in the order the programs run;
- `mosaic_dq`: `LaunchConfig(dq_backend="mosaic")`, dQ through its own
  Mosaic GPU kernel (`mosaic_dq`; padded D of 64 and 128; the default
  from 16k keys where the fused one does not serve by default).

Each variant's launch is explicit (`_launch`), whatever the default
launches pick for the cell.

On an H200 (`--variants` picks them, all four by default):

  python3 benchmarks/fused_bwd_probe.py --variants=split,mosaic_dq \
      --out=$OUT/dq.json

(`--variants=split,mosaic_dq,fused,fused_any` with `--checks=d128_causal`
and four cells fits a 10-minute call.)

1. Checks (one JSON line each): out, dq, dk, dv (and dsinks) of each
   variant against the float32 reference (bf16 inputs; error = max |x -
   ref| / max |ref|, tolerance 1.5e-2, the test suite's bf16 GPU one), at
   D = 64 and 128, causal and not, grouped heads with a window and soft cap,
   and sinks. Each variant runs twice: dK and dV must be
   bitwise equal run to run, dQ too except `fused_any`'s (its adds land
   in the order the programs run: float32 rounding, within the tolerance).
   A check that raises prints its exception type and message and the
   others still run.
2. Only when every check passed (or with `--time_anyway`): forward+backward
   (the `jax.vjp` call, jitted; median of `--repeats` samples round-robin
   after warm-up, `timing.median_seconds_each`) of each variant and cuDNN
   (`jax.nn.dot_product_attention(implementation="cudnn")`, as XLA
   compiles it by default, and `cudnn_deterministic`: compiled with
   `xla_gpu_deterministic_ops`, which has XLA ask cuDNN for its
   deterministic backward), at B * S = 16k, H * D = 2048, bf16; a table
   last, each variant's time over split's. Each timed cell also records
   whether each function's dQ, dK and dV (cuDNN's too) are bitwise equal
   over two more calls (`bitwise_run_to_run`): there a dQ tile takes the
   adds of up to S / 128 key tiles.

`--fixed_point=fma` puts `fma_fixed_point` in place of the kernel's
conversion (`mosaic_numerics.to_fixed_point`, as `mosaic_bwd` calls it)
for the whole process: the same
rounding of `x s` in 4 float32 and 2 int32 operations per dQ element
(three of them fused multiply-adds) instead of 7 and 2. Time it against
`--fixed_point=round` in separate processes, A B A B; cuDNN, re-run in
each, gives the processes a common reference. (On an H100 the two were
within 1.3% either way, inside cuDNN's own spread between processes: the
kernel keeps `round_to_int32`; benchmarks/BENCHMARKS.md.)

`--out` is rewritten after every row: a run stopped by a time limit keeps
the rows it finished.

Off a GPU, `--smoke` exercises the script: each check's Mosaic programs
(fused, mosaic_dq) are lowered for CUDA (the whole Mosaic GPU lowering
runs), and the comparisons and the timing run at tiny shapes on the
interpreted Triton kernels (the Triton `atomic_dq` backward standing for
the fused one, the split one for mosaic_dq: the same functions).
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

from jax import lax

import flexible_attention as fa
from flexible_attention import timing
from flexible_attention.comparison import compare
from flexible_attention.kernels import flash as flash_kernel
from flexible_attention.kernels import gpu
from flexible_attention.kernels.flash import mosaic_bwd
from flexible_attention.kernels.flash import mosaic_numerics

VARIANTS = ("split", "fused", "mosaic_dq", "fused_any", "fused_rotated")

_SMOKE = flags.DEFINE_bool(
    "smoke", False, "Tiny shapes, no GPU: lower the Mosaic programs for "
    "CUDA, run the comparisons and timing on the interpreted Triton kernels.")
_VARIANTS = flags.DEFINE_list(
    "variants", list(VARIANTS),
    f"The backwards to check and time, of {VARIANTS} (split: Triton dQ; "
    "fused: dQ in the Mosaic dK/dV kernel, in a fixed order; mosaic_dq: "
    "the Mosaic dQ kernel; fused_any: fused, in any order; "
    "fused_rotated: fused, each unmasked program from its own query tile).")
_CELLS = flags.DEFINE_list(
    "cells", [f"{d}:{s}:{m}" for d in (64, 128) for s in (4096, 16384)
              for m in ("full", "causal")],
    "Timed cells, `D:S:full` or `D:S:causal`.")
_FIXED_POINT = flags.DEFINE_enum(
    "fixed_point", "round", ["round", "fma"], "The fused backward's int32 "
    "conversion: the kernel's own (`round`) or `fma_fixed_point`.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "B * S of a timed cell.")
_WIDTH = flags.DEFINE_integer("width", 2048, "H * D of a timed cell.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timing samples (>= 20).")
_CHECKS = flags.DEFINE_list(
    "checks", None, "The checks to run before timing (all by default); a "
    "subset when the others passed at the same commit in an earlier run.")
_TIME_ANYWAY = flags.DEFINE_bool("time_anyway", False,
                                 "Time even when a check failed.")
_CUDNN_DETERMINISTIC = flags.DEFINE_bool(
    "cudnn_deterministic", True, "Also time cuDNN compiled with XLA's "
    "`xla_gpu_deterministic_ops` (`cudnn_deterministic`): its backward's "
    "deterministic algorithm, the like-for-like baseline of flash's default "
    "(bitwise reproducible) backward.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results "
                           "(rewritten after every row).")

# XLA options of the timed functions compiled with other than the defaults.
COMPILER_OPTIONS = {"cudnn_deterministic": {"xla_gpu_deterministic_ops": True}}

TOL = 1.5e-2  # bf16 on a GPU (tests/helpers.TOLERANCES["gpu"]).

# name: the check's call (`fa.canonicalize`'s structure and the shape).
# Lengths that are not multiples of the tiles pad rows and keys.
CHECKS = {
    "d64_full": dict(d=64),
    "d64_causal": dict(d=64, causal=True, sq=900, sk=1000),
    "d128_full": dict(d=128, sq=1000, sk=1100),
    "d128_causal": dict(d=128, causal=True),
    "d64_gqa_window_softcap": dict(d=64, h=8, hkv=2, causal=True,
                                   sliding_window=(200, 0), softcap=30.0,
                                   sq=1000, sk=1100),
    "d128_gqa_window_softcap": dict(d=128, h=8, hkv=2, causal=True,
                                    sliding_window=(200, 0), softcap=30.0,
                                    sq=1000, sk=1100),
    "d128_sinks_kv_lengths": dict(d=128, h=8, hkv=2, causal=True, sinks=True,
                                  kv_lengths=True),
    "d64_sinks": dict(d=64, h=4, hkv=4, sinks=True),
}
SMOKE_SHAPE = dict(b=1, sq=40, sk=48, d=16)  # Interpreted: any D.


def _launch(d: int, causal: bool, *, variant: str,
            interpret: bool = False) -> flash_kernel.LaunchConfig:
  """A variant's Hopper launches: the Mosaic forward, Mosaic dK/dV with dQ
  in it (`fused`), through Triton (`split`) or through the Mosaic dQ kernel
  (`mosaic_dq`). To `interpret`, the Triton kernels, `atomic_dq` (in any
  order) for either fused variant."""
  fused = variant in ("fused", "fused_any", "fused_rotated")
  if interpret:
    return dataclasses.replace(
        flash_kernel.default_launch_config(d, causal, 9.0), atomic_dq=fused,
        deterministic_dq=not fused)
  dq = {"split": "triton", "mosaic_dq": "mosaic"}.get(variant, "fused")
  return dataclasses.replace(flash_kernel.hopper_launch_config(
      d, causal, dq=dq, deterministic_dq=variant != "fused_any"),
                             rotate_dq=variant == "fused_rotated")


def fma_fixed_point(x, scale):
  """`mosaic_numerics.to_fixed_point`'s value (`x * scale` rounded to the
  nearest int32, ties to even; `scale` a power of two, `|x scale| < 2^31 -
  2^9`) in three multiply-adds, one add and two int32 operations.

  With M = 1.5 2^23 (a float32 whose bits, plus an integer n below 2^22
  in magnitude, are those of M + n): `t = x (scale / 512) + M` holds `hi =
  round(x scale / 512)` (`x scale / 512` is exact: a power of two); `c =
  t (-512) + 512 M` is exactly `-512 hi`; `lo = x scale + c` is exactly
  `x scale - 512 hi` (at most 256 in magnitude, a multiple of `x scale`'s
  ulp in 24 bits); `round(lo)` comes out of `lo + M`'s bits. Then
  `round(x scale) = 512 hi + round(lo)` (512 hi is even: the ties agree),
  in int32. The barrier keeps t's rounding from being folded away."""
  # The kernel's own magic number and its bits (`round_to_int32`'s).
  magic = jnp.float32(mosaic_numerics._MAGIC)  # pylint: disable=protected-access
  magic_bits = mosaic_numerics._MAGIC_BITS  # pylint: disable=protected-access
  t = lax.optimization_barrier(x * (scale * jnp.float32(2.0**-9)) + magic)
  c = t * jnp.float32(-512.0) + jnp.float32(512.0) * magic
  lo = x * scale + c
  bits = lambda f: lax.bitcast_convert_type(f, jnp.int32)
  offset = (magic_bits * 513 + 2**31) % 2**32 - 2**31  # As an int32.
  return bits(t) * 512 + bits(lo + magic) - jnp.int32(offset)


def _attention(spec: dict, launch, kv_lengths, interpret: bool = False):
  """`(q, k, v, sinks) -> (out, lse)` of flash with `launch` (its Triton
  kernels interpreted with `interpret`), or of the float32 reference
  (`launch=None`)."""
  call = {key: spec[key] for key in ("causal", "sliding_window")
          if key in spec}
  scale, softcap = spec["d"]**-0.5, spec.get("softcap")

  def attend(q, k, v, sinks):
    inputs = fa.canonicalize(q, k, v, kv_lengths=kv_lengths, sinks=sinks,
                             **call)
    if launch is None:
      return fa.reference_attention(
          inputs.query, inputs.key, inputs.value, None, inputs.visibility,
          sm_scale=scale, softcap=softcap, sinks=inputs.sinks)[:2]
    return flash_kernel.flash_attention(
        inputs, sm_scale=scale, softcap=softcap, launch=launch,
        interpret=interpret)[:2]
  return attend


def _check_inputs(name: str, spec: dict):
  """Random `(q, k, v, sinks, dout, kv_lengths)` of a check, bf16 (sinks
  float32, or None)."""
  b, h, hkv, d = spec["b"], spec["h"], spec["hkv"], spec["d"]
  sq, sk = spec["sq"], spec["sk"]
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  sinks = (jnp.asarray(rng.standard_normal(h), jnp.float32)
           if spec.get("sinks") else None)
  kv_lengths = (jnp.asarray([sk - sk // 8 - 1] + [sk] * (b - 1), jnp.int32)
                if spec.get("kv_lengths") else None)
  return (arr(b, sq, h, d), arr(b, sk, hkv, d), arr(b, sk, hkv, d), sinks,
          arr(b, sq, h, d), kv_lengths)


def _vjp(attend):
  """`(q, k, v, sinks, dout) -> (out, dq, dk, dv, dsinks)`, jitted."""
  def run(q, k, v, sinks, dout):
    out, pullback = jax.vjp(lambda *a: attend(*a)[0], q, k, v, sinks)
    return (out, *pullback(dout.astype(out.dtype)))
  return jax.jit(run)


def _errors(got, want) -> dict:
  names = ("out", "dq", "dk", "dv", "dsinks")
  return {name: compare.relative_error(x, w)
          for name, x, w in zip(names, got, want) if w is not None}


def _flash(spec: dict, kv_lengths, *, variant: str, interpret: bool):
  """A check's flash `(q, k, v, sinks) -> (out, lse)` with a variant's
  backward."""
  launch = _launch(spec["d"], spec.get("causal", False), variant=variant,
                   interpret=interpret)
  return _attention(spec, launch, kv_lengths, interpret)


def _compare(name: str, spec: dict) -> dict:
  """Runs each variant (twice) and the reference on one check."""
  q, k, v, sinks, dout, kv_lengths = _check_inputs(name, spec)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  want = _vjp(_attention(spec, None, kv_lengths))(
      f32(q), f32(k), f32(v), sinks, f32(dout))
  row = dict(errors={}, run_to_run={})
  ok = True
  for variant in _VARIANTS.value:
    run = _vjp(_flash(spec, kv_lengths, variant=variant,
                      interpret=_SMOKE.value))
    try:
      got, again = run(q, k, v, sinks, dout), run(q, k, v, sinks, dout)
    except Exception as e:  # pylint: disable=broad-except
      row["errors"][variant] = dict(type=type(e).__name__,
                                    message=str(e)[:500])
      ok = False
      continue
    errors = _errors(got, want)
    # A race moves results from run to run: dK's and dV's sums have a fixed
    # order (bitwise equal), dQ's too except fused_any's (float32 rounding
    # of its adds, in the order the programs run).
    equal = {grad: bool(np.array_equal(np.asarray(a), np.asarray(b)))
             for grad, a, b in zip(("dq", "dk", "dv"), again[1:4], got[1:4])}
    dq_run_to_run = compare.relative_error(again[1], got[1])
    steady = (equal["dk"] and equal["dv"] and dq_run_to_run <= TOL
              if variant == "fused_any" else all(equal.values()))
    ok = ok and steady and all(e <= TOL for e in errors.values())
    row["errors"][variant] = errors
    row["run_to_run"][variant] = dict(bitwise_equal=equal,
                                      dq_relative=dq_run_to_run)
  row["status"] = "ok" if ok else "fail"
  return row


def _lower(name: str, spec: dict) -> dict:
  """Lowers the check's forward+backward of each Mosaic variant (fused,
  mosaic_dq) for CUDA; the Mosaic GPU kernels of each."""
  q, k, v, sinks, dout, kv_lengths = _check_inputs(name, spec)
  kernels = {}
  for variant in _VARIANTS.value:
    if variant == "split":
      continue
    attend = _flash(spec, kv_lengths, variant=variant, interpret=False)

    def run(q, k, v, sinks, dout, attend=attend):
      return jax.vjp(lambda *a: attend(*a)[0], q, k, v, sinks)[1](dout)

    with gpu.lowering_target():
      text = jax.jit(run).trace(q, k, v, sinks, dout).lower(
          lowering_platforms=("cuda",)).as_text()
    kernels[variant] = text.count("stablehlo.custom_call @mosaic_gpu")
  return dict(lowered_for_cuda=True, mosaic_kernels=kernels)


def _check(name: str, spec: dict) -> dict:
  """One check's JSON row (its exception's type and message if it
  raises)."""
  spec = dict(dict(b=2, sq=1024, sk=1024, h=4, hkv=4), **spec)
  row = dict(check=name, **{key: spec[key] for key in (
      "b", "sq", "sk", "h", "hkv", "d")})
  try:
    if _SMOKE.value:  # Lowered at the shape above, compared at this one.
      row.update(_lower(name, spec), compared_at=SMOKE_SHAPE)
      spec.update(SMOKE_SHAPE)
    row.update(_compare(name, spec))
  except Exception as e:  # pylint: disable=broad-except
    row.update(status="error", type=type(e).__name__, message=str(e)[:500])
  print(json.dumps(row), flush=True)
  return row


def _variants(d: int, causal: bool) -> dict:
  """The timed functions, `(q, k, v) -> out`."""
  flash = lambda variant: (lambda q, k, v: _flash(
      dict(d=d, causal=causal), None, variant=variant,
      interpret=_SMOKE.value)(q, k, v, None)[0])
  variants = {variant: flash(variant) for variant in _VARIANTS.value}
  if not _SMOKE.value:
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn")
    variants["cudnn"] = cudnn
    if _CUDNN_DETERMINISTIC.value:
      variants["cudnn_deterministic"] = cudnn
  return variants


def _time(d: int, s: int, causal: bool) -> dict:
  tokens, width = ((256, 64) if _SMOKE.value else
                   (_TOKENS.value, _WIDTH.value))
  b, h = max(1, tokens // s), max(1, width // d)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, dout = (jax.random.normal(key, (b, s, h, d), jnp.bfloat16)
                   for key in keys)
  # The vjp's call runs the forward and the backward: what is timed. Each
  # is compiled first; one that fails is left out of the cell (named).
  compiled, errors = {}, {}
  for name, attend in _variants(d, causal).items():
    try:
      compiled[name] = jax.jit(lambda q, k, v, dout, attend=attend: jax.vjp(
          attend, q, k, v)[1](dout)).lower(q, k, v, dout).compile(
              compiler_options=COMPILER_OPTIONS.get(name))
    except Exception as e:  # pylint: disable=broad-except
      errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
  seconds = timing.median_seconds_each(
      [(fn, (q, k, v, dout)) for fn in compiled.values()],
      repeats=2 if _SMOKE.value else _REPEATS.value)
  row = dict(D=d, S=s, B=b, H=h, causal=causal, fwd_bwd_ms={
      name: t * 1e3 for name, t in zip(compiled, seconds)})
  row["bitwise_run_to_run"] = {
      name: all(bool(jnp.array_equal(a, b)) for a, b in zip(
          fn(q, k, v, dout), fn(q, k, v, dout)))
      for name, fn in compiled.items()}
  if errors:
    row["errors"] = errors
  return row


def _table(rows: list[dict]) -> str:
  """One line per timed cell: each function's ms, each variant's over
  split's."""
  names = list(dict.fromkeys(n for r in rows for n in r["fwd_bwd_ms"]))
  ratios = [n for n in names if n != "split"] if "split" in names else []
  ms_of = lambda ms, n: f"{ms[n]:.3f}" if n in ms else "-"
  ratio_of = lambda ms, n: (f"{ms[n] / ms['split']:.3f}"
                            if n in ms and "split" in ms else "-")
  lines = [f"{jax.devices()[0].device_kind}, jax {jax.__version__}; "
           "forward+backward ms (x / split: < 1 is faster than split)",
           "| D | S | mask | " + " | ".join(names) + " | "
           + "".join(f"{n} / split | " for n in ratios),
           "|---|---|---|" + "---|" * (len(names) + len(ratios))]
  for r in rows:
    ms = r["fwd_bwd_ms"]
    lines.append(f"| {r['D']} | {r['S']} | "
                 f"{'causal' if r['causal'] else 'full'} | "
                 + " | ".join(ms_of(ms, n) for n in names) + " | "
                 + "".join(f"{ratio_of(ms, n)} | " for n in ratios))
  return "\n".join(line.rstrip() for line in lines)


def _write(results: dict):
  """Rewrites `--out` with the rows so far."""
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind,
                     jax=jax.__version__, variants=_VARIANTS.value,
                     fixed_point=_FIXED_POINT.value, **results), f, indent=1)


def main(argv):
  del argv
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown or not _VARIANTS.value:
    raise app.UsageError(f"--variants takes names of {VARIANTS}, got "
                         f"{_VARIANTS.value}.")
  if _FIXED_POINT.value == "fma":  # Before anything is traced.
    mosaic_bwd.to_fixed_point = fma_fixed_point
  print(json.dumps({"devices": str(jax.devices()), "jax": jax.__version__,
                    "variants": _VARIANTS.value,
                    "fixed_point": _FIXED_POINT.value}), flush=True)
  checks = list(CHECKS) if _CHECKS.value is None else _CHECKS.value
  unknown = sorted(set(checks) - set(CHECKS))
  if unknown:
    raise app.UsageError(f"--checks takes names of {tuple(CHECKS)}, got "
                         f"{unknown}.")
  results = dict(checks=[], timing=[])
  for name in checks:
    spec = CHECKS[name]
    results["checks"].append(_check(name, spec))
    _write(results)
  passed = all(row["status"] == "ok" for row in results["checks"])
  if passed or _TIME_ANYWAY.value:
    cells = ["16:128:full", "16:128:causal"] if _SMOKE.value else _CELLS.value
    for cell in cells:
      d, s, mask = cell.split(":")
      try:
        row = _time(int(d), int(s), mask == "causal")
        results["timing"].append(row)
      except Exception as e:  # pylint: disable=broad-except
        row = dict(cell=cell, status="error", type=type(e).__name__,
                   message=str(e)[:500])
        results.setdefault("timing_errors", []).append(row)
      print(json.dumps(row), flush=True)
      _write(results)
  if results["timing"]:
    print("\n" + _table(results["timing"]))
  else:
    print("\nNot timed: a check failed (see its row; --time_anyway times "
          "regardless).")


if __name__ == "__main__":
  app.run(main)
