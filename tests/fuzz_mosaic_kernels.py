"""Differential fuzzing of flash's Hopper (Mosaic GPU) kernels against the
float32 oracle.

Forward (the default): the forward runs as one program per multiprocessor,
each over the query tiles `mosaic_schedule.WorkOrder` gives it, carrying a
key-tile stream, prefetched bounds rows and double-buffered query rows
from tile to tile. This draws what that machinery depends on: the
multiprocessors (1 to 7, `gpu.core_count` patched, so programs run from one
to dozens of tiles), the batch, heads and groups, query and key lengths
(tiles with no visible key among them), padded head size 64, 128 or 256
(one buffer of query rows), dtype, the order of causal items (the snake
order forced in half the draws), and the structure: causal or not, a one-
or two-sided window, segment ids, kv lengths (empty rows too), soft cap,
dropout. Checked: out and lse.

`--backward`: the same calls (same seeds, same draws) through the forward
and the backward, checked: out, dq, dk and dv against the oracle's
gradients. Drawn besides: the dQ path (`hopper_launch_config`'s `dq`:
the Mosaic dQ kernel; fused into the dK/dV kernel with int32 fixed-point
adds or float32 ones, with or without `rotate_dq`; on a GPU also Triton's
dQ kernel), and the programs' order of the dK/dV and dQ kernels
(`structure.GROUPED_CAUSAL_DKV` / `GROUPED_CAUSAL_DQ`, each on in three
draws of four, on 1-16 multiprocessors, which set the group size), and
the dK/dV step's schedules (`mosaic_bwd_rows.DQ_ADD_BESIDE_DK` and
`DQ_LAG`, each on in half the draws; `STAGGER` in
half of those with `DQ_LAG`), and the split dK/dV kernel's 128-row steps
at padded D = 64 (`mosaic_common.WIDE_DKV_STEPS`, half the draws; the
fused backward and calls with mods keep 64), and the forward's query
tiles dealt by rank (`mosaic_schedule.RANKED_ORDER`, half the draws, forward
and backward; it changes the calls with segment ids), and the dK/dV
and dQ kernels' tiles dealt by rank (`RANKED_BWD_ORDER`, half the backward
draws). On a CPU the Triton dQ kernel cannot run beside the interpreted
Mosaic ones, so a draw of padded D = 256 (whose only dQ is Triton's) runs at
128 there.

Each draw runs `flash_kernel` with the Hopper launches op by op, compiled
on an sm_90 GPU, else in JAX's GPU interpreter (jax >= 0.11; 10-60 s a
forward draw, 20-60 s a backward one on 2 cores; under `jit` it deadlocks
there, `gpu_interpret.py`). Errors are relative to the oracle's largest
entry (out, each gradient); lse -inf exactly where the oracle's is.

  python tests/fuzz_mosaic_kernels.py --seeds 0:20 [--backward] [--verbose]

prints one line per failed seed and a summary; exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import traceback

import conftest  # noqa: F401  (XLA flags before jax: 8 CPU devices.)
import jax
import jax.numpy as jnp
import numpy as np

import flexible_attention as fa
from flexible_attention.core import dropout as dropout_lib
from flexible_attention.kernels import flash as flash_kernel
from flexible_attention.kernels import gpu
from flexible_attention.kernels.flash import mosaic_bwd_rows
from flexible_attention.kernels.flash import mosaic_common
from flexible_attention.kernels.flash import mosaic_schedule
from flexible_attention.kernels.flash import structure
import gpu_interpret

HOPPER = 9.0 <= (gpu.compute_capability() or 0.0) < 10.0
TOL = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3}  # Relative to the largest.
# The dQ paths a backward draw picks from: `hopper_launch_config`'s `dq`,
# with the fused one's adds in int32 fixed point or float32.
DQ_PATHS = ("mosaic", "fused", "fused_float") + (("triton",) if HOPPER
                                                 else ())


@dataclasses.dataclass(frozen=True)
class Draw:
  """One call, the multiprocessors it runs on and, for the backward, its
  dQ path and program orders (None in a forward draw)."""
  cores: int
  b: int
  sq: int
  sk: int
  hkv: int
  groups: int
  d: int
  dtype: type
  causal: bool
  window: tuple[int, int] | None
  segments: bool
  kv_lengths: bool
  softcap: float | None
  dropout: float | None
  snake: bool  # Causal items in the snake order whatever the heads.
  dq: str | None = None  # One of DQ_PATHS.
  rotate_dq: bool = False  # The fused dQ's rotated steps.
  grouped: tuple[bool, bool] = (False, False)  # dK/dV's, dQ's.
  dq_add_beside_dk: bool = False  # `mosaic_bwd_rows.DQ_ADD_BESIDE_DK`.
  dq_lag: bool = False  # `mosaic_bwd_rows.DQ_LAG`.
  stagger: bool = False  # `mosaic_bwd_rows.STAGGER`.
  wide_dkv: bool = False  # `mosaic_common.WIDE_DKV_STEPS`.
  ranked: bool = False  # `mosaic_schedule.RANKED_ORDER`.
  ranked_bwd: bool = False  # `mosaic_schedule.RANKED_BWD_ORDER`.


def draw(seed: int, backward: bool = False) -> Draw:
  rng = np.random.default_rng(seed)
  x = Draw(
      cores=int(rng.integers(1, 8)), b=int(rng.integers(1, 3)),
      # At least a query tile and a key tile (256 keys at Dp = 64): the
      # pinned launches refuse shorter calls.
      sq=int(rng.integers(1, 4) * 128 + rng.integers(0, 100)),
      sk=int(rng.integers(2, 5) * 128 + rng.integers(0, 100)),
      hkv=int(rng.integers(1, 3)), groups=int(rng.choice([1, 2, 4])),
      d=int(rng.choice([40, 64, 96, 128, 256])),
      dtype=[jnp.bfloat16, jnp.float16][int(rng.integers(0, 2))],
      causal=bool(rng.random() < 0.6),
      window=(tuple(int(x) for x in rng.integers(0, 200, 2))
              if rng.random() < 0.25 else None),
      segments=bool(rng.random() < 0.25),
      kv_lengths=bool(rng.random() < 0.3),
      softcap=float(rng.uniform(5, 30)) if rng.random() < 0.25 else None,
      dropout=float(rng.choice([0.1, 0.3])) if rng.random() < 0.2 else None,
      snake=bool(rng.random() < 0.5))
  if not backward:  # (The last draw of each kind: a seed keeps the rest.)
    return dataclasses.replace(x, ranked=bool(rng.random() < 0.5))
  # The backward kernels' grids do not depend on the multiprocessors, but
  # their program order does: grouped only where a head has fewer tiles
  # than there are multiprocessors (`structure.TileOrder.choose`), so up
  # to 16 here, most draws' 2-5 tiles a head then grouped.
  cores = int(rng.integers(1, 17))
  dq = DQ_PATHS[int(rng.integers(0, len(DQ_PATHS)))]
  rotate_dq = dq != "mosaic" and bool(rng.random() < 0.3)
  grouped = tuple(bool(g) for g in rng.random(2) < 0.75)
  rng.random()  # A removed schedule's draw: each seed keeps its draws.
  dq_add_beside_dk = bool(rng.random() < 0.5)
  dq_lag = bool(rng.random() < 0.5)
  stagger = dq_lag and bool(rng.random() < 0.5)
  wide_dkv = bool(rng.random() < 0.5)
  ranked = bool(rng.random() < 0.5)
  ranked_bwd = bool(rng.random() < 0.5)
  d = x.d
  if structure.pad_dim(d) == 256:  # Only Triton's dQ kernel serves it.
    d, dq, rotate_dq = (256, "triton", False) if HOPPER else (128, dq,
                                                              rotate_dq)
  return dataclasses.replace(x, cores=cores, d=d, dq=dq,
                             rotate_dq=rotate_dq, grouped=grouped,
                             dq_add_beside_dk=dq_add_beside_dk,
                             dq_lag=dq_lag, stagger=stagger,
                             wide_dkv=wide_dkv, ranked=ranked,
                             ranked_bwd=ranked_bwd)


def _launch(x: Draw) -> flash_kernel.LaunchConfig:
  """The Hopper launches of draw `x`: its dQ path, if a backward draw."""
  dp = structure.pad_dim(x.d)
  if x.dq is None:
    return flash_kernel.hopper_launch_config(dp, x.causal)
  launch = flash_kernel.hopper_launch_config(
      dp, x.causal, dq=x.dq.removesuffix("_float"),
      deterministic_dq=x.dq != "fused_float")
  return dataclasses.replace(launch, rotate_dq=x.rotate_dq)


@contextlib.contextmanager
def _kernels_of(x: Draw):
  """The kernels as draw `x` has them: interpreted off a GPU, on `x.cores`
  multiprocessors, in the orders it draws."""
  with contextlib.ExitStack() as stack:
    if not HOPPER:
      stack.enter_context(gpu_interpret.mosaic_on_cpu())
    patched = [(gpu, "core_count", lambda: x.cores),
               (structure, "GROUPED_CAUSAL_DKV", x.grouped[0]),
               (structure, "GROUPED_CAUSAL_DQ", x.grouped[1]),
               (mosaic_bwd_rows, "DQ_ADD_BESIDE_DK", x.dq_add_beside_dk),
               (mosaic_bwd_rows, "DQ_LAG", x.dq_lag),
               (mosaic_bwd_rows, "STAGGER", x.stagger),
               (mosaic_common, "WIDE_DKV_STEPS", x.wide_dkv),
               (mosaic_schedule, "RANKED_ORDER", x.ranked),
               (mosaic_schedule, "RANKED_BWD_ORDER", x.ranked_bwd)]
    if x.snake:
      patched.append((mosaic_schedule, "SNAKE_PROGRAMS_PER_HEAD", 0))
    original = [(m, n, getattr(m, n)) for m, n, _ in patched]
    try:
      for m, n, value in patched:
        setattr(m, n, value)
      yield
    finally:
      for m, n, value in original:
        setattr(m, n, value)


def run(x: Draw, seed: int) -> float:
  """The draw's largest error relative to the oracle's largest entry (of
  out and lse; with `x.dq`, of out, dq, dk and dv); raises AssertionError
  where the lse's -inf rows differ, or a gradient is not finite."""
  keys = jax.random.split(jax.random.key(seed), 5)
  h = x.hkv * x.groups
  q = jax.random.normal(keys[0], (x.b, x.sq, h, x.d), x.dtype)
  k = jax.random.normal(keys[1], (x.b, x.sk, x.hkv, x.d), x.dtype)
  v = jax.random.normal(keys[2], (x.b, x.sk, x.hkv, x.d), x.dtype)
  rng = np.random.default_rng(seed)
  call = dict(causal=x.causal, sliding_window=x.window)
  if x.segments:
    ids = lambda s: jnp.asarray(np.sort(rng.integers(0, 4, (x.b, s)), -1),
                                jnp.int32)
    call["segment_ids"] = (ids(x.sq), ids(x.sk))
  if x.kv_lengths:
    call["kv_lengths"] = jnp.asarray(rng.integers(0, x.sk + 1, x.b),
                                     jnp.int32)
  drop = (dropout_lib.make_dropout(keys[3], x.dropout) if x.dropout else
          None)
  scale = x.d**-0.5
  f32 = lambda a: a.astype(jnp.float32)

  def oracle(q, k, v):
    inputs = fa.canonicalize(f32(q), f32(k), f32(v), **call)
    return fa.reference_attention(inputs.query, inputs.key, inputs.value,
                                  None, inputs.visibility, drop,
                                  sm_scale=scale, softcap=x.softcap)

  with _kernels_of(x):
    if x.dq is None:
      got = flash_kernel.forward_pass(flash_kernel.prepare(
          fa.canonicalize(q, k, v, **call), drop, sm_scale=scale,
          softcap=x.softcap, launch=_launch(x)))
    else:
      flash = lambda q, k, v: flash_kernel.flash_attention(
          fa.canonicalize(q, k, v, **call), drop, sm_scale=scale,
          softcap=x.softcap, launch=_launch(x)).out
      ct = jax.random.normal(keys[4], q.shape, x.dtype)
      out, vjp = jax.vjp(flash, q, k, v)
      got = (out,) + vjp(ct)
  if x.dq is not None:
    out, vjp = jax.vjp(lambda *a: oracle(*a).out, f32(q), f32(k), f32(v))
    want = (out,) + vjp(f32(ct))
    errors = []
    for g, w in zip(got, want):
      if not np.all(np.isfinite(np.asarray(f32(g)))):
        raise AssertionError("a non-finite output or gradient")
      size = float(jnp.max(jnp.abs(w))) or 1.0
      errors.append(float(jnp.max(jnp.abs(f32(g) - w))) / size)
    return max(errors)
  want = oracle(q, k, v)
  empty = np.isneginf(np.asarray(want.lse))
  if not np.array_equal(np.isneginf(np.asarray(got.lse)), empty):
    raise AssertionError("lse is -inf at other rows than the oracle's")
  size = float(jnp.max(jnp.abs(want.out))) or 1.0
  out_err = float(jnp.max(jnp.abs(f32(got.out) - want.out))) / size
  got_lse, want_lse = (np.where(empty, 0.0, np.asarray(a))
                       for a in (got.lse, want.lse))
  lse_err = float(np.max(np.abs(got_lse - want_lse), initial=0.0)) / max(
      1.0, float(np.max(np.abs(want_lse), initial=0.0)))
  return max(out_err, lse_err)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", default="0:20", help="start:stop")
  parser.add_argument("--backward", action="store_true",
                      help="the forward and backward kernels, and gradients")
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args(argv)
  if not HOPPER and gpu_interpret.UNAVAILABLE:
    print(f"skipped: {gpu_interpret.UNAVAILABLE}")
    return 0
  start, stop = map(int, args.seeds.split(":"))
  failed = 0
  for seed in range(start, stop):
    x = draw(seed, args.backward)
    try:
      error = run(x, seed)
      ok = error <= TOL[x.dtype]
      message = f"error {error:.2e}"
    except Exception:  # pylint: disable=broad-except
      ok, message = False, traceback.format_exc(limit=-3)
    failed += not ok
    if args.verbose or not ok:
      print(f"seed {seed}: {'ok' if ok else 'FAILED'} {message} {x}",
            flush=True)
  print(f"{stop - start - failed} passed, {failed} failed "
        f"({'compiled' if HOPPER else 'interpreted'})")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
