"""Sinks on a GPU: flash's compiled kernels against the float32 reference,
and the cost of sinks in flash's forward+backward (issue 16).

Prints one JSON line per check. Run on a GPU machine:
  python3 benchmarks/sinks_probe.py
Off a GPU the kernels run in Pallas' interpreter (`--smoke`: small shapes, no
timing), which checks the script, not the compiled kernels. The cost is
timed round-robin against the sinkless program at S = 4k and 16k, causal
and not (B = 1, H/Hkv = 32/8, D = 128, bf16), each program's output
checked at the timed shape first.
"""

import json
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import flexible_attention as fa
from flexible_attention import timing as timing_lib
from flexible_attention.core import inputs as inputs_lib
from flexible_attention.core import reference
from flexible_attention.kernels.flash import launch as launch_lib

INTERPRET = jax.default_backend() != "gpu"


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _fn(mechanism, h, hkv, d, kv_lengths, **options):
  def f(q, k, v, sinks):
    attn = fa.create_attention(mechanism, num_heads=h, head_dim=d,
                               num_kv_heads=hkv, interpret=INTERPRET,
                               **options)
    r = attn(q, k, v, causal=True, kv_lengths=kv_lengths, sinks=sinks,
             return_lse=True)
    return r.attention_outputs, r.lse
  return hk.without_apply_rng(hk.transform(f)).apply


def _ref(h, hkv, d, kv_lengths):
  def f(q, k, v, sinks):
    rec = inputs_lib.canonicalize(q, k, v, causal=True, kv_lengths=kv_lengths,
                                  sinks=sinks)
    r = reference.reference_attention(rec.query, rec.key, rec.value, None,
                                      rec.visibility, sm_scale=d**-0.5,
                                      sinks=rec.sinks)
    return r.out, r.lse
  return f


def _vg(f, *args):
  def loss(*a):
    out, lse = f(*a)
    out32 = out.astype(jnp.float32)
    return jnp.sum(out32 * jnp.cos(out32)) + jnp.sum(jnp.sin(lse)), (out, lse)
  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
  return out, lse, grads


