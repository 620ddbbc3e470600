"""Checks the compiled `flash` kernels against the reference, then times them.

One command on the GPU machine (see benchmarks/flash_notes.md):

  python3 benchmarks/flash_probe.py --out=$OUT/flash_probe.json

1. Correctness: outputs and dq/dk/dv (and dbias) of the compiled Triton
   kernels against the float32 reference, for a few shapes and features.
2. Only if the bf16 cases pass: forward and forward+backward timing at
   B*S = 16k tokens, H = 16, D = 128, S = 4096, causal and not, with cuDNN
   (and JAX's in-tree Pallas-Triton kernel, while it imports) in the same
   process; TFLOP/s as BENCH.md counts them; then a small launch sweep.
"""

from __future__ import annotations

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import flexible_attention as fa
from flexible_attention.comparison import timing
from flexible_attention.core import dropout as dropout_lib
from flexible_attention.kernels import flash_triton as ft

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_BUDGET = flags.DEFINE_float("budget_s", 330.0,
                             "Stop sweeping after this many seconds.")
_CHECK = flags.DEFINE_bool("check", True, "Run the correctness cases.")
_TIME = flags.DEFINE_bool("time", True, "Run the timings.")
_SWEEP = flags.DEFINE_bool("sweep", True, "Run the launch sweep.")
_REPEATS = flags.DEFINE_integer("repeats", 30, "Timed runs per cell.")
_SEQ = flags.DEFINE_integer("seq", 4096, "S of the timed cells.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "B * S of the timed cells.")
_QUICK = flags.DEFINE_bool(
    "quick", False, "A few correctness cases, no DCE check, and a backward "
    "sweep only (for a short device call).")

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


def _timed(f, q, k, v, ct):
  fwd = jax.jit(f)

  def run(q, k, v, ct):
    out, vjp = jax.vjp(f, q, k, v)
    return vjp(ct)

  return _bench(fwd, q, k, v), _bench(jax.jit(run), q, k, v, ct)


def timing(results, sweep: bool):
  s, h, d = _SEQ.value, 16, 128
  b = max(1, _TOKENS.value // s)
  rng = np.random.default_rng(1)
  mk = lambda: jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.bfloat16)
  q, k, v, ct = mk(), mk(), mk(), mk()
  rows = results.setdefault("timing", [])
  for causal in (False, True):
    flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
    tf = lambda t, m=1.0: m * flops / t / 1e12

    def flash(q, k, v, launch=None, causal=causal):
      inputs = fa.canonicalize(q, k, v, causal=causal)
      return ft.flash_attention(inputs, None, sm_scale=d**-0.5,
                                launch=launch).out

    def cudnn(q, k, v, causal=causal):
      return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                          implementation="cudnn")

    cells = [("flash (default)", flash), ("cudnn", cudnn)]
    try:
      if _QUICK.value:
        raise ImportError("skipped in --quick")
      from jax.experimental.pallas.ops.gpu import attention as jax_pallas  # pylint: disable=g-import-not-at-top

      def in_tree(q, k, v, causal=causal):
        return jax_pallas.mha(q, k, v, None, sm_scale=d**-0.5, causal=causal)

      cells.append(("jax in-tree pallas", in_tree))
    except Exception as e:  # pylint: disable=broad-except
      print(f"in-tree pallas unavailable: {e}")
    for name, f in cells:
      try:
        t_fwd, t_all = _timed(f, q, k, v, ct)
        row = dict(mechanism=name, causal=causal, S=s, B=b, H=h, D=d,
                   fwd_ms=t_fwd * 1e3, fwd_bwd_ms=t_all * 1e3,
                   fwd_tflops=tf(t_fwd), fwd_bwd_tflops=tf(t_all, 3.5))
      except Exception as e:  # pylint: disable=broad-except
        row = dict(mechanism=name, causal=causal, error=str(e)[:500])
      print(row, flush=True)
      rows.append(row)
      _save(results)
    if sweep and not (_QUICK.value and causal):
      base = ft.default_launch_config(d)
      L = ft.Launch
      fwd_launches = [L(128, 64, 4, 3), L(128, 128, 8, 3), L(128, 64, 8, 3),
                      L(64, 64, 4, 3), L(128, 32, 4, 3)]
      bwd_launches = [(L(64, 128, 8, 3), L(128, 64, 8, 3)),
                      (L(32, 128, 4, 3), L(128, 32, 4, 3)),
                      (L(64, 64, 4, 3), L(64, 64, 4, 3)),
                      (L(128, 128, 8, 2), L(128, 128, 8, 2)),
                      (L(64, 128, 4, 2), L(128, 64, 4, 2))]
      if _QUICK.value:
        fwd_launches = []
        bwd_launches = [(L(32, 128, 4, 3), base.dq),
                        (base.dkv, L(128, 32, 4, 3)),
                        (L(64, 128, 4, 3), base.dq),
                        (L(32, 128, 8, 3), base.dq)]
      for fl in fwd_launches:
        if time.time() - _START > _BUDGET.value:
          break
        cfg = ft.LaunchConfig(fl, base.dkv, base.dq)
        try:
          t = _bench(jax.jit(lambda q, k, v, c=cfg: flash(q, k, v, c)),
                     q, k, v)
          row = dict(mechanism="flash sweep fwd", causal=causal,
                     launch=str(fl), fwd_ms=t * 1e3, fwd_tflops=tf(t))
        except Exception as e:  # pylint: disable=broad-except
          row = dict(mechanism="flash sweep fwd", launch=str(fl),
                     error=str(e)[:300])
        print(row, flush=True)
        rows.append(row)
      for dkv, dq in bwd_launches:
        if time.time() - _START > _BUDGET.value:
          break
        cfg = ft.LaunchConfig(base.fwd, dkv, dq)
        try:
          _, t = _timed(lambda q, k, v, c=cfg: flash(q, k, v, c), q, k, v,
                        ct)
          row = dict(mechanism="flash sweep bwd", causal=causal,
                     launch=f"dkv={dkv} dq={dq}", fwd_bwd_ms=t * 1e3,
                     fwd_bwd_tflops=tf(t, 3.5))
        except Exception as e:  # pylint: disable=broad-except
          row = dict(mechanism="flash sweep bwd", launch=f"{dkv} {dq}",
                     error=str(e)[:300])
        print(row, flush=True)
        rows.append(row)
        _save(results)
  results["timing"] = rows
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


def main(argv):
  del argv
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
    rows = timing(results, _SWEEP.value)
    print("\n| mechanism | causal | launch | fwd TFLOP/s | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|")
    for r in rows:
      if "error" in r:
        continue
      fwd = r.get("fwd_tflops")
      all_ = r.get("fwd_bwd_tflops")
      print(f"| {r['mechanism']} | {r['causal']} | {r.get('launch', '')} | "
            f"{'' if fwd is None else f'{fwd:.0f}'} | "
            f"{'' if all_ is None else f'{all_:.0f}'} |")
  elif _TIME.value:
    print("bf16 correctness failed: no timing.")
  _save(results)
  print(f"total {time.time() - _START:.0f}s")


if __name__ == "__main__":
  app.run(main)
