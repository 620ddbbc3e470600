"""flash's decode kernel alone against a hand-written XLA decode, on a GPU.

One command on the GPU machine:

  python3 benchmarks/decode_probe.py --out=$OUT/decode_probe.json

Per cell (bf16, H = 32, Hkv = 8, D = 128, caches filled to L tokens per
row): the kernel (`kernels/flash/decode.decode_attention`, default launch)
on a dense cache (the copy-free page view) and on paged caches with a
shuffled page table, and the XLA decode (einsum of the queries against the
whole dense cache, a length mask, softmax, einsum with V). Each is first
checked against a float32 einsum reference on the first two rows (a wrong
kernel is not timed), then timed (`timing.median_seconds_each`, all rows of
a cell round-robin). Reported: µs per call and the bytes of K and V the
call must read (2 B L Hkv D itemsize) per second, as TB/s and as a fraction
of the card's peak. The cache write is not in this probe (the decode
benchmark times whole module calls with the donated cache). Small cells
need `--calls_per_program` (16, say): one call's dispatch from the host
(~50 µs on an H100) hides a kernel of a few µs.
"""

from __future__ import annotations


from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from flexible_attention import timing
from flexible_attention.comparison import decode as decode_bench
from flexible_attention.comparison import report
from flexible_attention.kernels.flash import decode
from flexible_attention.kernels import flash as flash_kernel

_CELLS = flags.DEFINE_list(
    "cells", ["8:4096", "64:4096", "8:32768", "1:131072", "8:131072"],
    "Cells `B:L`.")
_NEW = flags.DEFINE_list("new_tokens", ["1", "4"], "New tokens per row.")
_PAGES = flags.DEFINE_list("page_sizes", ["dense", "16", "128"],
                           "`dense`, a page size (a shuffled table) or a "
                           "page size and `seq` (pages in order).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Samples per timing.")
_SWEEP = flags.DEFINE_list(
    "sweep", ["triton", "mosaic"], "Launches to time: a backend's default "
    "(`triton`, `mosaic`) or `triton:warps:stages:block_tokens:factor`, "
    "`mosaic:block_tokens:stages:factor[:producers]` (factor multiplies "
    "the default split count; 0 keeps it).")
_CALLS = flags.DEFINE_integer(
    "calls_per_program", 1, "Calls per timed program: more than 1 runs them "
    "in one jitted `lax.fori_loop`, each call's queries depending on the "
    "previous output, and reports the time per call without the host's "
    "dispatch (at B = 1, L = 4k one dispatch takes longer than the kernel).")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")

H, HKV, D = 32, 8, 128
TOL = 2e-2  # bf16, relative to the largest reference entry.
PEAK_TBS = {"NVIDIA H200": 4.8, "NVIDIA H100 80GB HBM3": 3.35}


