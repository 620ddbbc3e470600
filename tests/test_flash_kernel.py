"""The `flash` Pallas kernels on CPU, in Pallas interpret mode.

Every feature of the semantics runs through the `flash` module in the
conformance battery (tests/test_conformance.py: outputs, dq/dk/dv and dbias
against the float32 reference, exact zeros for rows that see no key,
dropout bit-identical to the reference's). This file pins what the battery
does not: `kernels/flash`'s `flash_attention` called directly with tiles
of 16 (every case spans several tiles and exercises block skipping) on a
large scale, unsorted segment ids, the default tiles, the one-kernel
(atomic dQ) backward, the log-sum-exp and the skipping tables; the launch
policy and the Hopper kernels; and the module's launch option and
refusals.

The Hopper kernels (`kernels/flash/mosaic_*.py`, Mosaic GPU: the forward,
dK/dV and dQ): on CPU each of their cases is lowered for CUDA, and under
jax >= 0.11 a selection runs in JAX's GPU interpreter (`gpu_interpret.py`;
the persistent forward with 3 multiprocessors, so that its programs loop
over several query tiles); on an sm_90 GPU each is run and compared like
the others.

Tolerance: relative to the largest reference magnitude, 2e-5 in float32 (the
interpreted kernels measure ~1e-6), 2e-2 in bfloat16 and 5e-3 in float16
(the Hopper kernel measures ~3e-3 and ~5e-4 at S = 4096).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import itertools
import os
import re
import subprocess
import sys

import haiku as hk
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.comparison import cells as comparison_cells
from flexible_attention.core import dropout as dropout_lib
from flexible_attention.kernels import flash as flash_kernel
from flexible_attention.kernels.flash import interface as flash_interface
from flexible_attention.kernels.flash import launch as flash_launch
from flexible_attention.kernels.flash import mosaic_common
from flexible_attention.kernels.flash import mosaic_schedule
from flexible_attention.kernels import gpu
from flexible_attention.kernels.flash import structure
from flexible_attention.mechanisms import registry
import gpu_interpret
import helpers

# Interpreted on a GPU, float32 matmuls default to TF32 (~1e-3 relative).
TOL = {"float32": 2e-5 if jax.default_backend() == "cpu" else 2e-3,
       "bfloat16": 2e-2, "float16": 5e-3}
SMALL_BLOCKS = fa.BlockSizes(block_q=16, block_k=16, block_q_dkv=16,
                             block_k_dkv=16, block_q_dq=16, block_k_dq=16)


_rel = helpers.finite_relative_error


def _inputs(name, *, b=2, sq=40, sk=40, h=2, hkv=2, d=16, dv=None,
            dtype=jnp.float32, bias_shape=None):
  rng = helpers.rng_for(name)
  arr = lambda shape, scale=1.0: jnp.asarray(
      rng.standard_normal(shape) * scale, dtype)
  q = arr((b, sq, h, d), 2.0)
  k = arr((b, sk, hkv, d))
  v = arr((b, sk, hkv, dv or d))
  ct = arr((b, sq, h, dv or d))
  bias = None if bias_shape is None else arr(bias_shape)
  return q, k, v, ct, bias


def _flash(call, dropout, scale, softcap, blocks, launch, interpret):
  """`(q, k, v, bias) -> out` of the flash kernels."""
  def flash(q, k, v, bias):
    inputs = fa.canonicalize(q, k, v, bias=bias, **call)
    return flash_kernel.flash_attention(
        inputs, dropout, sm_scale=scale, softcap=softcap,
        block_sizes=None if launch is not None else blocks, launch=launch,
        interpret=interpret).out
  return flash


def _check(name, call=None, *, softcap=None, dropout=None, sm_scale=None,
           blocks=SMALL_BLOCKS, launch=None, interpret=True, jit=True,
           **shape):
  """Runs flash (interpreted unless told) and the reference; compares out
  and grads. `launch` (a `LaunchConfig`), when given, replaces `blocks`;
  `jit=False` runs flash op by op (`gpu_interpret`'s kernels)."""
  q, k, v, ct, bias = _inputs(name, **shape)
  call = dict(call or {})
  scale = q.shape[-1]**-0.5 if sm_scale is None else sm_scale
  flash = _flash(call, dropout, scale, softcap, blocks, launch, interpret)

  def ref(q, k, v, bias):
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    inputs = fa.canonicalize(f32(q), f32(k), f32(v), bias=f32(bias), **call)
    return fa.reference_attention(
        inputs.query, inputs.key, inputs.value, inputs.bias,
        inputs.visibility, dropout, sm_scale=scale, softcap=softcap).out

  def fwd_bwd(f):
    def run(q, k, v, bias, ct):
      out, vjp = jax.vjp(f, q, k, v, bias)
      grads = vjp(ct.astype(out.dtype))
      return (out,) + tuple(g for g in grads if g is not None)
    return run

  got = (jax.jit if jit else lambda f: f)(fwd_bwd(flash))(q, k, v, bias, ct)
  want = jax.jit(fwd_bwd(ref))(q, k, v, bias, ct)
  tol = TOL[jnp.dtype(q.dtype).name]
  for what, g, w in zip(("out", "dq", "dk", "dv", "dbias"), got, want):
    assert g.shape == w.shape, (what, g.shape, w.shape)
    err = _rel(g, w)
    assert err <= tol, f"{name}: {what} error {err:.3g} > {tol}"
  return got, want


def _sorted_ids(name, b, n, num):
  rng = helpers.rng_for(name)
  return jnp.asarray(np.sort(rng.integers(0, num, (b, n)), axis=1),
                     jnp.int32)


# --- Kernel vs reference ------------------------------------------------------


def test_large_scale_with_masked_tiles():
  # The forward scales row maxima of the raw logits; with sm_scale * log2(e)
  # > 1 the masked logits' scaled value overflows to -inf, which must still
  # give exact zeros.
  _check("large_scale", dict(causal=True, sliding_window=9), sm_scale=3.0)


def test_delta_barrier_changes_no_gradient(monkeypatch):
  """`interface.DELTA_BARRIER` keeps the backward's `delta` a fusion of its
  own (an `optimization_barrier` in the split Mosaic backward's program
  lowered for CUDA) and changes no gradient (the Triton kernels in the
  interpreter: against the reference, and bit for bit against the
  gradients without it)."""
  q, k, v, _, _ = _inputs("delta_barrier")

  def grads(launch=None):
    loss = lambda q, k, v: jnp.sum(flash_kernel.flash_attention(
        fa.canonicalize(q, k, v, causal=True), sm_scale=0.3,
        interpret=launch is None, launch=launch).out ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))

  x = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  split = flash_kernel.hopper_launch_config(128, True, dq="mosaic")
  texts, results = {}, {}
  for on in (False, True):
    monkeypatch.setattr(flash_interface, "DELTA_BARRIER", on)
    texts[on] = helpers.lower_for_cuda(grads(split), x, x, x)
    results[on] = grads()(q, k, v)
  assert "optimization_barrier" in texts[True]
  assert "optimization_barrier" not in texts[False]
  for off, on in zip(results[False], results[True]):
    np.testing.assert_array_equal(off, on)
  _check("delta_barrier", dict(causal=True), sm_scale=0.3)  # Still on.


def test_kernel_refuses_non_positive_scale():
  q, k, v, _, _ = _inputs("scale")
  with pytest.raises(ValueError, match="sm_scale must be positive"):
    flash_kernel.flash_attention(fa.canonicalize(q, k, v), sm_scale=0.0,
                                 interpret=True)


def test_segment_ids_unsorted_pair():
  # Unsorted ids: tiles are not skippable, the in-kernel mask must hold.
  rng = helpers.rng_for("segments_pair")
  q_ids = jnp.asarray(rng.integers(0, 3, (2, 24)), jnp.int32)
  kv_ids = jnp.asarray(rng.integers(0, 3, (2, 40)), jnp.int32)
  _check("segments_pair", dict(segment_ids=(q_ids, kv_ids)), sq=24, sk=40)


def test_single_tile_and_default_blocks():
  _check("default_blocks", dict(causal=True), sq=9, sk=13, d=8,
         blocks=None)


# Triton's atomics add dQ in any order: they need deterministic_dq=False.
ATOMIC_DQ = dataclasses.replace(flash_kernel.launch_config(16, SMALL_BLOCKS),
                                atomic_dq=True, deterministic_dq=False)


@pytest.mark.parametrize("case", [
    dict(name="atomic plain"),
    dict(name="atomic gqa causal odd", call=dict(causal=True), sq=37, sk=45,
         h=4, hkv=2),
    dict(name="atomic window kv lengths",
         call=dict(sliding_window=(5, 2), kv_lengths=jnp.array([0, 29]))),
    dict(name="atomic softcap bias", softcap=5.0, bias_shape=(1, 2, 40, 40)),
], ids=lambda case: case["name"])
def test_backward_with_atomic_dq(case):
  """dQ added into float32 by the dK/dV kernel (one backward kernel)."""
  _check(launch=ATOMIC_DQ, **case)


def test_launch_with_tile_sizes_is_an_error():
  q, k, v, _, _ = _inputs("launch and blocks")
  with pytest.raises(ValueError, match="either in `launch` or in"):
    flash_kernel.flash_attention(fa.canonicalize(q, k, v), sm_scale=0.25,
                                 block_sizes=SMALL_BLOCKS, launch=ATOMIC_DQ,
                                 interpret=True)


def test_triton_atomic_dq_must_allow_any_order():
  """Triton's atomics cannot keep dQ's adds in a fixed order: asked for
  that (the default), the launch is refused, naming the way out."""
  launch = dataclasses.replace(ATOMIC_DQ, deterministic_dq=True)
  with pytest.raises(ValueError, match="pass deterministic_dq=False"):
    flash_kernel.check_launch_config(launch)
  with pytest.raises(TypeError, match="deterministic_dq must be a bool"):
    flash_kernel.check_launch_config(
        dataclasses.replace(ATOMIC_DQ, deterministic_dq=1))


