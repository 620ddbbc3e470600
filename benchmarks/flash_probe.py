"""Checks the compiled `flash` kernels against the reference, then tunes them.

One command on the GPU machine (see benchmarks/flash_notes.md):

  python3 benchmarks/flash_probe.py --out=$OUT/flash_probe.json

1. Correctness: outputs and dq/dk/dv (and dbias) of the compiled Triton
   kernels against the float32 reference, for a few shapes and features
   (and that the bias-gradient launch is dropped when unused).
2. Only if the bf16 cases pass: the launch sweep (`tune`), each kernel's
   candidate tiles / warps / stages timed alone at B*S = 16k tokens,
   S = 4096, H*D = 2048, bf16, each checked against the float32 reference
   first. The mechanism comparisons (flash vs cuDNN, XLA, JAX's in-tree
   Pallas kernel) are `scripts/benchmark.py`'s.
"""

from __future__ import annotations

import functools
import json
import re
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import flexible_attention as fa
from flexible_attention import timing
from flexible_attention.core import dropout as dropout_lib
from flexible_attention.kernels import flash as ft

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_BUDGET = flags.DEFINE_float("budget_s", 330.0,
                             "Stop sweeping after this many seconds.")
_CHECK = flags.DEFINE_bool("check", True, "Run the correctness cases.")
_TIME = flags.DEFINE_bool("time", True, "Run the launch sweep.")
_REPEATS = flags.DEFINE_integer("repeats", 30, "Timed runs per cell.")
_SEQ = flags.DEFINE_integer("seq", 4096, "S of the timed cells.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "B * S of the timed cells.")
_INTERPRET = flags.DEFINE_bool(
    "interpret", False, "Run the kernels in Pallas' interpreter (a CPU smoke "
    "test of this script; the timings then mean nothing).")
_CELLS = flags.DEFINE_list(
    "cells", ["128:full", "128:causal", "64:full", "256:full"],
    "Sweep cells, `D:full` or `D:causal`.")
_KERNELS = flags.DEFINE_list(
    "kernels", ["fwd", "dkv", "dq", "atomic"],
    "Which kernels' launches to sweep (`atomic`: the dK/dV launches with "
    "`atomic_dq`, the backward as one kernel).")
_MAX_CANDIDATES = flags.DEFINE_integer(
    "max_candidates", 0, "Time only the first this many candidate launches "
    "of each kernel (the default first); 0: all.")
_LAUNCHES = flags.DEFINE_list(
    "launches", [], "Instead of the candidate lists: time each kernel's "
    "default launch and these, written kernel:QxK/warps/stages (e.g. "
    "fwd:128x64/8/2, atomic:64x64/8/3).")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Only a few correctness cases and no DCE check before "
    "the sweep (for a short device call).")

_START = time.time()
TOL = {"bfloat16": 2e-2, "float16": 3e-3, "float32": 5e-3}


def _rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  if not np.all(np.isfinite(a)):
    return float("inf")
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _case(name, rng, *, b=2, sq=1024, sk=1024, h=8, hkv=8, d=128, dv=None,
          dtype=jnp.bfloat16, call=None, softcap=None, bias_shape=None,
          dropout_rate=None, blocks=None):
  dv = dv or d
  q = jnp.asarray(rng.standard_normal((b, sq, h, d)) * 2, dtype)
  k = jnp.asarray(rng.standard_normal((b, sk, hkv, d)), dtype)
  v = jnp.asarray(rng.standard_normal((b, sk, hkv, dv)), dtype)
  ct = jnp.asarray(rng.standard_normal((b, sq, h, dv)), dtype)
  bias = None
  if bias_shape is not None:
    bias = jnp.asarray(rng.standard_normal(bias_shape), dtype)
  call = dict(call or {})
  for key, make in list(call.items()):
    if callable(make):
      call[key] = make(b, sq, sk)
  drop = None
  if dropout_rate:
    drop = dropout_lib.make_dropout(jax.random.key(7), dropout_rate)
  scale = d**-0.5

  def flash(q, k, v, bias):
    inputs = fa.canonicalize(q, k, v, bias=bias, **call)
    return ft.flash_attention(inputs, drop, sm_scale=scale, softcap=softcap,
                              block_sizes=blocks).out

  def ref(q, k, v, bias):
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    inputs = fa.canonicalize(f32(q), f32(k), f32(v), bias=f32(bias), **call)
    return fa.reference_attention(
        inputs.query, inputs.key, inputs.value, inputs.bias,
        inputs.visibility, drop, sm_scale=scale, softcap=softcap).out

  def fwd_bwd(f):
    def run(q, k, v, bias, ct):
      out, vjp = jax.vjp(f, q, k, v, bias)
      return (out,) + tuple(g for g in vjp(ct.astype(out.dtype))
                            if g is not None)
    return jax.jit(run)

  t0 = time.time()
  got = fwd_bwd(flash)(q, k, v, bias, ct)
  jax.block_until_ready(got)
  seconds = time.time() - t0
  want = fwd_bwd(ref)(q, k, v, bias, ct)
  names = ("out", "dq", "dk", "dv", "dbias")
  errors = {n: _rel(g, w) for n, g, w in zip(names, got, want)}
  tol = TOL[jnp.dtype(dtype).name]
  ok = all(e <= tol for e in errors.values())
  print(f"{'ok  ' if ok else 'FAIL'} {name:40s} " +
        " ".join(f"{n}={e:.1e}" for n, e in errors.items()) +
        f"  (compile+run {seconds:.1f}s)", flush=True)
  return dict(name=name, ok=ok, errors=errors, tol=tol)