def check(dtype, b=2, s=512, h=8, hkv=2, d=128):
  rng = np.random.default_rng(0)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q, k, v, sinks = arr(b, s, h, d), arr(b, s, hkv, d), arr(b, s, hkv, d), arr(h)
  kvl = jnp.asarray([s - s // 8 - 1] + [0] * (b - 1), jnp.int32)
  want = _vg(_ref(h, hkv, d, kvl), q, k, v, sinks)
  cast = lambda x: x.astype(dtype)
  got = _vg(lambda q, k, v, sk: _fn("flash", h, hkv, d, kvl)({}, q, k, v, sk),
            cast(q), cast(k), cast(v), sinks)
  launch = launch_lib.choose_launch(
      dtype=dtype, head_dim=d, value_dim=d, q_len=s, kv_len=s, causal=True,
      bias=False, mask=False, precision=None,
      interpret=INTERPRET,
      block_sizes=None, launch=None, float32_results=False,
      groups=h // hkv)
  row = {"check": "flash", "dtype": jnp.dtype(dtype).name,
         "fwd_backend": launch.fwd_backend,
         "dkv_backend": launch.dkv_backend,
         "out": _rel(got[0], want[0]), "lse": _rel(got[1], want[1]),
         "empty_row_out_max": float(jnp.max(jnp.abs(
             got[0][1].astype(jnp.float32)))),
         "empty_row_lse_err": float(jnp.max(jnp.abs(got[1][1] -
                                                    sinks[:, None])))}
  for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got[2], want[2]):
    row[name] = _rel(g.astype(jnp.float32), w)
  print(json.dumps(row), flush=True)


def check_decode(dtype, b=2, length=256, new=2, h=8, hkv=2, d=128):
  rng = np.random.default_rng(1)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q, k, v, sinks = (arr(b, new, h, d), arr(b, length, hkv, d),
                    arr(b, length, hkv, d), arr(h))
  cache = fa.init_cache(b, length, hkv, d, dtype)
  old = length - new
  cache = cache._replace(
      keys=cache.keys.at[:, :old].set(k[:, :old].astype(dtype)),
      values=cache.values.at[:, :old].set(v[:, :old].astype(dtype)),
      lengths=jnp.full((b,), old, jnp.int32))

  def f(q, kn, vn, sinks):
    attn = fa.create_attention("flash", num_heads=h, head_dim=d,
                               num_kv_heads=hkv, interpret=INTERPRET)
    r = attn(q, kn, vn, cache=cache, causal=True, sinks=sinks,
             return_lse=True)
    return r.attention_outputs, r.lse

  apply = hk.without_apply_rng(hk.transform(f)).apply
  got = _vg(lambda *a: apply({}, *a), q.astype(dtype),
            k[:, old:].astype(dtype), v[:, old:].astype(dtype), sinks)
  full = jnp.full((b,), length, jnp.int32)
  want = _vg(lambda q, kn, vn, sk: _ref(h, hkv, d, full)(
      q, k.at[:, old:].set(kn), v.at[:, old:].set(vn), sk), q, k[:, old:],
             v[:, old:], sinks)
  row = {"check": "flash_decode", "dtype": jnp.dtype(dtype).name,
         "out": _rel(got[0], want[0]), "lse": _rel(got[1], want[1]),
         "dq": _rel(got[2][0].astype(jnp.float32), want[2][0]),
         "dsinks": _rel(got[2][3], want[2][3])}
  print(json.dumps(row), flush=True)


def timing(cells=((4096, True), (4096, False), (16384, True),
                  (16384, False)), b=1, h=32, hkv=8, d=128, repeats=20):
  """The cost of sinks in flash's forward+backward, per `(S, causal)` cell.

  The output with sinks (random logits) is first checked at the timed
  shape against the sinkless output times `sigmoid(lse_off - sink)` per
  row (the semantics: the sink adds `exp(sink)` to the denominator); the
  kernels themselves are checked against the float32 reference by
  `check`, at smaller shapes. Then both are timed round-robin in shuffled order
  (`timing.median_seconds_each`), so that drifts of the device fall on
  both alike.
  """
  rng = np.random.default_rng(2)
  for s, causal in cells:
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    q, k, v = arr(b, s, h, d), arr(b, s, hkv, d), arr(b, s, hkv, d)
    sinks = jnp.asarray(rng.normal(size=(h,)), jnp.float32)

    def forward(q, k, v, sk, causal=causal):
      attn = fa.create_attention("flash", num_heads=h, head_dim=d,
                                 num_kv_heads=hkv, interpret=INTERPRET)
      r = attn(q, k, v, causal=causal, sinks=sk, return_lse=True)
      return r.attention_outputs, r.lse

    apply = hk.without_apply_rng(hk.transform(forward)).apply
    fwd = jax.jit(lambda q, k, v, sk: apply({}, q, k, v, sk))
    out_off, lse_off = fwd(q, k, v, None)
    out_on, _ = fwd(q, k, v, sinks)
    gate = jax.nn.sigmoid(lse_off - sinks[None, :, None])  # [B, H, S]
    want = out_off.astype(jnp.float32) * jnp.swapaxes(gate, 1, 2)[..., None]
    err = _rel(out_on.astype(jnp.float32), want)
    row = {"check": "timing_fwd_bwd_ms", "B": b, "S": s, "H": h, "Hkv": hkv,
           "D": d, "causal": causal, "out_on_vs_gated_off": err}
    if not err < 2e-2:
      print(json.dumps({**row, "error": "sinks output wrong; not timed"}),
            flush=True)
      continue

    def step(q, k, v, sk):
      return jax.grad(lambda q, k, v, sk: jnp.sum(apply(
          {}, q, k, v, sk)[0].astype(jnp.float32)),
                      argnums=(0, 1, 2))(q, k, v, sk)

    step_off = jax.jit(lambda q, k, v: step(q, k, v, None))
    step_on = jax.jit(step)
    off, on = timing_lib.median_seconds_each(
        [(step_off, (q, k, v)), (step_on, (q, k, v, sinks))],
        repeats=repeats)
    print(json.dumps({**row, "off": off * 1e3, "on": on * 1e3,
                      "overhead": on / off - 1}), flush=True)


if __name__ == "__main__":
  print(json.dumps({"devices": str(jax.devices()), "jax": jax.__version__}))
  if "--smoke" in sys.argv:
    check(jnp.float32, s=32, h=4, d=16)
    check_decode(jnp.float32, length=32, h=4, d=16)
    timing(cells=((64, True),), h=4, hkv=2, d=16, repeats=2)
  else:
    for dtype in (jnp.float32, jnp.bfloat16):
      check(dtype)
    check_decode(jnp.bfloat16)
    timing()