def test_atomic_dq_backward_is_one_kernel():
  q = jnp.ones((1, 32, 2, 16))

  def kernels(launch):
    def loss(q):
      inputs = fa.canonicalize(q, q, q, causal=True)
      return jnp.sum(flash_kernel.flash_attention(
          inputs, sm_scale=0.25, launch=launch, interpret=True).out)
    return str(jax.make_jaxpr(jax.grad(loss))(q)).count("pallas_call[")

  split = dataclasses.replace(ATOMIC_DQ, atomic_dq=False)
  # Forward, dK/dV and dQ; or forward and dK/dV (with dQ).
  assert (kernels(split), kernels(ATOMIC_DQ)) == (3, 2)


def test_backward_with_atomic_dq_segments_and_dropout():
  b, s = 2, 48
  ids = _sorted_ids("atomic segments", b, s, 4)
  _check("atomic segments", dict(segment_ids=ids, causal=True), b=b, sq=s,
         sk=s, launch=ATOMIC_DQ, h=4, hkv=1)
  dropout = dropout_lib.make_dropout(jax.random.key(3), 0.2)
  _check("atomic dropout", dict(causal=True), dropout=dropout,
         launch=ATOMIC_DQ)


def test_log_sum_exp_matches_reference():
  q, k, v, _, _ = _inputs("lse")

  @jax.jit
  def got_and_want(q, k, v):
    inputs = fa.canonicalize(q, k, v, causal=True,
                             kv_lengths=jnp.array([0, 30]))
    got = flash_kernel.flash_attention(inputs, None, sm_scale=0.25,
                                       block_sizes=SMALL_BLOCKS,
                                       interpret=True).lse
    want = fa.reference_attention(inputs.query, inputs.key, inputs.value,
                                  None, inputs.visibility, sm_scale=0.25).lse
    return got, want

  got, want = got_and_want(q, k, v)
  assert np.all(np.isneginf(np.asarray(got[0])))
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]),
                             rtol=1e-5, atol=1e-5)


def test_skipping_tables_skip_invisible_tiles():
  # Causal, 64 x 64 in 16 x 16 tiles: query tile i sees key tiles [0, i],
  # tiles [0, i) without masking (a row without such tiles: flo = fhi = hi).
  q, k, v, _, _ = _inputs("tables", b=1, sq=64, sk=64, h=1, hkv=1)
  vis = fa.canonicalize(q, k, v, causal=True).visibility
  st = structure.Static(
      sm_scale=1.0, softcap=None, precision=None, causal=True, window=None,
      segments=False, mask=False, dropout_rate=None,
      groups=1, launch=None, interpret=True)
  aux = dict(q_pos=vis.q_positions, kv_pos=vis.kv_positions,
             kv_ok=jnp.ones((1, 64), jnp.int32))
  maybe, full = structure.tile_tables(st, aux, 16, 16)
  bounds = np.asarray(structure.bounds_table(maybe, full))[0]
  np.testing.assert_array_equal(bounds, [[0, 1, 1, 1], [0, 0, 1, 2],
                                         [0, 0, 2, 3], [0, 0, 3, 4]])


# --- The Hopper kernels (Mosaic GPU) -----------------------------------------

ON_HOPPER = 9.0 <= (gpu.compute_capability() or 0.0) < 10.0


def _mosaic(head_dim: int, causal: bool,
            dq: bool = False) -> flash_kernel.LaunchConfig:
  """The Hopper launches with the Mosaic forward and dK/dV kernels (padded
  D), with `dq` the Mosaic dQ kernel (else Triton's)."""
  return flash_kernel.hopper_launch_config(
      head_dim, causal, dq="mosaic" if dq else "triton")


def _fused(head_dim: int, causal: bool) -> flash_kernel.LaunchConfig:
  """The Hopper launches with dQ inside the Mosaic dK/dV kernel (the fused
  backward, in fixed point) at a padded D."""
  return flash_kernel.hopper_launch_config(head_dim, causal, dq="fused")


def _hopper_case(name):
  """`(call, shape and options)` of a Hopper case; every structure the
  kernels serve, at lengths over one 128-row tile and not multiples of it."""
  b = 2
  ids = lambda s: _sorted_ids(name, b, s, 5)
  rng = helpers.rng_for(name)
  cases = {
      "plain": ({}, dict(sq=256, sk=384)),
      "causal_fewer_queries": (dict(causal=True), dict(sq=200, sk=328)),
      "causal_empty_rows": (dict(causal=True), dict(sq=300, sk=140, d=64)),
      "window": (dict(sliding_window=(40, 8)), dict(sq=260, sk=260)),
      "segments": (dict(segment_ids=ids(272), causal=True),
                   dict(sq=272, sk=272, h=4, hkv=2)),
      "kv_lengths_with_zero": (dict(kv_lengths=jnp.array([0, 150])),
                               dict(sq=130, sk=256)),
      "positions": (dict(q_positions=jnp.asarray(
          rng.integers(0, 256, (b, 140)), jnp.int32), kv_positions=jnp.asarray(
              np.stack([rng.permutation(256) for _ in range(b)]), jnp.int32),
                         causal=True), dict(sq=140, sk=256)),
      "mqa_softcap": (dict(causal=True), dict(h=4, hkv=1, softcap=5.0)),
      "odd_head_dim": (dict(causal=True), dict(sq=131, sk=259, d=96, h=3,
                                               hkv=1)),
      "head_dim_256": (dict(causal=True), dict(sq=192, sk=192, d=256)),
      "float16": (dict(causal=True), dict(dtype=jnp.float16)),
      # The library's dropout hash in every Mosaic kernel: the rows layout
      # of dK/dV (D = 64 and 128, grouped heads) and the columns one.
      "dropout_gqa": (dict(causal=True), dict(sq=200, sk=328, h=4, hkv=2,
                                              dropout=_dropout(0.2))),
      "dropout_d64_window": (dict(sliding_window=(40, 8)),
                             dict(sq=260, sk=260, d=64, dropout=_dropout(0.1))),
      "dropout_head_dim_256": (dict(causal=True), dict(
          sq=192, sk=192, d=256, dropout=_dropout(0.2))),
  }
  call, shape = cases[name]
  shape = dict(dict(b=b, sq=256, sk=256, d=128, dtype=jnp.bfloat16), **shape)
  return call, shape


HOPPER_CASES = ("plain", "causal_fewer_queries", "causal_empty_rows",
                "window", "segments", "kv_lengths_with_zero", "positions",
                "mqa_softcap", "odd_head_dim", "head_dim_256", "float16",
                "dropout_gqa", "dropout_d64_window", "dropout_head_dim_256")


def _dropout(rate: float):
  return dropout_lib.make_dropout(jax.random.key(7), rate)