def _segments(b, sq, sk):
  del sk
  rng = np.random.default_rng(3)
  ids = np.zeros((b, sq), np.int32)
  for row in range(b):
    cuts = np.sort(rng.choice(np.arange(1, sq), 5, replace=False))
    ids[row] = np.searchsorted(cuts, np.arange(sq), side="right")
  return jnp.asarray(ids)


def check(results):
  rng = np.random.default_rng(0)
  cases = [
      ("bf16 D128 plain", dict()),
      ("bf16 D128 causal", dict(call=dict(causal=True))),
      ("bf16 D128 gqa8/2 causal window(256,0)",
       dict(hkv=2, call=dict(causal=True, sliding_window=(256, 0)))),
      ("bf16 D64 segments causal",
       dict(d=64, call=dict(causal=True, segment_ids=_segments))),
      ("bf16 D256 causal", dict(d=256, h=4, hkv=4, call=dict(causal=True))),
      ("bf16 D96 Sq1000 Sk1200 kvlen softcap causal",
       dict(d=96, sq=1000, sk=1200, h=4, hkv=2, softcap=30.0,
            call=dict(causal=True,
                      kv_lengths=lambda b, sq, sk: jnp.array([0, 900])))),
      ("bf16 D128 bias[1,H,Sq,Sk] +dbias",
       dict(h=4, hkv=4, sq=512, sk=768, bias_shape=(1, 4, 512, 768))),
      ("bf16 D128 dropout0.1 causal",
       dict(dropout_rate=0.1, call=dict(causal=True))),
      ("bf16 D80 dense mask", dict(d=80, h=4, hkv=1, call=dict(
          mask=lambda b, sq, sk: jnp.asarray(
              np.random.default_rng(5).random((b, 1, sq, sk)) > 0.2)))),
      ("fp16 D128 causal", dict(dtype=jnp.float16, call=dict(causal=True))),
      ("f32 D64 causal", dict(dtype=jnp.float32, d=64, h=4, hkv=4,
                              call=dict(causal=True))),
  ]
  if _QUICK.value:
    keep = ("bf16 D128 causal", "bf16 D128 bias[1,H,Sq,Sk] +dbias",
            "bf16 D128 dropout0.1 causal")
    cases = [c for c in cases if c[0] in keep]
  out = []
  for name, kwargs in cases:
    try:
      out.append(_case(name, rng, **kwargs))
    except Exception as e:  # pylint: disable=broad-except
      print(f"ERROR {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
      out.append(dict(name=name, ok=False, error=f"{type(e).__name__}: {e}"))
  results["check"] = out
  return all(c["ok"] for c in out if c["name"].startswith("bf16"))


def _save(results):
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1, default=str)


def _bench(fn, *args):
  jax.block_until_ready(fn(*args))  # Compile.
  return timing.median_seconds(fn, *args, repeats=_REPEATS.value, warmup=3)