def _xla_decode(q, keys, values, lengths, q_pos, scale):
  """`[B, Sq, H, D]` against a dense `[B, L, Hkv, D]` cache, by einsums."""
  b, sq, h, d = q.shape
  hkv = keys.shape[2]
  qg = q.reshape(b, sq, hkv, h // hkv, d)
  s = jnp.einsum("bqkgd,blkd->bkgql", qg, keys,
                 preferred_element_type=jnp.float32) * scale
  t = jnp.arange(keys.shape[1])
  visible = (t[None, None, :] < lengths[:, None, None]) & (
      t[None, None, :] <= q_pos[:, :, None])  # [B, Sq, L]
  s = jnp.where(visible[:, None, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(values.dtype)
  out = jnp.einsum("bkgql,blkd->bqkgd", p, values,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, sq, h, -1).astype(q.dtype)


def _looped(fn, calls: int):
  """`fn(q, *rest) -> out` run `calls` times in one jitted program, as the
  decode benchmark loops its calls (`comparison.decode.looped`: each call's
  queries depend on the previous output, so none is hoisted or merged)."""
  if calls == 1:
    return fn
  step = lambda rest, q, k, v: (fn(q, *rest), rest)
  program = jax.jit(decode_bench.looped(step, calls))
  return lambda q, *rest: program(rest, q, None, None)[0]


def _cell(batch, length, new, page, rng):
  key = jax.random.key(int(rng.integers(1 << 30)))
  kq, kk, kv = jax.random.split(key, 3)
  keys = jax.random.normal(kk, (batch, length, HKV, D), jnp.bfloat16)
  values = jax.random.normal(kv, (batch, length, HKV, D), jnp.bfloat16)
  q = jax.random.normal(kq, (batch, new, H, D), jnp.bfloat16)
  lengths = jnp.full((batch,), length, jnp.int32)
  q_pos = lengths[:, None] - new + jnp.arange(new, dtype=jnp.int32)
  scale = D**-0.5
  if page == "dense":
    key_pages, value_pages, table = decode.dense_as_pages(keys, values)
  else:
    # `16` a shuffled table, `16seq` pages in order (the dense layout read
    # through a table: what the table costs apart from the pages' spread).
    ps = int(page.removesuffix("seq"))
    per_row = length // ps
    order = (np.arange(batch * per_row) if page.endswith("seq") else
             rng.permutation(batch * per_row))
    table = jnp.asarray(order.reshape(batch, per_row), jnp.int32)
    # Page p holds the tokens the table sends to it.
    inverse = np.argsort(order)
    key_pages = keys.reshape(batch * per_row, ps, HKV, D)[inverse]
    value_pages = values.reshape(batch * per_row, ps, HKV, D)[inverse]

  def kernel_with(launch: str):
    """`backend[:fields...]`: `triton:warps:stages:block_tokens:factor` or
    `mosaic:block_tokens:stages:factor[:producers]` (factor multiplies the
    default split count; 0 keeps it)."""
    backend, *fields = launch.split(":")
    fields = [int(x) for x in fields]
    ps = key_pages.shape[1]
    options = dict(backend=backend)
    if backend == "triton" and fields:
      warps, stages, tokens, factor = fields
      default = flash_kernel.decode_launch(batch, HKV, table.shape[1], ps, D)
      options.update(num_warps=warps, num_stages=stages,
                     pages_per_block=max(1, tokens // ps))
    elif backend == "mosaic" and fields:
      tokens, stages, factor, *producers = fields
      default = flash_kernel.mosaic_decode_launch(batch, HKV, table.shape[1], ps, D)
      options.update(block_tokens=tokens, stages=stages)
      if producers:
        options.update(producers=producers[0])
    else:
      factor = 0
    if factor:
      options["num_splits"] = max(1, default.num_splits * factor)
    return jax.jit(lambda q, kp, vp, tb, n, qp: decode.decode_attention(
        q, kp, vp, tb, n, qp, sm_scale=scale, **options).out)

  xla = jax.jit(lambda q, k, v, n, qp: _xla_decode(q, k, v, n, qp, scale))
  want = _xla_decode(q[:2].astype(jnp.float32), keys[:2].astype(jnp.float32),
                     values[:2].astype(jnp.float32), lengths[:2], q_pos[:2],
                     scale)
  rows = []
  bytes_read = 2 * batch * length * HKV * D * 2
  kernel_args = (q, key_pages, value_pages, table, lengths, q_pos)
  candidates = [(f"flash decode {launch}", kernel_with(launch), kernel_args)
                for launch in _SWEEP.value]
  candidates.append(("xla einsum", xla, (q, keys, values, lengths, q_pos)))
  calls = _CALLS.value
  candidates = [(name, _looped(fn, calls), args)
                for name, fn, args in candidates]
  for name, fn, args in candidates:
    if name == "xla einsum" and page != "dense":
      continue
    got = fn(*args)[:2].astype(jnp.float32)
    error = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    row = dict(mechanism=name, B=batch, L=length, new_tokens=new,
               cache=page, error=error, bytes=bytes_read)
    row["status"] = "ok" if error <= TOL else "differs: not timed"
    rows.append((row, fn, args))
  timed = [(fn, args) for row, fn, args in rows if row["status"] == "ok"]
  seconds = iter(timing.median_seconds_each(timed, repeats=_REPEATS.value))
  for row, _, _ in rows:
    if row["status"] == "ok":
      t = next(seconds) / calls
      row["us"] = t * 1e6
      row["tb_s"] = bytes_read / t / 1e12
  return [row for row, _, _ in rows]


def main(argv):
  del argv
  device = jax.devices()[0]
  peak = PEAK_TBS.get(device.device_kind)
  rng = np.random.default_rng(0)
  results = []
  for cell in _CELLS.value:
    batch, length = (int(x) for x in cell.split(":"))
    for page in _PAGES.value:
      for new in _NEW.value:
        results += _cell(batch, length, int(new), page, rng)
        report.write_probe_rows(_OUT.value, results,
                                calls_per_program=_CALLS.value, H=H,
                                Hkv=HKV, D=D, dtype="bfloat16")
  print(f"\n{device.device_kind}, jax {jax.__version__}, bf16, H {H}, "
        f"Hkv {HKV}, D {D}")
  print("| B | L | new | cache | mechanism | error | us | TB/s | of peak |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in results:
    tbs = r.get("tb_s")
    frac = f"{tbs / peak:.0%}" if tbs and peak else "-"
    print(f"| {r['B']} | {r['L']} | {r['new_tokens']} | {r['cache']} | "
          f"{r['mechanism']} | {r['error']:.1e} | "
          f"{r.get('us', float('nan')):.1f} | "
          f"{tbs if tbs is None else round(tbs, 2)} | {frac} |")


if __name__ == "__main__":
  app.run(main)