@pytest.mark.skipif(not ON_HOPPER, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("name", HOPPER_CASES)
def test_hopper_kernels_match_reference(name):
  call, shape = _hopper_case(name)
  launch = _mosaic(structure.pad_dim(shape["d"]),
                   call.get("causal", False))
  _check(f"hopper {name}", call, launch=launch, interpret=False, **shape)


@pytest.mark.skipif(not ON_HOPPER, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("name", [n for n in HOPPER_CASES
                                  if "head_dim_256" not in n])
def test_hopper_mosaic_dq_matches_reference(name):
  """Every kernel through Mosaic GPU, dQ by `mosaic_dq` (padded D of 64
  and 128; `tests/test_flash_fused_backward.py` lowers it on CPU)."""
  call, shape = _hopper_case(name)
  launch = _mosaic(structure.pad_dim(shape["d"]), call.get("causal", False),
                   dq=True)
  _check(f"hopper mosaic dq {name}", call, launch=launch, interpret=False,
         **shape)


# The cases whose kernels run on a CPU too, in JAX's GPU interpreter
# (`gpu_interpret`; 12-30 s each there): causal with empty rows, a window,
# segments with grouped heads, MQA with soft cap, float16 and the dropout
# hash. D = 256 is left out (no Mosaic dQ).
INTERPRETED_CASES = ("causal_empty_rows", "window", "segments",
                     "mqa_softcap", "float16", "dropout_gqa")


@pytest.mark.skipif(gpu_interpret.UNAVAILABLE is not None,
                    reason=gpu_interpret.UNAVAILABLE or "")
@pytest.mark.parametrize("name", INTERPRETED_CASES)
def test_mosaic_kernels_match_reference_in_gpu_interpreter(name):
  """The Mosaic forward, dK/dV and dQ kernels, run by JAX's GPU interpreter
  on the CPU (warpgroups as threads, barriers and TMA simulated), against
  the float32 reference: out and the gradients of q, k, v."""
  call, shape = _hopper_case(name)
  launch = _mosaic(structure.pad_dim(shape["d"]), call.get("causal", False),
                   dq=True)
  with gpu_interpret.mosaic_on_cpu():
    _check(f"interpreted {name}", call, launch=launch, interpret=False,
           jit=False, **shape)


def _work_per_program(order) -> list[int]:
  """Each program's work under a work order (tile t costs t + 1 key
  tiles), after checking that the programs run every (query tile, batch
  row, head) once, each at least one."""
  seen, work = [], []
  for p in range(order.programs):
    count = int(order.count(jnp.int32(p)))
    assert count >= 1
    items = [tuple(map(int, order.item(jnp.int32(p), jnp.int32(n))))
             for n in range(count)]
    seen += items
    work.append(sum(tile + 1 for tile, _, _ in items))
  assert sorted(seen) == sorted(itertools.product(
      range(order.tiles), range(order.batch), range(order.heads)))
  return work


@pytest.mark.parametrize("batch,heads,tiles,causal,cores", [
    (2, 3, 4, True, 5), (1, 1, 1, True, 132), (3, 2, 5, True, 4),
    (2, 2, 8, False, 3), (1, 4, 7, True, 3), (4, 16, 4, True, 132),
    (1, 1, 3, False, None)])
def test_work_order_runs_each_item_once_and_balances_causal_calls(
    batch, heads, tiles, causal, cores):
  """`mosaic_schedule.WorkOrder`: the programs run every (query tile, batch
  row, head) once, head by head, and under a causal mask (a tile's work
  grows with its index) no program has more than one heaviest pair of
  tiles over the lightest program's work."""
  order = mosaic_schedule.WorkOrder(batch, heads, tiles, causal, cores)
  assert order.programs == min(order.chunks, cores or order.chunks)
  work = _work_per_program(order)
  if causal:
    assert max(work) - min(work) <= 2 * tiles, work
  # The programs running at once (each one's first chunk) share few heads.
  first = {(b, h) for p in range(order.programs)
           for _, b, h in [map(int, order.item(jnp.int32(p), jnp.int32(0)))]}
  assert len(first) <= -(-order.programs * order.per_chunk // tiles) + 1


@pytest.mark.parametrize("batch,heads,tiles,cores", [
    (2, 3, 4, 5), (1, 1, 1, 132), (3, 2, 5, 4), (1, 4, 7, 3),
    (4, 16, 4, 132), (1, 16, 128, 132), (2, 16, 64, 132)])
def test_snake_work_order_runs_each_item_once_and_balances(
    batch, heads, tiles, cores):
  """`WorkOrder`'s snake order: every (query tile, batch row, head) once,
  and the busiest program's work (tile t costs t + 1) within one tile's of
  the least busy one's: at 128 tiles a head, 16 heads and 132 programs
  within 0.3% of the mean, where the chunks leave 3%."""
  order = mosaic_schedule.WorkOrder(batch, heads, tiles, True, cores,
                                  snake=True)
  assert order.snakes
  assert order.programs == min(batch * heads * tiles, cores)
  work = _work_per_program(order)
  assert max(work) - min(work) <= tiles, work
  if tiles == 128:
    assert max(work) / np.mean(work) < 1.003, (max(work), np.mean(work))


def _documents_bounds(batch: int, tiles: int) -> jnp.ndarray:
  """The forward's bounds table (`structure.tile_bounds`, the Mosaic
  forward's 128-row tiles) of causal packed documents
  (`comparison.cells.packed_segment_ids`), `[B, tiles, 4]`."""
  ids = jnp.asarray(comparison_cells.packed_segment_ids(
      batch, tiles * mosaic_common.BLOCK_Q, seed=0), jnp.int32)
  q = jnp.zeros((batch, tiles * mosaic_common.BLOCK_Q, 1, 128), jnp.bfloat16)
  call = flash_kernel.prepare(
      fa.canonicalize(q, q, q, causal=True, segment_ids=ids), sm_scale=0.1,
      launch=flash_kernel.hopper_launch_config(128, True))
  return call.aux["bounds_fwd"]


@pytest.mark.parametrize("batch,heads,tiles,causal,cores", [
    (1, 16, 128, True, 132), (1, 16, 128, True, 20), (2, 3, 5, False, 4),
    (1, 4, 7, True, 3)])
def test_ranked_work_order_balances_uneven_tiles(batch, heads, tiles, causal,
                                                 cores):
  """`WorkOrder(ranked=True)` with `ranked_bounds`: every (tile, batch row,
  head) once, dealt by rank; on packed documents' tiles (work not growing
  with the index) the busiest program within 3% of the mean at 16 heads
  and 132 programs, where the order by index leaves it 25% over."""
  bounds = _documents_bounds(batch, tiles)
  work = np.asarray(bounds[..., 3] - bounds[..., 0])  # Key tiles per tile.
  table = np.asarray(mosaic_schedule.ranked_bounds(
      mosaic_schedule.pad_bounds(bounds)))
  loads = {}
  for ranked in (True, False):
    order = mosaic_schedule.WorkOrder(batch, heads, tiles, causal, cores,
                                    ranked=ranked)
    assert order.snakes == (mosaic_schedule.SNAKE_PROGRAMS_PER_HEAD * batch
                            * heads <= cores)
    seen, load = [], []
    for p in range(order.programs):
      items = [tuple(map(int, order.item(jnp.int32(p), jnp.int32(n))))
               for n in range(int(order.count(jnp.int32(p))))]
      if ranked:  # The row of rank r names its tile.
        items = [(table[b, r, mosaic_schedule.TILE_COLUMN], b, h)
                 for r, b, h in items]
      seen += items
      load.append(sum(work[b, t] for t, b, _ in items))
    assert sorted(seen) == sorted(itertools.product(
        range(tiles), range(batch), range(heads)))
    loads[ranked] = max(load) / np.mean(load)
  # Sorted by work, most first, each row keeping its own bounds.
  ranked_work = table[..., 3] - table[..., 0]
  assert (np.diff(ranked_work, axis=1) <= 0).all()
  np.testing.assert_array_equal(np.take_along_axis(
      np.asarray(bounds), table[..., mosaic_schedule.TILE_COLUMN, None], 1),
      table[..., :4])
  if tiles == 128 and cores == 132:
    assert loads[True] < 1.03 < 1.25 < loads[False], loads


@pytest.mark.parametrize("flag,kernel", [("RANKED_ORDER", "fwd"),
                                         ("RANKED_BWD_ORDER", "dkv"),
                                         ("RANKED_BWD_ORDER", "dq")])
def test_ranked_order_follows_the_structure(flag, kernel, monkeypatch):
  """`ranked_order`: with the kernel's flag, calls with segment ids or a
  mask_mod; never plain causal or a window (whose tiles' work the index
  already orders); the other kernel's flag leaves it off."""
  q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  ids = jnp.zeros((1, 256), jnp.int32)
  calls = {"causal": dict(causal=True), "window": dict(sliding_window=(8, 0)),
           "segments": dict(segment_ids=ids, causal=True),
           "mask_mod": dict(mask_mod=lambda b, h, i, j: i >= j)}
  other = {"fwd": "dkv", "dkv": "fwd", "dq": "fwd"}[kernel]
  for on in (False, True):
    monkeypatch.setattr(mosaic_schedule, flag, on)
    statics = {name: flash_kernel.prepare(
        fa.canonicalize(q, q, q, **call), sm_scale=0.1).static
               for name, call in calls.items()}
    ranked = {name: mosaic_schedule.ranked_order(st, kernel)
              for name, st in statics.items()}
    assert ranked == {"causal": False, "window": False, "segments": on,
                      "mask_mod": on}, ranked
    assert not any(mosaic_schedule.ranked_order(st, other)
                   for st in statics.values())


@pytest.mark.parametrize("kernel", ["dkv", "dq"])
def test_ranked_tile_order_balances_documents(kernel):
  """`ranked_tile_order` with `ranked_bounds` on a backward grid kernel's
  bounds (the dK/dV kernel's key tiles, the dQ kernel's query tiles; causal
  packed documents, 16k tokens, 16 heads): every (tile, batch row, head)
  once, each program's row naming its tile; its programs, started in
  CUDA's order on 132 multiprocessors (cost: the tiles a tile visits), end
  within 2% of an even split, where the default grouped order ends 5% or
  more over it."""
  batch, heads, seq = 1, 16, 16384
  ids = jnp.asarray(comparison_cells.packed_segment_ids(batch, seq, seed=0),
                    jnp.int32)
  q = jnp.zeros((batch, seq, 1, 128), jnp.bfloat16)
  bounds = flash_kernel.prepare(
      fa.canonicalize(q, q, q, causal=True, segment_ids=ids), sm_scale=0.1,
      launch=flash_kernel.hopper_launch_config(128, True, dq="mosaic")
  ).aux[f"bounds_{kernel}"]
  tiles = bounds.shape[1]
  work = np.asarray(bounds[..., 3] - bounds[..., 0])
  table = np.asarray(mosaic_schedule.ranked_bounds(
      mosaic_schedule.pad_bounds(bounds)))
  orders = {"ranked": mosaic_schedule.ranked_tile_order(batch, heads, tiles),
            "grouped": structure.TileOrder.choose(batch, heads, tiles, True,
                                                  132, kernel=kernel)}
  spans = {}
  for name, order in orders.items():
    programs = _launch_order(order)  # CUDA's order.
    if name == "ranked":  # The row of rank r names its tile.
      programs = [(int(table[b, r, mosaic_schedule.TILE_COLUMN]), b, h)
                  for r, b, h in programs]
    elif kernel == "dq":  # Its grid's tile axis runs backwards.
      programs = [(tiles - 1 - t, b, h) for t, b, h in programs]
    assert sorted(programs) == sorted(itertools.product(
        range(tiles), range(batch), range(heads)))
    costs = [work[b, t] for t, b, _ in programs]
    spans[name] = _makespan(costs, 132) / (sum(costs) / 132)
  assert spans["ranked"] < 1.02 < 1.05 < spans["grouped"], spans


@pytest.mark.parametrize("batch,heads,tiles,causal,snakes", [
    (1, 16, 128, True, True), (1, 32, 128, True, True),
    (2, 16, 64, True, True), (4, 16, 32, True, False),
    (8, 16, 16, True, False), (1, 16, 128, False, False)])
def test_work_order_deals_singly_where_heads_are_few(
    batch, heads, tiles, causal, snakes):
  """The rule on 132 multiprocessors (an H100): the snake order for causal
  calls of at most 33 heads (`SNAKE_PROGRAMS_PER_HEAD` = 4 programs a
  head), the chunks otherwise and for calls without a causal mask."""
  order = mosaic_schedule.WorkOrder(batch, heads, tiles, causal, 132)
  assert order.snakes == snakes
  assert order.per_chunk == (2 if causal and not snakes else 1)
  assert not dataclasses.replace(order, snake=False).snakes


@pytest.mark.skipif(gpu_interpret.UNAVAILABLE is not None,
                    reason=gpu_interpret.UNAVAILABLE or "")
@pytest.mark.parametrize("name", ["causal_empty_rows", "dropout_gqa"])
def test_persistent_forward_in_the_snake_order_in_gpu_interpreter(
    name, monkeypatch):
  """The persistent forward with its items in the snake order (3 programs;
  heads interleaved, tiles heaviest first): out and grads against the
  reference."""
  monkeypatch.setattr(gpu, "core_count", lambda: 3)
  monkeypatch.setattr(mosaic_schedule, "SNAKE_PROGRAMS_PER_HEAD", 0)
  call, shape = _hopper_case(name)
  launch = _mosaic(structure.pad_dim(shape["d"]), True, dq=True)
  with gpu_interpret.mosaic_on_cpu():
    _check(f"interpreted snake {name}", call, launch=launch,
           interpret=False, jit=False, **shape)


# Tiles dealt by rank, segments with grouped heads. The persistent forward's
# query tiles (`mosaic_schedule.RANKED_ORDER`, `WorkOrder.ranked`) on 3
# programs (8 items each), in the snake and in the chunks, causal and not
# (dQ by `mosaic_dq`); the backward grid kernels' tiles (`RANKED_BWD_ORDER`,
# `ranked_tile_order`): the split backward (the dK/dV and `mosaic_dq`
# kernels, both by rank), causal and not, and the fused one (dQ inside the
# dK/dV kernel, fixed point). name: (flag, causal, snake programs a head or
# None, dQ path).
RANKED_CASES = {
    "fwd_snake": ("RANKED_ORDER", True, 0, "mosaic"),
    "fwd_chunks": ("RANKED_ORDER", True, 1000, "mosaic"),
    "fwd_bidirectional": ("RANKED_ORDER", False, 1000, "mosaic"),
    "bwd_split_causal": ("RANKED_BWD_ORDER", True, None, "mosaic"),
    "bwd_split_full": ("RANKED_BWD_ORDER", False, None, "mosaic"),
    "bwd_fused_causal": ("RANKED_BWD_ORDER", True, None, "fused"),
}


def _ranked_case(variant, monkeypatch):
  """`(call, shape, launch)` of a `RANKED_CASES` variant: the Mosaic
  kernels, dQ by the variant's path."""
  flag, causal, per_head, dq = RANKED_CASES[variant]
  monkeypatch.setattr(mosaic_schedule, flag, True)
  if per_head is not None:
    monkeypatch.setattr(gpu, "core_count", lambda: 3)
    monkeypatch.setattr(mosaic_schedule, "SNAKE_PROGRAMS_PER_HEAD", per_head)
  call, shape = _hopper_case("segments")
  launch = flash_kernel.hopper_launch_config(structure.pad_dim(shape["d"]),
                                             causal, dq=dq)
  return dict(call, causal=causal), shape, launch


@pytest.mark.skipif(gpu_interpret.UNAVAILABLE is not None,
                    reason=gpu_interpret.UNAVAILABLE or "")
@pytest.mark.parametrize("variant", RANKED_CASES)
def test_tiles_by_rank_in_gpu_interpreter(variant, monkeypatch):
  """The kernels with their tiles dealt by rank: each item's or program's
  tile read from its bounds row (the forward's ring of 3 rows), out and
  grads against the reference."""
  call, shape, launch = _ranked_case(variant, monkeypatch)
  with gpu_interpret.mosaic_on_cpu():
    _check(f"interpreted ranked {variant}", call, launch=launch,
           interpret=False, jit=False, **shape)


@pytest.mark.skipif(not ON_HOPPER, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("variant", RANKED_CASES)
def test_hopper_tiles_by_rank(variant, monkeypatch):
  """As the interpreter's test, compiled."""
  call, shape, launch = _ranked_case(variant, monkeypatch)
  _check(f"hopper ranked {variant}", call, launch=launch, interpret=False,
         **shape)


# Cases of several items a program (3 multiprocessors): empty query tiles,
# grouped heads with segments, the dropout hash (bounds rows with the
# seed), a batch row without keys. On the GPU also D = 256 (one buffer of
# query rows; no Mosaic dQ there, so not in the interpreter) and MQA.
PERSISTENT_CASES = ("causal_empty_rows", "segments", "dropout_gqa",
                    "kv_lengths_with_zero")


@pytest.mark.skipif(not ON_HOPPER, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("name", ["causal_empty_rows", "dropout_gqa",
                                  "segments", "head_dim_256"])
def test_hopper_persistent_forward_in_the_snake_order(name, monkeypatch):
  """The snake order compiled on the GPU with several items a program (3
  programs; the default launches take it only from 4 programs a head, where
  each program of these small cases runs one item)."""
  monkeypatch.setattr(gpu, "core_count", lambda: 3)
  monkeypatch.setattr(mosaic_schedule, "SNAKE_PROGRAMS_PER_HEAD", 0)
  call, shape = _hopper_case(name)
  launch = _mosaic(structure.pad_dim(shape["d"]), True)
  _check(f"hopper snake {name}", call, launch=launch, interpret=False,
         **shape)


@pytest.mark.skipif(gpu_interpret.UNAVAILABLE is not None,
                    reason=gpu_interpret.UNAVAILABLE or "")
@pytest.mark.parametrize("name", PERSISTENT_CASES)
def test_persistent_forward_loops_over_work_items_in_gpu_interpreter(
    name, monkeypatch):
  """The persistent Mosaic forward with 3 programs (`gpu.core_count`), so
  each runs several query tiles, some without a key tile: its key-tile
  stream, prefetched bounds and double-buffered query rows carry across
  them (out and the grads of q, k, v against the reference; the backward is
  the Mosaic one)."""
  monkeypatch.setattr(gpu, "core_count", lambda: 3)
  call, shape = _hopper_case(name)
  launch = _mosaic(structure.pad_dim(shape["d"]), call.get("causal", False),
                   dq=True)
  with gpu_interpret.mosaic_on_cpu():
    _check(f"interpreted persistent {name}", call, launch=launch,
           interpret=False, jit=False, **shape)


@pytest.mark.skipif(not ON_HOPPER, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("name", PERSISTENT_CASES + ("head_dim_256",
                                                    "mqa_softcap"))
def test_hopper_persistent_forward_loops_over_work_items(name, monkeypatch):
  """The same compiled on the GPU, with 3 programs instead of one per
  multiprocessor."""
  monkeypatch.setattr(gpu, "core_count", lambda: 3)
  call, shape = _hopper_case(name)
  launch = _mosaic(structure.pad_dim(shape["d"]), call.get("causal", False))
  _check(f"hopper persistent {name}", call, launch=launch, interpret=False,
         **shape)


@pytest.mark.skipif(gpu_interpret.UNAVAILABLE is not None,
                    reason=gpu_interpret.UNAVAILABLE or "")
@pytest.mark.parametrize("name", ["causal_fewer_queries", "dropout_d64_window"])
def test_fused_backward_matches_reference_in_gpu_interpreter(name):
  """The fused backward (dQ added by TMA inside the Mosaic dK/dV kernel, in
  int32 fixed point: `mosaic_numerics.fixed_point_scales`) in JAX's GPU
  interpreter: out and grads against the reference."""
  call, shape = _hopper_case(name)
  launch = _fused(structure.pad_dim(shape["d"]), call.get("causal", False))
  with gpu_interpret.mosaic_on_cpu():
    _check(f"interpreted fused {name}", call, launch=launch,
           interpret=False, jit=False, **shape)


# `mosaic_common.WIDE_DKV_STEPS`: the split dK/dV kernel at D = 64 in steps
# of 128 query rows (the default) and of 64 (off); the cases at D = 64
# (causal with empty rows, a window with dropout, segments with grouped
# heads, MQA with a soft cap).
STEPS_CASES = [(name, wide) for name in (
    "causal_empty_rows", "dropout_d64_window", "segments", "mqa_softcap")
               for wide in (True, False)]
STEPS_IDS = [f"{name}-{'wide' if wide else 'narrow'}"
             for name, wide in STEPS_CASES]


def _steps_case(name, wide, monkeypatch):
  """`(call, shape, launch)` of a `STEPS_CASES` case at D = 64 with the
  wide steps on or off: the Mosaic kernels, dQ by `mosaic_dq` (`_mosaic`)."""
  monkeypatch.setattr(mosaic_common, "WIDE_DKV_STEPS", wide)
  call, shape = _hopper_case(name)
  shape["d"] = 64
  launch = _mosaic(64, call.get("causal", False), dq=True)
  assert launch.dkv.block_q == (mosaic_common.WIDE_DKV_BLOCK_Q if wide else
                                mosaic_common.DKV_BLOCK_Q)
  return call, shape, launch


@pytest.mark.skipif(gpu_interpret.UNAVAILABLE is not None,
                    reason=gpu_interpret.UNAVAILABLE or "")
@pytest.mark.parametrize("name, wide", STEPS_CASES, ids=STEPS_IDS)
def test_d64_dkv_steps_match_reference_in_gpu_interpreter(name, wide,
                                                          monkeypatch):
  """The dK/dV kernel's 128- and 64-row steps at D = 64 in JAX's GPU
  interpreter: out and the gradients of q, k, v against the float32
  reference."""
  call, shape, launch = _steps_case(name, wide, monkeypatch)
  with gpu_interpret.mosaic_on_cpu():
    _check(f"interpreted d64 steps {name} {wide}", call, launch=launch,
           interpret=False, jit=False, **shape)


@pytest.mark.skipif(not ON_HOPPER, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("name, wide", STEPS_CASES, ids=STEPS_IDS)
def test_hopper_d64_dkv_steps_match_reference(name, wide, monkeypatch):
  """As the interpreter's test, compiled: registers and waits included."""
  call, shape, launch = _steps_case(name, wide, monkeypatch)
  _check(f"hopper d64 steps {name} {wide}", call, launch=launch,
         interpret=False, **shape)


@pytest.mark.parametrize("wide, head_dim, options, rows", [
    (False, 64, {}, 64), (True, 64, {}, 128), (True, 128, {}, 64),
    (True, 64, dict(mask_mod=lambda b, h, q, k: q >= k), 64),
    (True, 64, dict(launch=flash_kernel.hopper_launch_config(64, dq="fused")),
     64)], ids=["off", "d64", "d128", "mods", "fused"])
def test_wide_dkv_steps_where_the_split_kernel_serves_d64(
    wide, head_dim, options, rows, monkeypatch):
  """`WIDE_DKV_STEPS` (on by default) widens the dK/dV kernel's steps at
  D = 64 only, and neither with mods nor in the fused backward; the default
  launches and the bounds table follow it (the dK/dV kernel refuses a
  launch whose rows are not its own)."""
  monkeypatch.setattr(mosaic_common, "WIDE_DKV_STEPS", wide)
  monkeypatch.setattr(gpu, "compute_capability", lambda: 9.0)
  launch = options.pop("launch", None)
  q = jnp.zeros((1, 256, 2, head_dim), jnp.bfloat16)
  call = flash_kernel.prepare(fa.canonicalize(q, q, q, **options),
                              sm_scale=0.1, launch=launch)
  assert call.static.launch.dkv_backend == "mosaic"
  assert call.static.launch.dkv.block_q == rows
  # Per key tile the query tiles `[lo, hi)` that see it, in tiles of the
  # kernel's rows: every key tile of these calls is seen by the last query.
  hi = np.asarray(call.aux["bounds_dkv"][..., 3])
  assert (hi == 256 // rows).all(), hi


# The schedules of the Mosaic dK/dV step (`mosaic_bwd_rows`), alone and
# together: names of its flags that are on (the others off, whatever their
# defaults); "unlagged" is the fused step before `DQ_LAG`.
SCHEDULES = {"unlagged": (), "dq_add": ("DQ_ADD_BESIDE_DK",),
             "lag": ("DQ_LAG",), "stagger": ("DQ_LAG", "STAGGER")}


@pytest.mark.skipif(gpu_interpret.UNAVAILABLE is not None,
                    reason=gpu_interpret.UNAVAILABLE or "")
@pytest.mark.parametrize("schedule, name", [
    ("dq_add", "dropout_d64_window"), ("dq_add", "causal_fewer_queries"),
    ("unlagged", "plain"), ("lag", "plain"), ("lag", "dropout_d64_window"),
    ("stagger", "causal_fewer_queries"), ("stagger", "segments"),
    ("stagger", "dropout_gqa")])
def test_step_schedules_match_reference_in_gpu_interpreter(
    schedule, name, monkeypatch):
  """`mosaic_bwd_rows.DQ_ADD_BESIDE_DK` (the fused step adds dQ while dK's
  wgmma runs), `DQ_LAG` (each fused step takes the dQ of the step before;
  the default, with `STAGGER`: its consumers half a step apart): the fused
  backward in JAX's GPU interpreter, against the reference. The
  interpreter runs each wgmma at once (it ignores `wait_n`), so this checks
  the step's values; the compiled test below checks the waits."""
  _check_schedule(schedule, name, monkeypatch, interpreted=True)


@pytest.mark.skipif(not ON_HOPPER, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", ["plain", "segments", "mqa_softcap",
                                  "dropout_gqa", "dropout_d64_window"])
def test_hopper_step_schedules_match_reference(name, schedule, monkeypatch):
  """The same compiled: a wrong wait reads a partial dp^T or dQ."""
  _check_schedule(schedule, name, monkeypatch, interpreted=False)


def _check_schedule(schedule: str, name: str, monkeypatch,
                    interpreted: bool):
  helpers.use_step_schedule(monkeypatch, SCHEDULES[schedule])
  call, shape = _hopper_case(name)
  launch = _fused(structure.pad_dim(shape["d"]), call.get("causal", False))
  with (gpu_interpret.mosaic_on_cpu() if interpreted
        else contextlib.nullcontext()):
    _check(f"schedule {schedule} {name}", call, launch=launch,
           interpret=False, jit=not interpreted, **shape)


def _grid_indices(grid, fastest: str):
  """Every program's grid indices, int32 `[programs]` per axis, in the order
  CUDA starts them: the grid's `fastest` ("first" or "last") axis fastest."""
  if fastest == "first":  # The reversed grid's last axis fastest.
    return _grid_indices(grid[::-1], "last")[::-1]
  return [jnp.asarray(i.ravel(), jnp.int32) for i in
          np.meshgrid(*map(np.arange, grid), indexing="ij")]


def _programs(named) -> list[tuple[int, int, int]]:
  return list(zip(*(np.asarray(x).tolist() for x in named)))


def _launch_order(order) -> list[tuple[int, int, int]]:
  """`TileOrder`'s `(tile, batch row, head)` per program, in the order CUDA
  starts them (linear index, the grid's first axis fastest), once through
  the named grid (Mosaic GPU's) and once through grid indices (Triton's);
  every program at once, as int32 vectors."""
  ids = _grid_indices(order.grid, "first")
  named = order.program(lambda name: ids[order.names.index(name)])
  assert _programs(named) == _programs(order.at(*ids))
  return _programs(named)


def _mosaic_launch_order(order) -> list[tuple[int, int, int]]:
  """As `_launch_order`, for a Mosaic GPU kernel over `order.mosaic_grid()`:
  Mosaic GPU launches a grid's last axis as CUDA's x (its Pallas lowering
  reverses the grid), so CUDA starts the programs with the last axis
  fastest."""
  mesh = order.mosaic_grid()
  ids = _grid_indices(mesh["grid"], "last")
  return _programs(order.program(
      lambda name: ids[mesh["grid_names"].index(name)]))


@pytest.mark.parametrize("group", [1, 4])
def test_mosaic_kernels_start_programs_in_tile_order(group, monkeypatch):
  """`structure.MOSAIC_TILES_FIRST`: a Mosaic GPU kernel launched over
  `TileOrder.mosaic_grid()` starts its programs in the order a Triton
  kernel over `TileOrder.grid` does, so head by head the first programs are
  the tiles of one (batch row, head), which share its operands in L2; with
  the flag off the first programs are one tile of every head."""
  order = structure.TileOrder(batch=2, heads=8, tiles=5, group=group)
  programs = _mosaic_launch_order(order)
  assert programs == _launch_order(order)
  assert sorted(programs) == sorted(itertools.product(range(5), range(2),
                                                      range(8)))
  if group == 1:
    assert [p[1:] for p in programs[:5]] == [(0, 0)] * 5
  monkeypatch.setattr(structure, "MOSAIC_TILES_FIRST", False)
  heads_first = _mosaic_launch_order(order)
  assert heads_first != programs
  if group == 1:
    assert [p[0] for p in heads_first[:16]] == [0] * 16


def _makespan(works, cores: int) -> float:
  """Programs started in order, each on the first free multiprocessor."""
  free = [0.0] * cores
  for w in works:
    heapq.heappush(free, heapq.heappop(free) + w)
  return max(free)


@pytest.mark.parametrize("kernel", ["dkv", "dq"])
@pytest.mark.parametrize("batch,heads,tiles", [
    (2, 16, 64), (4, 16, 32), (8, 16, 16), (1, 16, 128), (2, 3, 5)])
def test_grouped_tile_order_starts_heavy_tiles_first(
    kernel, batch, heads, tiles, monkeypatch):
  """`structure.TileOrder`: head by head with the flags off (the grid
  `(tiles, B, heads)`); with the kernel's flag (on by default for both) a
  causal call's programs in groups of
  heads, each program once, and in a model of the causal work list-scheduled
  on 132 multiprocessors within 2% of an even split (0.2% at 4k and 8k
  tokens) where head by head is 1-7% over it. dK/dV: key tile t of 128
  keys costs the 64-row query tiles from 2 t on; dQ: grid tile t is query
  tile `tiles - 1 - t` (heavy first), which costs the key tiles up to it."""
  cores = 132
  if kernel == "dkv":
    work = {t: 2 * tiles - 2 * t for t in range(tiles)}
  else:
    work = {t: tiles - t for t in range(tiles)}
  flag = {"dkv": "GROUPED_CAUSAL_DKV", "dq": "GROUPED_CAUSAL_DQ"}[kernel]
  choose = functools.partial(structure.TileOrder.choose, batch, heads, tiles,
                             cores=cores, kernel=kernel)
  for name in ("GROUPED_CAUSAL_DKV", "GROUPED_CAUSAL_DQ"):  # Head by head.
    monkeypatch.setattr(structure, name, False)
  head_by_head = choose(True)
  assert head_by_head.group == 1
  assert _launch_order(head_by_head) == [
      (t, b, h) for h in range(heads) for b in range(batch)
      for t in range(tiles)]
  monkeypatch.setattr(structure, flag, True)
  assert choose(False).group == 1
  other = {"dkv": "dq", "dq": "dkv"}[kernel]  # Each kernel its own flag.
  assert structure.TileOrder.choose(batch, heads, tiles, True, cores,
                                    kernel=other).group == 1
  order = choose(True)
  programs = _launch_order(order)
  assert sorted(programs) == sorted(itertools.product(
      range(tiles), range(batch), range(heads)))
  even = sum(work[t] for t, _, _ in programs) / cores
  grouped = _makespan([work[t] for t, _, _ in programs], cores) / even
  by_head = _makespan([work[t] for t, _, _ in _launch_order(head_by_head)],
                      cores) / even
  if batch * heads * tiles >= 4 * cores:
    assert grouped < min(by_head, 1.02), (grouped, by_head)
  if tiles in (32, 64):  # 4k and 8k tokens (dK/dV), 2k and 4k (dQ).
    assert grouped < 1.002 < 1.02 < by_head, (grouped, by_head)


def _grouped(monkeypatch, kernels=("dkv", "dq"), cores=6):
  """The flags of `kernels` on, the GPU of `cores` multiprocessors (the
  grids sized for it; a GPU runs them on all of its own)."""
  for kernel in kernels:
    monkeypatch.setattr(structure, f"GROUPED_CAUSAL_{kernel.upper()}", True)
  monkeypatch.setattr(gpu, "core_count", lambda: cores)


@pytest.mark.parametrize("atomic_dq", [False, True], ids=["split", "atomic"])
def test_grouped_order_in_triton_interpreter(atomic_dq, monkeypatch):
  """The Triton dK/dV and dQ kernels (and the bias gradient's, which shares
  dQ's) with their programs in groups of heads: out and grads against the
  reference (a causal case: dK/dV's B Hkv = 4 pairs in groups of 2 over 4
  key tiles, dQ's B H = 8 in groups of 2 over 3 query tiles; the dropout
  hash reads each program's batch row and head); `atomic`, dQ added by
  the dK/dV kernel."""
  _grouped(monkeypatch)
  shape = dict(b=2, h=4, hkv=2, sq=40, sk=56, d=32)
  nq = -(-shape["sq"] // SMALL_BLOCKS.block_q_dq)
  nk = -(-shape["sk"] // SMALL_BLOCKS.block_k_dkv)
  choose = functools.partial(structure.TileOrder.choose, causal=True,
                             cores=6)
  assert choose(shape["b"], shape["h"], nq, kernel="dq").group == 2
  assert choose(shape["b"], shape["hkv"], nk, kernel="dkv").group == 2
  _check("grouped_triton", dict(causal=True), bias_shape=(2, 4, 40, 56),
         dropout=_dropout(0.2), launch=ATOMIC_DQ if atomic_dq else None,
         **shape)


@pytest.mark.skipif(gpu_interpret.UNAVAILABLE is not None,
                    reason=gpu_interpret.UNAVAILABLE or "")
@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
def test_grouped_tile_order_in_gpu_interpreter(fused, monkeypatch):
  """The Mosaic dK/dV kernel (and the fused one) with its programs in
  groups of heads (2 of the 4 (batch row, KV head) pairs a group), and
  split, the Mosaic dQ kernel's too (2 of 8): out and grads against the
  reference."""
  _grouped(monkeypatch)
  call, shape = _hopper_case("dropout_gqa")  # B Hkv = 4, Nk = 3.
  assert structure.TileOrder.choose(
      shape["b"], shape["hkv"], 3, True, 6, kernel="dkv").group == 2
  assert structure.TileOrder.choose(
      shape["b"], shape["h"], 2, True, 6, kernel="dq").group == 4
  d = structure.pad_dim(shape["d"])
  launch = _fused(d, True) if fused else _mosaic(d, True, dq=True)
  with gpu_interpret.mosaic_on_cpu():
    _check(f"interpreted grouped {fused}", call, launch=launch,
           interpret=False, jit=False, **shape)


@pytest.mark.skipif(not ON_HOPPER, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("dq", ["fused", "mosaic", "triton"])
def test_hopper_grouped_tile_order_matches_reference(dq, monkeypatch):
  """The same compiled on the GPU, with each dQ kernel."""
  _grouped(monkeypatch)
  call, shape = _hopper_case("dropout_gqa")
  launch = dataclasses.replace(
      _mosaic(structure.pad_dim(shape["d"]), True, dq=dq == "mosaic"),
      atomic_dq=dq == "fused")
  _check(f"hopper grouped {dq}", call, launch=launch, interpret=False,
         **shape)


ROTATED_CASES = {  # Lengths in whole tiles: every program unmasked.
    "plain": (dict(b=2, sq=256, sk=384, d=128, dtype=jnp.bfloat16)),
    "gqa_dropout_d64": (dict(b=2, sq=256, sk=384, h=4, hkv=2, d=64,
                             dtype=jnp.bfloat16, dropout=_dropout(0.2))),
}


@pytest.mark.skipif(gpu_interpret.UNAVAILABLE is not None,
                    reason=gpu_interpret.UNAVAILABLE or "")
@pytest.mark.parametrize("name", list(ROTATED_CASES))
def test_fused_backward_with_rotated_steps_in_gpu_interpreter(name):
  """`rotate_dq=True`: each dK/dV program of a call without masked tiles
  walks its 4 query tiles from its key tile's index on (key tiles 0, 1, 2:
  offsets 0, 1, 2, wrapping), the producer's stream and the consumers' dQ
  rows alike; out and grads against the reference."""
  shape = ROTATED_CASES[name]
  launch = dataclasses.replace(_fused(shape["d"], False), rotate_dq=True)
  with gpu_interpret.mosaic_on_cpu():
    _check(f"interpreted rotated {name}", {}, launch=launch,
           interpret=False, jit=False, **shape)


@pytest.mark.skipif(not ON_HOPPER, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("name", list(ROTATED_CASES))
def test_hopper_rotated_fused_backward_matches_reference_bitwise(name):
  """`rotate_dq=True` compiled: out and grads against the reference, dQ,
  dK, dV bitwise equal over two runs, and dQ the same bits as without the
  rotation (the fixed point's sum does not depend on the order)."""
  shape = ROTATED_CASES[name]
  fused = _fused(shape["d"], False)
  rotated = dataclasses.replace(fused, rotate_dq=True)
  label = f"hopper rotated {name}"  # Seeds the inputs: the same for all.
  got, _ = _check(label, {}, launch=rotated, interpret=False, **shape)
  again, _ = _check(label, {}, launch=rotated, interpret=False, **shape)
  plain, _ = _check(label, {}, launch=fused, interpret=False, **shape)
  for what, a, b in zip(("out", "dq", "dk", "dv"), got, again):
    assert np.array_equal(np.asarray(a), np.asarray(b)), what
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(plain[1]))


@pytest.mark.skipif(not ON_HOPPER, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("name", [n for n in HOPPER_CASES
                                  if "head_dim_256" not in n] + ["long_gqa"])
def test_hopper_fused_backward_matches_reference_bitwise_run_to_run(name):
  """The fused backward (dQ inside the Mosaic dK/dV kernel, added in int32
  fixed point: `mosaic_numerics.fixed_point_scales`): out and grads against
  the reference, and dQ, dK, dV bitwise equal over two runs. `long_gqa`:
  16 key tiles add into each dQ tile, across two query heads per
  program."""
  if name == "long_gqa":
    call, shape = dict(causal=True), dict(b=1, sq=2048, sk=2048, h=4, hkv=2,
                                          d=128, dtype=jnp.bfloat16)
  else:
    call, shape = _hopper_case(name)
  launch = _fused(structure.pad_dim(shape["d"]), call.get("causal", False))
  got, _ = _check(f"hopper fused {name}", call, launch=launch,
                  interpret=False, **shape)
  again, _ = _check(f"hopper fused {name}", call, launch=launch,
                    interpret=False, **shape)
  for what, a, b in zip(("out", "dq", "dk", "dv"), got, again):
    assert np.array_equal(np.asarray(a), np.asarray(b)), what


def _fused_dq_per_row(interpret_on_cpu: bool):
  """The fused backward's dQ against the float32 reference's, row by row,
  with rows of dO spanning six decades (B = 1, S = 200, H = 2, D = 64,
  causal): each row's error relative to its own largest entry. A fixed
  point scaled per head would leave the small rows with none of their
  digits."""
  keys = jax.random.split(jax.random.key(7), 4)
  q, k, v, do = (jax.random.normal(key, (1, 200, 2, 64), jnp.float32)
                 for key in keys)
  do = do * 10.0**jnp.linspace(-3, 3, 200)[None, :, None, None]
  q, k, v, do = (x.astype(jnp.bfloat16) for x in (q, k, v, do))
  launch = _fused(64, True)

  def dq_of(attend, q, do):
    return jax.vjp(attend, q)[1](do)[0].astype(jnp.float32)

  def flash(q):
    inputs = fa.canonicalize(q, k, v, causal=True)
    return flash_kernel.flash_attention(inputs, sm_scale=0.125,
                                        launch=launch).out

  def ref(q):
    f32 = lambda x: x.astype(jnp.float32)
    inputs = fa.canonicalize(q, f32(k), f32(v), causal=True)
    return fa.reference_attention(inputs.query, inputs.key, inputs.value,
                                  None, inputs.visibility,
                                  sm_scale=0.125).out

  with (gpu_interpret.mosaic_on_cpu() if interpret_on_cpu else
        contextlib.nullcontext()):
    got = dq_of(flash, q, do)
  want = dq_of(ref, q.astype(jnp.float32), do.astype(jnp.float32))
  # Per row, relative to its largest entry (the first row's dQ is 0: it
  # sees one key).
  size = jnp.max(jnp.abs(want), axis=-1)
  err = jnp.max(jnp.abs(got - want), axis=-1) / jnp.where(size > 0, size, 1.0)
  return float(jnp.max(err))


@pytest.mark.skipif(gpu_interpret.UNAVAILABLE is not None,
                    reason=gpu_interpret.UNAVAILABLE or "")
def test_fused_backward_keeps_each_rows_precision_in_gpu_interpreter():
  assert _fused_dq_per_row(interpret_on_cpu=True) < TOL["bfloat16"]


@pytest.mark.skipif(not ON_HOPPER, reason="runs on an sm_90 GPU")
def test_hopper_fused_backward_keeps_each_rows_precision():
  assert _fused_dq_per_row(interpret_on_cpu=False) < TOL["bfloat16"]


@pytest.mark.skipif(not ON_HOPPER, reason="runs on an sm_90 GPU")
def test_hopper_fused_backward_does_not_spill():
  """ptxas keeps the fused dK/dV kernel in registers at Dp = 64 and 128,
  with float32 and fixed-point dQ (`tests/spill_gpu_check.py`, in a process of its own: Mosaic GPU reads
  `MOSAIC_GPU_DUMP_PTXAS` when it starts). At Dp = 128 it spilled 428
  bytes a thread, the K and V tiles' `wgmma` descriptors kept across the
  loop, until the kernel tied them to each step (`mosaic_common.
  step_zero`)."""
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1", PYTHONPATH=os.pathsep.join(
      [here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
  done = subprocess.run(
      [sys.executable, os.path.join(here, "spill_gpu_check.py")], env=env,
      capture_output=True, text=True, timeout=600, check=False)
  report = done.stdout + done.stderr
  assert done.returncode == 0, report[-4000:]
  # Per compile of the kernel (D = 64, 128; float32 in any order, int32
  # fixed point), its properties: "Function
  # properties for <kernel>", then "<n> bytes stack frame, <n> bytes spill
  # stores, <n> bytes spill loads".
  lines = report.splitlines()
  header = "Function properties for flash_dkdv_dq_mosaic_gpu_kernel"
  properties = [lines[n + 1] for n, line in enumerate(lines[:-1])
                if line.endswith(header)]
  assert len(properties) == 4, report[-4000:]
  for line in properties:
    assert ", 0 bytes spill stores, 0 bytes spill loads" in line, line


@pytest.mark.parametrize("dim", [0, 1], ids=["rows", "transposed"])
def test_mosaic_tile_dropout_is_the_librarys_keep_mask(dim):
  """What a Mosaic kernel evaluates for a tile (`TileDropout`: the seed's
  words out of the bounds row, then the program's, the rows' and the
  elements' stages of the hash) is `core.dropout.dropout_keep` at the
  global batch row and head (the seed's offsets added), for a tile of
  rows x keys (forward, dQ) and a transposed one (dK/dV)."""
  seed = jnp.array([123456789, 4000000000], jnp.uint32)
  offsets = jnp.array([3, 5], jnp.uint32)
  bounds = jnp.arange(8, dtype=jnp.int32).reshape(1, 2, 4)
  st = dataclasses.replace(_static_with_dropout(), dropout_rate=0.3)
  count = mosaic_schedule.bounds_count(st)
  q_pos = jnp.arange(64, dtype=jnp.int32) * 7 + 1
  kv_pos = jnp.arange(128, dtype=jnp.int32) * 3 - 40
  shape = (64, 128) if dim == 0 else (128, 64)

  @jax.jit  # One program (op by op, the hash's stages were ~90 of them).
  def row_got_and_want(seed, offsets, bounds, q_pos, kv_pos):
    row = mosaic_schedule.pad_bounds(bounds,
                                   jnp.concatenate([seed, offsets]))[0, 1]
    drop = mosaic_common.TileDropout(st, list(row[4:count]), jnp.int32(1))
    rows = drop.rows(jnp.int32(2), q_pos, shape, dim)
    got = drop.keep(rows, lax.broadcast_in_dim(kv_pos, shape, [1 - dim]))
    want = dropout_lib.dropout_keep(seed, 1 + 3, 2 + 5, q_pos[:, None],
                                    kv_pos[None, :], 0.3)
    return row, got, want

  row, got, want = row_got_and_want(seed, offsets, bounds, q_pos, kv_pos)
  assert row.shape == (mosaic_common.BOUNDS_ROW,)
  np.testing.assert_array_equal(row[:4], bounds[0, 1])
  np.testing.assert_array_equal(got, want if dim == 0 else want.T)
  assert 0.6 < float(jnp.mean(got)) < 0.8


def _static_with_dropout():
  """A `Static` of a small call with dropout, as `prepare` builds it
  (traced, never run: the static part is all it returns)."""
  x = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
  statics = []
  jax.eval_shape(lambda x, key: statics.append(flash_kernel.prepare(
      fa.canonicalize(x, x, x), dropout_lib.make_dropout(key, 0.5),
      sm_scale=0.125, interpret=True).static), x, jax.random.key(0))
  return statics[0]


# The Hopper cases whose kernels differ. Kv lengths and explicit positions
# reach the kernels as operands only: lowered at the same lengths, the three
# kernels of `kv_lengths_with_zero` are byte for byte those of `plain`, and
# those of `positions` those of `causal_fewer_queries` (measured), so they
# would lower the same kernels again at other lengths. (On an sm_90 GPU
# every case runs.)
HOPPER_LOWERING_CASES = tuple(n for n in HOPPER_CASES
                              if n not in ("kv_lengths_with_zero",
                                           "positions"))


@pytest.mark.parametrize("name", HOPPER_LOWERING_CASES)
def test_hopper_kernels_lower_for_cuda(name):
  """Forward (Mosaic GPU) and backward (dK/dV through Mosaic GPU, dQ
  through Triton) of every case lower: the gradient's program holds the
  three kernels, the forward's among them."""
  call, shape = _hopper_case(name)
  softcap = shape.pop("softcap", None)
  dropout = shape.pop("dropout", None)
  q, k, v, ct, _ = _inputs(name, **shape)
  d = structure.pad_dim(shape["d"])
  flash = _flash(call, dropout, 0.125, softcap, None,
                 _mosaic(d, call.get("causal", False)), False)

  def loss(q, k, v):
    return jnp.sum(flash(q, k, v, None).astype(jnp.float32) * ct)

  program = helpers.lower_for_cuda(jax.grad(loss, (0, 1, 2)), q, k, v)
  targets = re.findall(r"custom_call @\"?([\w$.]+)", program)
  kinds = sorted("mosaic" if "mosaic_gpu" in t else
                 "triton" if "triton" in t else t for t in targets)
  # Forward and dK/dV through Mosaic GPU, dQ through Triton: a Triton
  # forward would make two Triton kernels and one Mosaic.
  assert kinds == ["mosaic", "mosaic", "triton"], targets


def test_grouped_tile_order_lowers_for_cuda(monkeypatch):
  """The dK/dV and Triton dQ kernels' grids in groups of heads
  (`structure.TileOrder`) lower (a causal case)."""
  _grouped(monkeypatch)
  test_hopper_kernels_lower_for_cuda("dropout_gqa")


def test_persistent_forward_in_the_snake_order_lowers_for_cuda(monkeypatch):
  """The snake order's item arithmetic lowers inside the Mosaic forward (a
  causal case, 3 programs)."""
  monkeypatch.setattr(gpu, "core_count", lambda: 3)
  monkeypatch.setattr(mosaic_schedule, "SNAKE_PROGRAMS_PER_HEAD", 0)
  test_hopper_kernels_lower_for_cuda("causal_empty_rows")


@pytest.mark.skipif(not ON_HOPPER, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("shape", [
    dict(sq=100, sk=300), dict(sq=300, sk=200),
    dict(sq=300, sk=flash_launch.FUSED_DQ_MIN_KV_LEN)],
                         ids=["triton_forward", "mosaic_forward", "fused"])
def test_hopper_default_launches_match_reference(shape):
  """The launches `prepare` picks on Hopper: the Mosaic dK/dV kernel beside
  the Triton forward (fewer queries than the Mosaic forward's tile), and
  beside the Mosaic forward; from `FUSED_DQ_MIN_KV_LEN` keys on at D = 128,
  the fused backward."""
  _check("hopper default", dict(causal=True), blocks=None, interpret=False,
         b=2, d=128, dtype=jnp.bfloat16, **shape)


def _prepare(capability, monkeypatch, *, dtype=jnp.bfloat16, q_len=256,
             head_dim=128, block_sizes=None, launch=None, interpret=False,
             float32_results=False, then=None, **call):
  monkeypatch.setattr(gpu, "compute_capability", lambda: capability)
  q = jnp.zeros((1, q_len, 2, head_dim), dtype)
  k = jnp.zeros((1, 256, 2, head_dim), dtype)

  def prepare(q, k):
    return flash_kernel.prepare(
        fa.canonicalize(q, k, k, **call), sm_scale=0.1,
        block_sizes=block_sizes, launch=launch, interpret=interpret,
        float32_results=float32_results)

  # Traced (the checks run while tracing), never run: the launch, or
  # `then` applied to the prepared call.
  launches = []
  jax.eval_shape(lambda q, k: launches.append(
      prepare(q, k).static.launch if then is None else then(prepare(q, k))),
                 q, k)
  return launches[0]


@pytest.mark.parametrize("capability, options, backends", [
    (9.0, {}, ("mosaic", "mosaic")),
    (9.0, dict(causal=True, sliding_window=8), ("mosaic", "mosaic")),
    (8.0, {}, ("triton", "triton")),  # No wgmma before Hopper,
    (10.0, {}, ("triton", "triton")),  # nor after it.
    (9.0, dict(dtype=jnp.float32), ("triton", "triton")),
    # Shorter than the forward's 128-row tile, not than dK/dV's 64 queries.
    (9.0, dict(q_len=64), ("triton", "mosaic")),
    (9.0, dict(q_len=32), ("triton", "triton")),
    # dK/dV splits its columns across the consumers at D = 256.
    (9.0, dict(head_dim=256), ("mosaic", "mosaic")),
    (9.0, dict(block_sizes=fa.BlockSizes(block_q=64)), ("triton", "mosaic")),
    (9.0, dict(block_sizes=fa.BlockSizes(block_k_dkv=32)),
     ("mosaic", "triton")),
    (9.0, dict(bias=jnp.zeros((1, 2, 256, 256))), ("triton", "triton")),
    (9.0, dict(float32_results=True), ("triton", "triton")),  # A ring's.
], ids=["hopper", "hopper_window", "ampere", "blackwell", "float32", "short",
        "shorter", "head_dim_256", "user_fwd_tiles", "user_dkv_tiles", "bias",
        "float32_results"])
def test_default_backends(capability, options, backends, monkeypatch):
  launch = _prepare(capability, monkeypatch, **options)
  assert (launch.fwd_backend, launch.dkv_backend) == backends
  assert launch.dq_backend == "triton"  # Sk < launch.MOSAIC_DQ_MIN_KV_LEN.
  d = options.get("head_dim", 128)
  if launch.fwd_backend == "mosaic":
    assert launch.fwd == flash_kernel.mosaic_launch(d)
  if launch.dkv_backend == "mosaic":
    assert launch.dkv == flash_kernel.mosaic_dkv_launch(d)


@pytest.mark.parametrize("options, match", [
    (dict(interpret=True), "no interpreter"),
    (dict(dtype=jnp.float32), "bfloat16 or float16"),
    (dict(bias=jnp.zeros((1, 2, 256, 256))), "no bias"),
    (dict(launch=dataclasses.replace(_mosaic(128, False),
                                     fwd=flash_kernel.Launch(64, 64, 4, 2))),
     "takes fwd tiles 128 x 128"),
    (dict(float32_results=True), "caller wants float32 results"),
])
def test_mosaic_forward_refuses_what_it_cannot_serve(options, match,
                                                     monkeypatch):
  options.setdefault("launch", _mosaic(128, False))
  with pytest.raises(ValueError, match=match):
    _prepare(9.0, monkeypatch, **options)


@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_mosaic_kernels_refuse_float32_results_they_were_not_prepared_for(
    kernel, monkeypatch):
  rows = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)

  def run(call):
    if kernel == "forward":
      return flash_kernel.forward_pass(call, out_dtype=jnp.float32)
    return flash_kernel.backward_pass(call, rows, jnp.zeros((1, 2, 256)),
                                      rows, grad_dtype=jnp.float32)

  _prepare(9.0, monkeypatch, launch=_mosaic(128, False))  # Prepares.
  with pytest.raises(ValueError, match="float32_results=True"):
    _prepare(9.0, monkeypatch, launch=_mosaic(128, False), then=run)


def test_forward_backend_must_be_known():
  with pytest.raises(ValueError, match="fwd_backend must be one of"):
    flash_kernel.check_launch_config(dataclasses.replace(
        _mosaic(128, False), fwd_backend="cuda"))


@pytest.mark.parametrize("head_dim, launch, match", [
    (128, dataclasses.replace(_mosaic(128, False), dkv=flash_kernel.Launch(
        32, 128, 4, 3)), "takes dkv tiles 64 x 128"),
    # The tiles right, the warps not: nothing passed may go unused.
    (128, dataclasses.replace(_mosaic(128, False), fwd=flash_kernel.Launch(
        128, 128, 4, 2)), "takes fwd tiles 128 x 128 with 8 warps"),
    # D = 256 has 64-key programs.
    (256, dataclasses.replace(_mosaic(256, False), dkv=_mosaic(128, False).dkv),
     "takes dkv tiles 64 x 64 .* at padded head size 256"),
])
def test_mosaic_dkv_refusals(head_dim, launch, match, monkeypatch):
  with pytest.raises(ValueError, match=match):
    _prepare(9.0, monkeypatch, launch=launch, head_dim=head_dim)


def test_mosaic_dkv_alone_refuses_what_it_cannot_serve(monkeypatch):
  launch = dataclasses.replace(  # The Triton forward, the Mosaic dK/dV.
      _mosaic(128, False), fwd=flash_kernel.default_launch_config(128).fwd,
      fwd_backend="triton")
  with pytest.raises(ValueError, match="dkv_backend='mosaic' cannot serve "
                     "this call: it takes bfloat16 or float16"):
    _prepare(9.0, monkeypatch, launch=launch, dtype=jnp.float32)


# --- The module ---------------------------------------------------------------


@pytest.fixture(name="flash_registered")
def _flash_registered():
  """Registers "flash" for one test, unless the package already does.

  Until `mechanisms/__init__.py` imports it, importing the module registers
  the mechanism for the rest of the process; other tests pin the registry's
  contents, so the registration is undone afterwards.
  """
  before = "flash" in fa.available_mechanisms()
  from flexible_attention.mechanisms import flash  # pylint: disable=g-import-not-at-top
  if not before:
    registry._REGISTRY.setdefault("flash", flash.FlashAttention)  # pylint: disable=protected-access
  yield
  if not before:
    registry._REGISTRY.pop("flash", None)  # pylint: disable=protected-access


def _module_out(mechanism, q, k, v, rng, **options):
  def f(q, k, v):
    attn = fa.create_attention(mechanism, num_heads=q.shape[2],
                               head_dim=q.shape[3], num_kv_heads=k.shape[2],
                               **options)
    return attn(q, k, v, causal=True, deterministic=False).attention_outputs
  return hk.transform(f).apply({}, rng, q, k, v)


def test_module_refuses_cpu_without_interpret(flash_registered):
  del flash_registered
  q, k, v, _, _ = _inputs("refuse")
  with pytest.raises(NotImplementedError, match="flash.*gpu"):
    _module_out("flash", q, k, v, jax.random.key(0))


def test_module_rejects_invalid_block_sizes(flash_registered):
  del flash_registered
  def f(q):
    return fa.create_attention("flash", num_heads=2, head_dim=16,
                               interpret=True,
                               block_sizes=fa.BlockSizes(block_q=24))(q, q, q)
  q = jnp.ones((1, 8, 2, 16))
  with pytest.raises(ValueError, match="block_q.*power of two"):
    hk.transform(f).apply({}, None, q)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_launches_per_gpu_generation(head_dim, causal):
  hopper = flash_kernel.default_launch_config(head_dim, causal)
  assert flash_kernel.default_launch_config(head_dim, causal, 9.0) == hopper
  ampere = flash_kernel.default_launch_config(head_dim, causal, 8.0)
  for kernel in ("fwd", "dkv", "dq"):
    old, new = getattr(hopper, kernel), getattr(ampere, kernel)
    # Same tiles and warps; at most 2 stages (less shared memory).
    assert (new.block_q, new.block_k, new.num_warps) == (
        old.block_q, old.block_k, old.num_warps)
    assert new.num_stages == min(old.num_stages, 2)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_default_launches_fit_the_shared_memory_of_their_dtype(head_dim,
                                                               causal):
  """16-bit defaults are kept as measured; float32 ones shrink until their
  estimated shared memory is within the 16-bit footprint (or the budget):
  an H200 refused float32 at D = 128 with the 16-bit tiles (296 KiB)."""
  choose = functools.partial(
      flash_launch.choose_launch, head_dim=head_dim,
      value_dim=head_dim, q_len=4096, kv_len=4096, causal=causal, bias=False,
      mask=False, precision=None, interpret=False,
      block_sizes=None, launch=None, float32_results=False, groups=1)
  wide, narrow = choose(dtype=jnp.float32), choose(dtype=jnp.bfloat16)
  measured = flash_kernel.default_launch_config(head_dim, causal)
  for kernel in ("fwd", "dkv", "dq"):
    size = lambda launch, itemsize: flash_launch._triton_shared_memory(
        kernel, getattr(launch, kernel), head_dim, itemsize)
    assert size(wide, 4) <= max(size(measured, 2),
                                flash_launch.TRITON_SHARED_MEMORY), kernel
    if narrow.fwd_backend == "triton" or kernel == "dq":
      assert getattr(narrow, kernel) == getattr(measured, kernel), kernel
  if head_dim >= 128:  # Here the 16-bit tiles would not fit in float32.
    assert any(flash_launch._triton_shared_memory(
        kernel, getattr(measured, kernel), head_dim, 4) >
               flash_launch.TRITON_SHARED_MEMORY
               for kernel in ("fwd", "dkv", "dq"))


@pytest.mark.parametrize("bias_dtype, mask", [
    (jnp.bfloat16, False), (jnp.float32, False), (None, True),
    (jnp.bfloat16, True)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_dense_tiles_count_in_the_shared_memory(head_dim, mask, bias_dtype):
  """A bias or dense mask streams `[block_q, block_k]` tiles beside K and
  V: the Triton launches shrink until the sum fits. An H200 refused the
  16-bit forward at D = 256 (64 x 64, 3 stages) with a bfloat16 bias
  (246784 bytes) or an int8 mask (238592 of 232448 a block may have)."""
  for causal in (False, True):
    launch = flash_launch.choose_launch(
        dtype=jnp.bfloat16, head_dim=head_dim, value_dim=head_dim,
        q_len=4096, kv_len=4096, causal=causal, bias=bias_dtype is not None,
        mask=mask, precision=None, interpret=False,
        block_sizes=None, launch=None, float32_results=False, groups=1,
        bias_dtype=bias_dtype)
    pair_bytes = (0 if bias_dtype is None else jnp.dtype(bias_dtype).itemsize
                  ) + int(mask)
    measured = flash_kernel.default_launch_config(head_dim, causal)
    for kernel in ("fwd", "dkv", "dq"):
      size = flash_launch._triton_shared_memory(
          kernel, getattr(launch, kernel), head_dim, 2, pair_bytes)
      plain = flash_launch._triton_shared_memory(
          kernel, getattr(measured, kernel), head_dim, 2)
      assert size <= max(plain, flash_launch.TRITON_SHARED_MEMORY), kernel
    if head_dim == 256 and not causal:  # The launch the H200 refused.
      assert launch.fwd != measured.fwd


def test_module_refuses_head_dim_over_256(flash_registered):
  del flash_registered
  q = jnp.ones((1, 8, 1, 264))
  def f(q):
    return fa.create_attention("flash", num_heads=1, head_dim=264,
                               interpret=True)(q, q, q)
  with pytest.raises(NotImplementedError, match="up to 256"):
    hk.transform(f).apply({}, None, q)


def test_module_rejects_non_bool_interpret(flash_registered):
  del flash_registered
  def f(q):
    return fa.create_attention("flash", num_heads=2, head_dim=16,
                               interpret=1)(q, q, q)
  with pytest.raises(TypeError, match="interpret"):
    hk.transform(f).apply({}, None, jnp.ones((1, 8, 2, 16)))


def test_module_launch_sets_every_kernel_and_the_atomic_backward(
    flash_registered):
  """`launch=` reaches the kernels: through the module, the one-kernel
  backward's output and dq/dk/dv match the float32 reference."""
  del flash_registered
  q, k, v, ct, _ = _inputs("module_launch", sq=40, sk=40, h=4, hkv=2)
  launch = fa.FlashLaunchConfig(
      fwd=fa.FlashLaunch(16, 32, 4, 2), dkv=fa.FlashLaunch(32, 16, 4, 2),
      dq=fa.FlashLaunch(16, 16, 4, 2), atomic_dq=True,
      deterministic_dq=False)

  def flash(q, k, v):
    return _module_out("flash", q, k, v, None, interpret=True, launch=launch)

  def ref(q, k, v):
    inputs = fa.canonicalize(q, k, v, causal=True)  # As `_module_out` calls.
    return fa.reference_attention(
        inputs.query, inputs.key, inputs.value, None, inputs.visibility,
        sm_scale=q.shape[-1]**-0.5).out

  @functools.partial(jax.jit, static_argnums=0)
  def out_and_grads(f):
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(ct)

  got, want = out_and_grads(flash), out_and_grads(ref)
  for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert _rel(g, np.asarray(w)) <= TOL["float32"], what
  # The forward and the one backward kernel: the dQ kernel is not launched.
  traced = str(jax.make_jaxpr(lambda q, k, v: jax.vjp(flash, q, k, v)[1](ct))(
      q, k, v))
  assert traced.count("pallas_call[") == 2


@pytest.mark.parametrize("launch, error, match", [
    ("not a launch", TypeError, "LaunchConfig"),
    (flash_kernel.LaunchConfig(flash_kernel.Launch(24, 16, 4, 2),
                               flash_kernel.Launch(16, 16, 4, 2),
                               flash_kernel.Launch(16, 16, 4, 2)),
     ValueError, r"fwd\.block_q must be a power of two"),
    (flash_kernel.LaunchConfig(flash_kernel.Launch(16, 16, 4, 2),
                               flash_kernel.Launch(16, 16, 3, 2),
                               flash_kernel.Launch(16, 16, 4, 2)),
     ValueError, r"dkv\.num_warps"),
    (flash_kernel.LaunchConfig(flash_kernel.Launch(16, 16, 4, 2),
                               flash_kernel.Launch(16, 16, 4, 2),
                               flash_kernel.Launch(16, 16, 4, 0)),
     ValueError, r"dq\.num_stages"),
], ids=["type", "tile", "warps", "stages"])
def test_module_rejects_invalid_launches(flash_registered, launch, error,
                                         match):
  del flash_registered
  q = jnp.ones((1, 8, 2, 16))
  with pytest.raises(error, match=match):
    _module_out("flash", q, q, q, None, interpret=True, launch=launch)


def test_module_rejects_launch_with_block_sizes(flash_registered):
  del flash_registered
  q = jnp.ones((1, 8, 2, 16))
  with pytest.raises(ValueError, match="either in `launch` or in"):
    _module_out("flash", q, q, q, None, interpret=True,
                launch=flash_kernel.default_launch_config(16),
                block_sizes=fa.BlockSizes(block_q=16))