L = ft.Launch
# Candidate launches per padded head size: (forward, dK/dV, dQ) lists. The
# cell's default launch (`ft.default_launch_config`) is timed first, then
# these, without repeats. Tiles are block_q x block_k.
CANDIDATES = {
    64: ([L(128, 128, 4, 3), L(128, 64, 4, 3), L(128, 64, 4, 2),
          L(128, 128, 8, 3), L(64, 64, 4, 3), L(128, 32, 4, 3),
          L(64, 128, 4, 3), L(64, 64, 4, 4), L(64, 32, 4, 3)],
         [L(32, 128, 4, 3), L(64, 128, 4, 3), L(32, 128, 4, 5),
          L(64, 64, 4, 3), L(128, 128, 8, 2), L(64, 128, 8, 3),
          L(128, 64, 4, 3)],
         [L(128, 64, 4, 3), L(128, 32, 4, 3), L(128, 32, 4, 5),
          L(128, 128, 8, 3), L(64, 64, 4, 3), L(64, 128, 4, 3),
          L(64, 32, 4, 3), L(128, 64, 8, 3)]),
    128: ([L(128, 64, 4, 2), L(128, 64, 4, 3), L(128, 128, 8, 2),
           L(128, 128, 8, 3), L(64, 64, 4, 3), L(128, 32, 4, 3),
           L(64, 128, 4, 2)],
          [L(64, 128, 8, 2), L(32, 128, 4, 3), L(32, 128, 4, 4),
           L(32, 128, 4, 5), L(64, 128, 4, 2), L(64, 128, 4, 3),
           L(64, 64, 4, 3), L(128, 128, 8, 2), L(64, 128, 8, 3),
           L(32, 64, 4, 3)],
          [L(128, 64, 8, 2), L(128, 32, 4, 3), L(128, 32, 4, 5),
           L(128, 64, 4, 2), L(128, 64, 4, 3), L(64, 64, 4, 3),
           L(128, 128, 8, 2), L(64, 128, 4, 2), L(64, 32, 4, 3)]),
    256: ([L(64, 64, 4, 3), L(64, 64, 4, 2), L(64, 64, 8, 2),
           L(128, 64, 8, 2), L(64, 32, 4, 2), L(64, 32, 4, 3),
           L(32, 64, 4, 3), L(128, 32, 8, 2)],
          [L(64, 64, 8, 2), L(32, 64, 8, 2), L(32, 64, 8, 3),
           L(32, 32, 4, 2), L(32, 32, 8, 2), L(64, 32, 8, 2),
           L(64, 32, 4, 2)],
          [L(128, 32, 8, 2), L(64, 16, 4, 3), L(64, 32, 4, 2),
           L(128, 16, 8, 2), L(128, 32, 4, 2), L(64, 16, 4, 2),
           L(128, 16, 4, 3)]),
}


_LAUNCH_RE = re.compile(r"(fwd|dkv|dq|atomic):(\d+)x(\d+)/(\d+)/(\d+)")


def _parse_launches(kernel):
  """The `--launches` of one kernel as `Launch`es."""
  launches = []
  for entry in _LAUNCHES.value:
    match = _LAUNCH_RE.fullmatch(entry)
    if match is None:
      raise app.UsageError(
          f"--launches: {entry!r} is not kernel:QxK/warps/stages with kernel "
          "fwd, dkv, dq or atomic (e.g. fwd:128x64/8/2).")
    if match[1] not in _KERNELS.value:
      raise app.UsageError(f"--launches: {entry!r} names a kernel not in "
                           f"--kernels={','.join(_KERNELS.value)}.")
    if match[1] == kernel:
      launches.append(L(*map(int, match.groups()[1:])))
  return launches


def _default_first(default, candidates):
  """`candidates` with `default` first and no launch twice."""
  return [default] + [c for c in candidates if c != default]


