"""Differential fuzzing of flash's decode kernels against the float32 oracle.

`fuzz_mechanisms.py` draws whole calls through the modules, where a decode
call gets the default launch; this draws the decode kernel's own space:
the launch (splits, tokens per slot, slots, producer warpgroups; Triton's
pages per block, warps and stages), which the benchmarks sweep, together
with the call (batch, grouped heads, 1-16 new tokens, page size, a dense
cache's pages or a shuffled table with shared and unassigned pages, ragged
and empty rows, queries before the row's end, padded query slots, causal or
not, one- or two-sided windows, soft cap, sinks, rows that overflowed, or
the kernel's own overflow test with a bad table entry or a length past the
capacity). Each draw runs `decode.decode_attention` jitted and is compared
with `test_decode_kernel`'s oracle (the pages gathered into a dense cache,
`fa.reference_attention` in float32): outputs and log-sum-exps within the
dtype's tolerance, NaN (overflow) and -inf (no visible key) exactly where
the oracle has them. Forward only: a decode call's backward gathers the
pages and runs flash's general backward kernels with the forward's output
and log-sum-exp, whatever the decode launch; `fuzz_mechanisms.py`'s cache
calls check those gradients against the reference.

Backends: `mosaic` (bf16 / fp16; compiled on an sm_90 GPU, else in JAX's
GPU interpreter, jax 0.11: about 10 s a draw on 2 cores), `triton`
(compiled on a GPU, else Pallas' interpreter). A draw the kernel refuses
(`ValueError` / `NotImplementedError`: a launch past shared memory, a size
the backend lacks) is counted, not failed; anything else that raises, or
an error past the tolerance, is a failure.

  python tests/fuzz_decode_kernel.py --seeds 0:50 [--backend mosaic]
      [--verbose] [--show_refusals]

prints one line per failed seed and a summary; exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import sys
import traceback

import conftest  # noqa: F401  (XLA flags before jax: 8 CPU devices.)
import jax
import jax.numpy as jnp
import numpy as np

from flexible_attention.core import merge
from flexible_attention.kernels import flash as flash_kernel
from flexible_attention.kernels import gpu
from flexible_attention.kernels.flash import decode
import gpu_interpret
import test_decode_kernel as kernel_tests

HOPPER = 9.0 <= (gpu.compute_capability() or 0.0) < 10.0


@dataclasses.dataclass(frozen=True)
class Draw:
  """One call of the decode kernel (sizes, features, launch)."""
  backend: str
  dtype: str
  b: int
  sq: int
  h: int
  hkv: int
  d: int
  ps: int
  max_pages: int
  lengths: tuple[int, ...]
  dense: bool  # A dense cache's pages (no table).
  shared: int  # Pages rows 0 and 2 share.
  early: bool  # Queries end before the row's length.
  padded: bool  # Some query slots padded (`q_valid`).
  causal: bool
  window: int | tuple[int, int] | None
  softcap: float | None
  sinks: bool
  overflow: str  # "none", "flags" (given) or "check" (the kernel's test).
  launch: tuple[tuple[str, int], ...]


def draw(seed: int, backend: str) -> Draw:
  rng = np.random.default_rng([seed, 0xDEC0DE])
  choice = lambda xs: xs[rng.integers(len(xs))]
  mosaic = backend == "mosaic"
  dtype = "bfloat16" if mosaic else choice(["float32", "bfloat16"])
  d = choice([64, 128, 256] if mosaic else [16, 32, 64, 128])
  hkv = choice([1, 2, 4, 8])
  sq = choice([1, 1, 1, 2, 4, 16])
  groups = [g for g in (1, 2, 4, 8) if g * sq <= 64]
  h = hkv * choice(groups)
  ps = choice([8, 16, 16, 32, 64, 128] if mosaic else [4, 8, 16, 32, 64])
  dense = bool(rng.random() < 0.25)
  if dense:  # The dense view's pages: whole rows of `ps`-token pages.
    ps = choice([p for p in (64, 128, 256) if not mosaic or p >= 64])
  max_pages = max(1, int(rng.integers(256, 2048)) // ps)
  b = int(rng.integers(1, 5))
  capacity = max_pages * ps
  lengths = tuple(int(n) for n in rng.integers(0, capacity + 1, b))
  if b > 1 and rng.random() < 0.5:
    lengths = (lengths[0], 0) + lengths[2:]  # An empty row.
  causal = bool(rng.random() < 0.75)
  window = None
  if rng.random() < 0.35:
    window = (int(rng.integers(1, 300)) if causal else
              (int(rng.integers(0, 200)), int(rng.integers(0, 200))))
  # "check": the call's own overflow test (the Mosaic kernel's, or XLA's
  # reduction with a window or on Triton).
  overflow = choice(["none", "none", "flags", "check"])
  launch = {}
  if rng.random() < 0.6:
    launch["num_splits"] = int(rng.integers(1, 9))
  if mosaic:
    if rng.random() < 0.5:
      launch["producers"] = choice([1, 2])
    # Tokens per slot and slots that fit in shared memory (the launch's
    # own check; a draw past it would only test that check).
    fitting = []
    for tokens, stages in itertools.product((64, 128, 256), (2, 3, 4)):
      try:
        flash_kernel.mosaic_decode_launch(
            b, hkv, max_pages, ps, d, block_tokens=tokens, stages=stages)
      except ValueError:
        continue
      fitting.append((tokens, stages))
    if fitting and rng.random() < 0.6:
      tokens, stages = choice(fitting)
      launch.update(block_tokens=tokens, stages=stages)
  else:
    if rng.random() < 0.5:
      launch["pages_per_block"] = choice([p for p in (1, 2, 4, 8, 16)
                                          if p * ps >= 16])
    if rng.random() < 0.3:
      launch["num_warps"] = choice([2, 4, 8])
    if rng.random() < 0.3:
      launch["num_stages"] = choice([1, 2, 3])
  return Draw(
      backend=backend, dtype=dtype, b=b, sq=sq, h=h, hkv=hkv, d=d, ps=ps,
      max_pages=max_pages, lengths=lengths, dense=dense,
      shared=0 if dense else int(rng.integers(0, 4)),
      early=bool(rng.random() < 0.2), padded=bool(rng.random() < 0.3),
      causal=causal, window=window,
      softcap=float(rng.uniform(2.0, 50.0)) if rng.random() < 0.3 else None,
      sinks=bool(rng.random() < 0.25), overflow=overflow,
      launch=tuple(sorted(launch.items())))


def describe(d: Draw) -> str:
  fields = dataclasses.asdict(d)
  return " ".join(f"{k}={v}" for k, v in fields.items()
                  if v not in (None, False, 0, "none", ()))


def make_call(seed: int, d: Draw):
  """The draw's call: `(inputs, q_valid, overflow, sinks, check)`, inputs
  `(q, key_pages, value_pages, table, lengths, q_positions)` (a dense
  cache's `table` is `dense_as_pages`', which the oracle reads through),
  `q_valid` `[B, Sq]` or None, `overflow` the given `[B]` flags or None,
  `sinks` `[H]` or None, and `check` the rows the call's own overflow test
  must find (`[B]` bool, numpy) or None when it does not test."""
  rng = np.random.default_rng([seed, 0xCA11])
  dtype = jnp.dtype(d.dtype)
  q, kp, vp, table, lengths, pos = kernel_tests._paged(
      f"fuzz_{seed}", b=d.b, sq=d.sq, h=d.h, hkv=d.hkv, d=d.d, ps=d.ps,
      max_pages=d.max_pages, lengths=d.lengths, shared=d.shared, dtype=dtype)
  if d.dense:  # The same tokens as a dense cache's pages.
    keys, values = (p[jnp.clip(table, 0, p.shape[0] - 1)].reshape(
        d.b, d.max_pages * d.ps, d.hkv, d.d) for p in (kp, vp))
    kp, vp, table = decode.dense_as_pages(keys, values)
  if d.early:  # The queries stop before the row's length.
    pos = pos - jnp.asarray(rng.integers(0, 200, (d.b, 1)), jnp.int32)
  q_valid = None
  if d.padded:
    q_valid = jnp.asarray(rng.random((d.b, d.sq)) < 0.6)
  overflow, check = None, None
  if d.overflow == "flags":
    flags = rng.random(d.b) < 0.3
    flags[rng.integers(d.b)] |= d.b > 1  # One row at least, not every one.
    overflow = jnp.asarray(flags)
  elif d.overflow == "check":
    lengths, table = np.array(lengths), np.array(table)  # Writable copies.
    rows = np.flatnonzero(lengths) if np.any(lengths) else np.arange(d.b)
    row = int(rng.choice(rows))
    if rng.random() < 0.5 or d.dense or not lengths[row]:
      # A length past the capacity.
      lengths[row] = d.max_pages * d.ps + int(rng.integers(1, 40))
    else:  # An entry below the length that names no page.
      table[row, int(rng.integers(0, -(-lengths[row] // d.ps)))] = -1
    lengths, table = jnp.asarray(lengths), jnp.asarray(table)
    check = np.asarray(decode._overflowing_rows(  # pylint: disable=protected-access
        None if d.dense else table, lengths, kp))
  sinks = None
  if d.sinks:
    sinks = jnp.asarray(rng.standard_normal(d.h), jnp.float32)
  return (q, kp, vp, table, lengths, pos), q_valid, overflow, sinks, check


def run(seed: int, d: Draw) -> tuple[str, list[str]]:
  """Runs the kernel on the draw and checks it against the oracle:
  `(verdict, details)`, the verdict "pass", "fail" or "refused"."""
  inputs, q_valid, overflow, sinks, check = make_call(seed, d)
  kw = dict(causal=d.causal, window=d.window, softcap=d.softcap)
  fn = functools.partial(
      decode.decode_attention, sm_scale=d.d ** -0.5, backend=d.backend,
      interpret=d.backend == "triton" and jax.default_backend() == "cpu",
      sinks=sinks, q_valid=q_valid, overflow=overflow,
      check_overflow=check is not None, **dict(d.launch), **kw)
  q, kp, vp, table, lengths, pos = inputs
  try:
    res = jax.block_until_ready(jax.jit(fn)(
        q, kp, vp, None if d.dense else table, lengths, pos))
  except (ValueError, NotImplementedError) as e:
    return "refused", [f"{type(e).__name__}: {str(e).splitlines()[0]}"]
  want_overflow = overflow if check is None else jnp.asarray(check)
  f32 = [x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
         else x for x in inputs]
  capacity = table.shape[1] * kp.shape[1]
  f32[4] = jnp.minimum(f32[4], capacity)
  want = kernel_tests._reference(  # pylint: disable=protected-access
      *f32, sm_scale=d.d ** -0.5, q_valid=q_valid, overflow=want_overflow,
      **kw)
  if sinks is not None:
    want = merge.merge_sinks(*want, sinks)
  try:
    kernel_tests._compare(  # pylint: disable=protected-access
        (res.out.astype(jnp.float32), res.lse), want,
        kernel_tests.TOL[d.dtype], f"seed {seed}")
  except AssertionError as e:
    return "fail", [" ".join(str(e).split())[:300]]
  return "pass", []


def fuzz(seed: int, backend: str) -> tuple[str, list[str]]:
  """`run` on the draw of `seed`: in JAX's GPU interpreter for Mosaic
  without a Hopper GPU. Any exception but the kernel's refusal fails."""
  d = draw(seed, backend)
  try:
    if backend == "mosaic" and not HOPPER:
      with gpu_interpret.mosaic_on_cpu():
        return run(seed, d)
    return run(seed, d)
  except Exception:  # pylint: disable=broad-except
    return "fail", [traceback.format_exc(limit=-3)]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", default="0:20", help="start:stop")
  parser.add_argument("--backend", default="mosaic",
                      choices=["mosaic", "triton"])
  parser.add_argument("--show_refusals", action="store_true")
  parser.add_argument("--verbose", action="store_true",
                      help="one line per seed")
  args = parser.parse_args(argv)
  if args.backend == "mosaic" and not HOPPER and (
      gpu_interpret.UNAVAILABLE is not None):
    print(f"no Mosaic GPU here: {gpu_interpret.UNAVAILABLE}")
    return 2
  start, stop = (int(s) for s in args.seeds.split(":"))
  counts: dict[str, int] = {}
  for seed in range(start, stop):
    verdict, details = fuzz(seed, args.backend)
    counts[verdict] = counts.get(verdict, 0) + 1
    if (args.verbose or verdict == "fail" or
        (verdict == "refused" and args.show_refusals)):
      print(f"seed {seed} {verdict}: {describe(draw(seed, args.backend))}",
            flush=True)
      for line in details:
        print("   ", line, flush=True)
  print("summary:", counts, flush=True)
  return int(counts.get("fail", 0) > 0)


if __name__ == "__main__":
  sys.exit(main())