def _tune_cell(rows, d, causal):
  """Times each candidate launch of each kernel alone at one grid cell.

  The forward and backward passes are timed without the custom_vjp
  (`ft.forward_pass` / `ft.backward_pass`), one kernel's launch varied at a
  time (the others at their defaults: the backward's time is dK/dV + dQ, so
  the best of each list is the best pair). Every launch's result is checked
  against the float32 reference before it is timed.
  """
  s = _SEQ.value
  b, h = max(1, _TOKENS.value // s), 2048 // d
  rng = np.random.default_rng(1)
  mk = lambda: jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.bfloat16)
  q, k, v, dout = mk(), mk(), mk(), mk()
  flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
  f32 = lambda x: x.astype(jnp.float32)
  ref_inputs = fa.canonicalize(f32(q), f32(k), f32(v), causal=causal)

  def reference(q, k, v):
    return fa.reference_attention(q, k, v, None, ref_inputs.visibility,
                                  sm_scale=d**-0.5).out

  ref_out, ref_vjp = jax.vjp(reference, ref_inputs.query, ref_inputs.key,
                             ref_inputs.value)
  ref_grads = ref_vjp(f32(dout))
  default = ft.default_launch_config(d, causal)
  prepare = functools.partial(ft.prepare, sm_scale=d**-0.5,
                              interpret=_INTERPRET.value)
  out, lse = jax.jit(lambda q, k, v: ft.forward_pass(prepare(
      fa.canonicalize(q, k, v, causal=causal), launch=default))[:2])(q, k, v)
  fwd_cands, dkv_cands, dq_cands = (
      _default_first(first, c)[:_MAX_CANDIDATES.value or None]
      for first, c in zip((default.fwd, default.dkv, default.dq),
                          CANDIDATES[d]))
  if _LAUNCHES.value:
    fwd_cands, dkv_cands, dq_cands = [default.fwd], [default.dkv], [default.dq]
    atomic_cands = [default.dkv] + _parse_launches("atomic")
    fwd_cands += _parse_launches("fwd")
    dkv_cands += _parse_launches("dkv")
    dq_cands += _parse_launches("dq")
  else:
    atomic_cands = dkv_cands
  trials = ([("fwd", ft.LaunchConfig(c, default.dkv, default.dq))
             for c in fwd_cands] +
            [("dkv", ft.LaunchConfig(default.fwd, c, default.dq))
             for c in dkv_cands] +
            [("dq", ft.LaunchConfig(default.fwd, default.dkv, c))
             for c in dq_cands] +
            # One backward kernel: dK/dV tiles that also add dQ atomically.
            [("atomic", ft.LaunchConfig(default.fwd, c, default.dq,
                                        atomic_dq=True))
             for c in atomic_cands])
  trials = [t for t in trials if t[0] in _KERNELS.value]
  for kernel, config in trials:
    if time.time() - _START > _BUDGET.value:
      print("budget spent: stopping the sweep", flush=True)
      return
    launch = config.dkv if kernel == "atomic" else getattr(config, kernel)
    row = dict(D=d, causal=causal, S=s, B=b, H=h, kernel=kernel,
               launch=f"{launch.block_q}x{launch.block_k}/"
                      f"{launch.num_warps}w/{launch.num_stages}s",
               default=config == default)
    try:
      if kernel == "fwd":
        fn = jax.jit(lambda q, k, v, c=config: ft.forward_pass(prepare(
            fa.canonicalize(q, k, v, causal=causal), launch=c)).out)
        args = (q, k, v)
        row["error"] = _rel(fn(*args), ref_out)
      else:
        fn = jax.jit(lambda q, k, v, out, lse, dout, c=config: ft.
                     backward_pass(prepare(
                         fa.canonicalize(q, k, v, causal=causal), launch=c),
                                   out, lse, dout)[:3])
        args = (q, k, v, out, lse, dout)
        row["error"] = max(_rel(g, w) for g, w in zip(fn(*args), ref_grads))
      if row["error"] > TOL["bfloat16"]:
        row["status"] = "differs from the reference: not timed"
      else:
        t = _bench(fn, *args)
        row["ms"] = t * 1e3
        # Forward: its FLOPs; backward: 2.5x the forward's.
        row["tflops"] = (1.0 if kernel == "fwd" else 2.5) * flops / t / 1e12
        row["status"] = "ok"
    except Exception as e:  # pylint: disable=broad-except
      row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
    print(row, flush=True)
    rows.append(row)


def tune(results):
  """The launch sweep over `--cells` (B * S = `--tokens`, S = `--seq`,
  H * D = 2048, bf16)."""
  rows = results.setdefault("tune", [])
  for cell in _CELLS.value:
    d, kind = cell.split(":")
    _tune_cell(rows, int(d), kind == "causal")
    _save(results)
  print("\n| D | causal | kernel | launch | default | ms | TFLOP/s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    if r["status"] == "ok":
      print(f"| {r['D']} | {r['causal']} | {r['kernel']} | {r['launch']} | "
            f"{'*' if r['default'] else ''} | {r['ms']:.3f} | "
            f"{r['tflops']:.0f} |")
  return rows


def dce_check(results):
  """The bias-gradient launch must vanish when the bias needs no gradient."""
  q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  bias = jnp.zeros((1, 2, 256, 256), jnp.bfloat16)

  def loss(q, k, v, bias):
    inputs = fa.canonicalize(q, k, v, bias=bias)
    return jnp.sum(ft.flash_attention(inputs, None, sm_scale=0.125).out)

  counts = {}
  for name, argnums in (("grad q,k,v", (0, 1, 2)),
                        ("grad q,k,v,bias", (0, 1, 2, 3))):
    text = jax.jit(jax.grad(loss, argnums)).lower(q, q, q, bias).compile(
    ).as_text()
    counts[name] = text.count("__gpu$xla.gpu.triton")
  print("triton launches after XLA:", counts, flush=True)
  results["dce"] = counts


def _check_flags():
  """Bad `--launches` fail before any GPU time is spent."""
  if _LAUNCHES.value and _MAX_CANDIDATES.value:
    raise app.UsageError("--launches replaces the candidate lists: leave "
                         "--max_candidates at 0.")
  for kernel in ("fwd", "dkv", "dq", "atomic"):
    _parse_launches(kernel)


def main(argv):
  del argv
  _check_flags()
  results = dict(device=str(jax.devices()[0].device_kind),
                 jax=jax.__version__)
  print(results, flush=True)
  correct = True
  if _CHECK.value:
    correct = check(results)
    _save(results)
    try:
      if not _QUICK.value:
        dce_check(results)
    except Exception as e:  # pylint: disable=broad-except
      print("dce check failed:", e)
  if _TIME.value and correct:
    tune(results)
  elif _TIME.value:
    print("bf16 correctness failed: no timing.")
  _save(results)
  print(f"total {time.time() - _START:.0f}s")


if __name__ == "__main__":
  app.run(main)
