"""flash's decode kernel (`kernels/flash/decode.py`) on CPU, interpreted.

`decode_attention` against the float32 reference (`fa.reference_attention`
on the pages gathered into a dense cache): paged caches with random,
non-contiguous tables, unassigned (-1) entries past the lengths and rows
sharing prefix pages; ragged lengths (0, and not a page multiple); 4 new
tokens with causal, a window (causal and not) and soft cap; GQA and MQA;
forced splits with empty ones; padded query slots (`q_valid`); a dense cache
through `dense_as_pages`; bfloat16; gradients of q and the pages. Plus the
launch rule, the Triton lowering for CUDA (on any machine) and the refusals.

Tolerance: relative to the largest reference magnitude, 2e-5 in float32 (the
interpreted kernel measures <= 3e-7 for outputs and lse, <= 5e-7 for
gradients) and 2e-2 in bfloat16 (measured 3e-3: the reference sees the same
bfloat16 inputs, the kernel rounds p to bfloat16 before `p . v`, as flash's
forward does).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.core import merge
from flexible_attention.core.inputs import poison_overflow
from flexible_attention.kernels import flash as flash_kernel
from flexible_attention.kernels import gpu
from flexible_attention.kernels.flash import launch as flash_launch
from flexible_attention.core import masks
from flexible_attention.kernels.flash import decode
from flexible_attention.kernels.flash import mosaic_decode
from flexible_attention.kernels.flash import structure
import gpu_interpret
import helpers

TOL = {"float32": 2e-5, "bfloat16": 2e-2}
# Compiling dominates on CPU: XLA's optimisation level 0 halves it.
JIT_OPTIONS = ({"xla_backend_optimization_level": 0}
               if jax.default_backend() == "cpu" else None)
BACKWARD_TILES = fa.BlockSizes(block_q=16, block_k=16, block_q_dkv=16,
                               block_k_dkv=16, block_q_dq=16, block_k_dq=16)


_rel = helpers.finite_relative_error


def _paged(name, *, b=4, sq=4, h=8, hkv=2, d=16, ps=4, max_pages=8,
           lengths=(29, 0, 13, 3), shared=3, dtype=jnp.float32):
  """Random q, pages and a non-contiguous table: rows 0 and 2 share their
  first `shared` pages, entries past each row's pages are -1 (unassigned).
  Queries are the last `sq` tokens of each row."""
  rng = helpers.rng_for(name)
  used = [-(-n // ps) for n in lengths]
  pool = sum(used) + 3  # A few pages nobody uses.
  ids = iter(rng.permutation(pool))
  table = np.full((b, max_pages), -1, np.int32)
  for row, n in enumerate(used):
    for j in range(n):
      table[row, j] = next(ids)
  if shared and len(lengths) > 2:
    table[2, :min(shared, used[0], used[2])] = table[0, :min(
        shared, used[0], used[2])]
  arr = lambda shape, scale=1.0: jnp.asarray(
      rng.standard_normal(shape) * scale, dtype)
  q = arr((b, sq, h, d), 2.0)
  kp = arr((pool, ps, hkv, d))
  vp = arr((pool, ps, hkv, d))
  lengths = jnp.asarray(lengths, jnp.int32)
  q_pos = lengths[:, None] - sq + jnp.arange(sq, dtype=jnp.int32)[None, :]
  return q, kp, vp, jnp.asarray(table), lengths, q_pos


def _reference(q, kp, vp, table, lengths, q_pos, *, sm_scale, softcap=None,
               causal=True, window=None, q_valid=None, overflow=None):
  """The float32 oracle on the pages gathered into a dense cache; the
  rows of `overflow` NaN."""
  b, max_pages = table.shape
  ids = jnp.clip(table, 0, kp.shape[0] - 1)
  dense = lambda p: p[ids].reshape(b, max_pages * p.shape[1], *p.shape[2:])
  inputs = fa.canonicalize(q, dense(kp), dense(vp), causal=causal,
                           kv_lengths=lengths, q_positions=q_pos,
                           sliding_window=window)
  res = fa.reference_attention(inputs.query, inputs.key, inputs.value, None,
                               inputs.visibility, sm_scale=sm_scale,
                               softcap=softcap)
  out, lse = res.out, res.lse
  if q_valid is not None:
    out = jnp.where(q_valid[:, :, None, None], out, 0.0)
    lse = jnp.where(q_valid[:, None, :], lse, -jnp.inf)
  return poison_overflow(out, lse, overflow)


# Jitted: eagerly the reference would dominate the file's time.
_reference_jit = jax.jit(_reference, static_argnames=(
    "sm_scale", "softcap", "causal", "window"), compiler_options=JIT_OPTIONS)


def _compare(got, want, tol, name):
  """Outputs and lse within `tol`; NaN (a row that overflowed) and -inf
  (a query that sees no key) exactly where the reference has them."""
  (out, lse), (ref_out, ref_lse) = got, want
  assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
  out, ref_out = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
  lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
  for what, x, ref in (("out", out, ref_out), ("lse", lse, ref_lse)):
    np.testing.assert_array_equal(np.isnan(x), np.isnan(ref),
                                  err_msg=f"{name}: NaN {what} differ")
  real = ~np.isnan(ref_out)
  err = _rel(out[real], ref_out[real])
  assert err <= tol, f"{name}: out error {err:.3g} > {tol}"
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse),
                                err_msg=f"{name}: empty rows differ")
  finite = np.isfinite(ref_lse)
  err = _rel(lse[finite], ref_lse[finite])
  assert err <= tol, f"{name}: lse error {err:.3g} > {tol}"


def _check(name, inputs, *, q_valid=None, overflow=None, **kw):
  """Runs the interpreted kernel (jitted) and the reference; compares."""
  kw.setdefault("sm_scale", 0.3)
  options = {k: kw.pop(k) for k in ("num_splits", "pages_per_block")
             if k in kw}
  fn = functools.partial(decode.decode_attention, interpret=True,
                         **options, **kw)
  res = jax.jit(fn, compiler_options=JIT_OPTIONS)(*inputs, q_valid=q_valid,
                                                  overflow=overflow)
  assert res.out.dtype == inputs[0].dtype and res.lse.dtype == jnp.float32
  assert res.weights is None
  want = _reference_jit(*inputs, q_valid=q_valid, overflow=overflow, **kw)
  _compare((res.out, res.lse), want, TOL[jnp.dtype(inputs[0].dtype).name],
           name)
  return res


# --- Kernel vs reference -----------------------------------------------------


@pytest.mark.parametrize("splits", [(None, None), (3, 4)],
                         ids=["default_split", "forced_splits_some_empty"])
def test_paged_gqa_ragged_causal_matches_reference(splits):
  """GQA 8/2, 4 new tokens, causal; lengths 29, 0 (zeros, lse -inf), 13
  and 3 (< Sq; not page multiples); shared prefix pages; -1 entries past
  the lengths. (3, 4): 3 splits of one 4-page block over an 8-page table,
  so the third split and most of the short rows' splits are empty."""
  inputs = _paged("paged_gqa")
  num_splits, pages_per_block = splits
  res = _check(f"paged_gqa {splits}", inputs, causal=True,
               num_splits=num_splits, pages_per_block=pages_per_block)
  np.testing.assert_array_equal(np.asarray(res.out[1]), 0.0)
  assert np.all(np.isneginf(np.asarray(res.lse[1])))


def test_window_softcap_mqa_with_padded_queries_matches_reference():
  """MQA (H = 4, Hkv = 1), causal window 5 and soft cap, two splits; row 0
  has 4 real new tokens, row 1 one, row 2 none (q_valid)."""
  inputs = _paged("mqa_window", b=3, h=4, hkv=1, lengths=(30, 17, 9))
  q_valid = jnp.asarray([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
  res = _check("mqa_window", inputs, q_valid=q_valid, causal=True, window=5,
               softcap=2.0, num_splits=2, pages_per_block=4)
  np.testing.assert_array_equal(np.asarray(res.out[1, 1:]), 0.0)
  assert np.all(np.isneginf(np.asarray(res.lse[2])))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_overflowing_rows_are_nan_and_the_others_exact(num_splits):
  """`overflow` (rows whose cache lost tokens): their out and lse are NaN,
  padded query slots included; the other rows match the reference."""
  inputs = _paged("overflow", lengths=(31, 20, 0, 12))
  q_valid = jnp.asarray(np.arange(4)[None, :] < np.array([[4], [2], [0],
                                                          [1]]))
  res = _check(f"overflow {num_splits}", inputs, q_valid=q_valid,
               overflow=jnp.asarray([False, True, True, False]), causal=True,
               num_splits=num_splits, pages_per_block=4)
  assert np.all(np.isnan(np.asarray(res.out[1:3])))
  assert not np.any(np.isnan(np.asarray(res.out[::3])))


@pytest.mark.parametrize("window", [None, 6])
def test_check_overflow_flags_the_rows_the_cache_write_flags(window):
  """`check_overflow`: the rows `cache_lib.overflowing_rows` finds (an
  entry below the length that names no page, a length past the table) are
  NaN, eagerly (no error for them) and under jit; the others match the
  reference, -1 entries past their lengths included."""
  q, kp, vp, table, n, pos = _paged("check_overflow", lengths=(29, 20, 32, 3))
  table = table.at[1, 2].set(-1).at[3, 5].set(kp.shape[0])
  n = n.at[2].set(33)  # Capacity 8 pages of 4.
  fn = functools.partial(decode.decode_attention, sm_scale=0.3, interpret=True,
                         check_overflow=True, window=window, num_splits=3,
                         pages_per_block=4)
  want = _reference_jit(q, kp, vp, table, jnp.minimum(n, 32), pos,
                        sm_scale=0.3, window=window,
                        overflow=jnp.asarray([False, True, True, False]))
  for run in (fn, jax.jit(fn, compiler_options=JIT_OPTIONS)):
    res = run(q, kp, vp, table, n, pos)
    _compare((res.out, res.lse), want, TOL["float32"], "check_overflow")
  # No gradient from the flagged rows; the others' as the reference's.
  ct = jnp.asarray(helpers.rng_for("check_overflow ct").standard_normal(
      q.shape), jnp.float32)

  def loss(attend):
    def run(q, kp, vp):
      out = attend(q, kp, vp)
      return jnp.sum(jnp.where(jnp.isnan(out), 0.0, out) * ct)
    return jax.jit(jax.grad(run, (0, 1, 2)), compiler_options=JIT_OPTIONS)

  got = loss(lambda q, kp, vp: fn(q, kp, vp, table, n, pos,
                                   block_sizes=BACKWARD_TILES).out)(q, kp, vp)
  want = loss(lambda q, kp, vp: _reference(
      q, kp, vp, table, jnp.minimum(n, 32), pos, sm_scale=0.3, window=window,
      overflow=jnp.asarray([False, True, True, False]))[0])(q, kp, vp)
  np.testing.assert_array_equal(got[0][1:3], 0.0)
  for what, g, w in zip(("dq", "dkey_pages", "dvalue_pages"), got, want):
    err = _rel(g, w)
    assert err <= TOL["float32"], f"check_overflow: {what} error {err:.3g}"
  with pytest.raises(ValueError, match="overflow or check_overflow"):
    fn(q, kp, vp, table, n, pos, overflow=jnp.zeros((4,), bool))
  with pytest.raises(ValueError, match=r"kv_lengths\[1\] = -1 is negative"):
    fn(q, kp, vp, table, n.at[1].set(-1), pos)


def test_non_causal_two_sided_window_matches_reference():
  """Without causal, window (6, 2): keys after the query are visible up to
  the row's length, and blocks before `q_pos - 6` are skipped."""
  inputs = _paged("two_sided", lengths=(31, 20, 5, 12), shared=0)
  _check("two_sided", inputs, causal=False, window=(6, 2), num_splits=4,
         pages_per_block=4)


def test_dense_cache_through_dense_as_pages_matches_reference():
  """A dense [B, L, Hkv, D] cache with an odd L (page size 1, 16 pages per
  block), GQA 4/2, ragged lengths, causal."""
  rng = helpers.rng_for("dense")
  b, length, sq, h, hkv, d = 2, 21, 3, 4, 2, 16
  keys = jnp.asarray(rng.standard_normal((b, length, hkv, d)), jnp.float32)
  values = jnp.asarray(rng.standard_normal((b, length, hkv, d)), jnp.float32)
  q = jnp.asarray(rng.standard_normal((b, sq, h, d)), jnp.float32)
  lengths = jnp.asarray([21, 7], jnp.int32)
  q_pos = lengths[:, None] - sq + jnp.arange(sq)[None, :]
  kp, vp, table = decode.dense_as_pages(keys, values)
  assert kp.shape == (b * length, 1, hkv, d) and table.shape == (b, length)
  inputs = fa.canonicalize(q, keys, values, causal=True, kv_lengths=lengths,
                           q_positions=q_pos)
  want = jax.jit(functools.partial(fa.reference_attention, sm_scale=0.25),
                 compiler_options=JIT_OPTIONS)(
                     inputs.query, inputs.key, inputs.value, None,
                     inputs.visibility)
  # With the table, and without it (page_table=None: the dense pages').
  for name, t in (("dense", table), ("dense, no table", None)):
    res = jax.jit(functools.partial(
        decode.decode_attention, sm_scale=0.25, causal=True, interpret=True,
        page_table=t), compiler_options=JIT_OPTIONS)(
            q, kp, vp, kv_lengths=lengths, q_positions=q_pos)
    _compare((res.out, res.lse), (want.out, want.lse), TOL["float32"], name)


def test_dense_as_pages_is_a_reshape():
  """The page size is the largest power of two <= 128 dividing L, the
  pages are the cache's own layout and the table counts them in order."""
  for length, page_size in ((256, 128), (24, 8), (9, 1), (640, 128)):
    keys = jnp.arange(2 * length * 2 * 16, dtype=jnp.float32).reshape(
        2, length, 2, 16)
    kp, vp, table = decode.dense_as_pages(keys, keys[..., :8])
    assert kp.shape[1] == page_size and vp.shape[-1] == 8
    np.testing.assert_array_equal(
        np.asarray(kp), np.asarray(keys).reshape(-1, page_size, 2, 16))
    np.testing.assert_array_equal(
        np.asarray(table).ravel(), np.arange(2 * length // page_size))


def test_bfloat16_matches_reference():
  """bf16 inputs, GQA, causal, two splits (tolerance 2e-2)."""
  inputs = _paged("bf16", dtype=jnp.bfloat16, lengths=(32, 25, 8, 1))
  _check("bf16", inputs, causal=True, num_splits=2, pages_per_block=4)


# --- Gradients ---------------------------------------------------------------


@pytest.mark.parametrize("case", ["gqa_causal_padded", "mqa_window_softcap",
                                  "overflowing_rows"])
def test_gradients_match_reference(case):
  """d/dq, d/dkey_pages and d/dvalue_pages of a loss of out and lse (shared
  pages sum their rows' gradients) against the reference's; a row that
  overflowed (NaN out and lse) gives none."""
  overflow = None
  if case in ("gqa_causal_padded", "overflowing_rows"):
    inputs = _paged(case, b=3, lengths=(22, 0, 13))
    kw = dict(causal=True, window=None, softcap=None)
    q_valid = jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], bool)
    if case == "overflowing_rows":
      overflow = jnp.asarray([True, False, True])
  else:
    inputs = _paged(case, b=2, h=2, hkv=1, lengths=(27, 11))
    kw = dict(causal=True, window=6, softcap=2.5)
    q_valid = None
  q, kp, vp, table, lengths, q_pos = inputs
  rng = helpers.rng_for(case + " ct")
  ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  ct_lse = jnp.asarray(rng.standard_normal((q.shape[0], q.shape[2],
                                            q.shape[1])), jnp.float32)

  def loss(fn):
    def run(q, kp, vp):
      out, lse = fn(q, kp, vp)
      lse = jnp.where(jnp.isneginf(lse), 0.0, lse)
      return jnp.sum(out * ct) + jnp.sum(lse * ct_lse)
    return run

  def kernel(q, kp, vp):
    res = decode.decode_attention(
        q, kp, vp, table, lengths, q_pos, sm_scale=0.3, q_valid=q_valid,
        num_splits=2, pages_per_block=4, block_sizes=BACKWARD_TILES,
        interpret=True, overflow=overflow, **kw)
    return res.out, res.lse

  def reference(q, kp, vp):
    return _reference(q, kp, vp, table, lengths, q_pos, sm_scale=0.3,
                      q_valid=q_valid, overflow=overflow, **kw)

  got = jax.jit(jax.grad(loss(kernel), (0, 1, 2)),
                compiler_options=JIT_OPTIONS)(q, kp, vp)
  want = jax.jit(jax.grad(loss(reference), (0, 1, 2)),
                 compiler_options=JIT_OPTIONS)(q, kp, vp)
  if overflow is not None:  # The kernel's out and lse are NaN there.
    out, lse = jax.jit(kernel, compiler_options=JIT_OPTIONS)(q, kp, vp)
    assert np.all(np.isnan(out[overflow])) and np.all(np.isnan(lse[overflow]))
    assert not np.any(np.isnan(out[~overflow]))
  for what, g, w in zip(("dq", "dkey_pages", "dvalue_pages"), got, want):
    assert g.shape == w.shape and np.all(np.isfinite(g))
    err = _rel(g, w)
    assert err <= TOL["float32"], f"{case}: {what} error {err:.3g}"


# --- Launch rule and lowering ------------------------------------------------


def test_split_rule_fills_the_gpu():
  """Splits fill ~2 waves of the SMs (at least 2 splits under 4 waves),
  each split a whole number of blocks and at least 4 of them; an explicit
  count is kept (even if empty)."""
  one_row = flash_kernel.decode_launch(1, 8, 1024, 128, 128, core_count=132)
  assert one_row.pages_per_block == 1 and one_row.num_splits == 32
  assert one_row.num_splits * one_row.pages_per_split >= 1024
  small = flash_kernel.decode_launch(8, 8, 256, 16, 128, core_count=132)
  assert small.pages_per_block == 8
  assert small.pages_per_split % 8 == 0 and small.num_splits == 5
  big_batch = flash_kernel.decode_launch(64, 8, 256, 16, 128, core_count=132)
  assert big_batch.num_splits == 2  # 512 programs: under 4 waves.
  bigger = flash_kernel.decode_launch(128, 8, 256, 16, 128, core_count=132)
  assert bigger.num_splits == 1
  short = flash_kernel.decode_launch(1, 1, 12, 16, 128, core_count=132)
  assert short.num_splits == 1  # 2 blocks: too few to split.
  forced = flash_kernel.decode_launch(2, 2, 8, 4, 16, num_splits=8,
                                pages_per_block=4)
  assert forced.num_splits == 8 and forced.pages_per_split == 4
  assert flash_kernel.decode_launch(2, 2, 8, 4, 256).pages_per_block == 8


def _abstract_decode_args(sq, h, hkv, d, page_size, b=2, pool=64,
                          max_pages=32):
  """`decode_attention`'s array arguments as bf16 / int32 shapes (for
  lowering): q, key and value pages, table, lengths, positions."""
  s = jax.ShapeDtypeStruct
  pages = s((pool, page_size, hkv, d), jnp.bfloat16)
  return (s((b, sq, h, d), jnp.bfloat16), pages, pages,
          s((b, max_pages), jnp.int32), s((b,), jnp.int32),
          s((b, sq), jnp.int32))


@pytest.mark.parametrize("sq,page_size", [(1, 16), (4, 128)])
def test_kernel_lowers_for_cuda(sq, page_size):
  """bf16, D = 128, GQA 32/8, window and soft cap: the compiled (Triton)
  path lowers."""
  args = _abstract_decode_args(sq, 32, 8, 128, page_size)
  fn = functools.partial(decode.decode_attention, sm_scale=0.1, window=64,
                         softcap=30.0, num_splits=4)
  assert "triton" in helpers.lower_for_cuda(fn, *args)


# --- Bad inputs -------------------------------------------------------------


def _bad_cases():
  q, kp, vp, table, lengths, q_pos = _paged("bad", b=2, lengths=(9, 5))
  ok = dict(q=q, key_pages=kp, value_pages=vp, page_table=table,
            kv_lengths=lengths, q_positions=q_pos)
  cases = {
      "key_pages_rank": (dict(key_pages=kp[0]), ValueError, "key_pages"),
      "key_pages_head_size": (dict(key_pages=kp[..., :8]), ValueError,
                              "key_pages"),
      "value_pages_shape": (dict(value_pages=vp[:-1]), ValueError,
                            "value_pages"),
      "key_pages_dtype": (dict(key_pages=kp.astype(jnp.bfloat16)), TypeError,
                          "key_pages"),
      "mismatched_hkv": (dict(value_pages=vp[:, :, :1]), ValueError,
                         "value_pages"),
      "heads_not_a_multiple_of_hkv": (
          dict(key_pages=jnp.concatenate([kp, kp[:, :, :1]], 2),
               value_pages=jnp.concatenate([vp, vp[:, :, :1]], 2)),
          ValueError, "Hkv = 3"),
      "page_size_not_power_of_2": (dict(key_pages=kp[:, :3],
                                        value_pages=vp[:, :3]), ValueError,
                                   "page size"),
      "page_table_shape": (dict(page_table=table[:1]), ValueError,
                           "page_table"),
      "page_table_dtype": (dict(page_table=table.astype(jnp.float32)),
                           TypeError, "page_table"),
      "kv_lengths_shape": (dict(kv_lengths=lengths[:, None]), ValueError,
                           "kv_lengths"),
      "q_positions_shape": (dict(q_positions=q_pos[:, :2]), ValueError,
                            "q_positions"),
      "q_valid_shape": (dict(q_valid=jnp.ones((2, 3), bool)), ValueError,
                        "q_valid"),
      "q_valid_dtype": (dict(q_valid=jnp.ones((2, 4), jnp.int32)), TypeError,
                        "q_valid"),
      "page_table_out_of_range": (dict(page_table=table.at[1, 1].set(999)),
                                  ValueError, r"page_table\[1, 1\]"),
      "kv_lengths_over_capacity": (dict(kv_lengths=lengths.at[0].set(33)),
                                   ValueError, r"kv_lengths\[0\]"),
      "sm_scale": (dict(sm_scale=0.0), ValueError, "sm_scale"),
      "softcap": (dict(softcap=float("inf")), ValueError, "softcap"),
      "num_splits": (dict(num_splits=0), ValueError, "num_splits"),
      "pages_per_block": (dict(pages_per_block=2), ValueError,
                          "pages_per_block"),
  }
  return ok, cases


_OK, _BAD = _bad_cases()


@pytest.mark.parametrize("case", sorted(_BAD))
def test_bad_inputs_raise_naming_the_argument(case):
  change, error, match = _BAD[case]
  args = dict(_OK, sm_scale=0.3, interpret=True)
  args.update(change)
  with pytest.raises(error, match=match):
    decode.decode_attention(**args)


def test_unassigned_entries_past_the_lengths_are_never_read():
  """Table entries past a row's length may hold anything (here -1 and a
  huge index), eagerly and under jit."""
  inputs = _paged("unassigned", b=2, lengths=(9, 5))
  q, kp, vp, table, lengths, q_pos = inputs
  # Row 0 uses pages 0..2, row 1 pages 0..1: entries 3.. share their block.
  junk = table.at[:, 3:].set(jnp.asarray([10**6, -1, -7, 3, 2], jnp.int32))
  fn = functools.partial(decode.decode_attention, sm_scale=0.3, interpret=True,
                         pages_per_block=4)
  got = jax.jit(fn, compiler_options=JIT_OPTIONS)(q, kp, vp, junk, lengths,
                                                  q_pos)
  _compare(got[:2], _reference_jit(*inputs, sm_scale=0.3), TOL["float32"],
           "unassigned")


def test_exported_from_the_package():
  assert flash_kernel.decode_attention is decode.decode_attention
  assert flash_kernel.dense_as_pages is decode.dense_as_pages
  assert flash_kernel.DecodeLaunch is decode.DecodeLaunch


# --- The Mosaic GPU (Hopper) decode kernel -----------------------------------
# Mosaic GPU has no interpreter here: on CPU the kernel's lowering for CUDA
# runs (layouts, tiling, TMA shapes are checked there); on an sm_90 GPU it is
# run against the reference (bf16: TOL["bfloat16"]).

_HOPPER = 9.0 <= (gpu.compute_capability() or 0.0) < 10.0


@pytest.mark.parametrize("sq,h,d,page_size,kw", [
    (1, 32, 128, 16, {}),
    (1, 32, 64, 16, dict(block_tokens=128, stages=3)),
    (1, 32, 128, 128, dict(block_tokens=64)),
    (4, 32, 64, 128, dict(window=64, softcap=30.0)),
    (16, 16, 256, 8, dict(causal=False, window=(8, 8))),
    (1, 32, 128, 16, dict(num_splits=1)),
    (4, 32, 64, 128, dict(num_splits=1, window=64)),
    (16, 16, 256, 8, dict(num_splits=1, causal=False)),
    (1, 32, 128, 16, dict(producers=2)),
], ids=["decode_d128_ps16", "decode_d64_ps16_three_slots_of_128",
        "decode_d128_ps128_page_slices",
        "four_new_d64_ps128_window_softcap",
        "sixteen_new_d256_ps8_two_sided_window",
        "one_split_d128", "one_split_four_new_d64_window",
        "one_split_sixteen_new_d256", "decode_d128_ps16_two_producers"])
def test_mosaic_kernel_lowers_for_cuda(sq, h, d, page_size, kw):
  """bf16, Hkv = 4 (up to 64 query rows per KV head): the Mosaic GPU
  kernel (and no Triton kernel) lowers, reading the queries as they come;
  with one split it writes the attention in the call's layout and dtype
  itself (nothing but the lse's relayout after it)."""
  args = _abstract_decode_args(sq, h, 4, d, page_size)
  kw = {"num_splits": 3, **kw}
  fn = functools.partial(decode.decode_attention, sm_scale=0.1,
                         backend="mosaic", **kw)
  text = helpers.lower_for_cuda(fn, *args)
  assert "mosaic_gpu" in text and "triton" not in text
  # The kernel reads the queries as they come (it gathers each KV head's
  # rows itself).
  assert re.search(r"stablehlo.custom_call @mosaic_gpu\w*\(%arg0,", text)
  if sq > 1:  # With padded query slots (a `[B, Sq]` operand more).
    valid = jax.ShapeDtypeStruct(args[0].shape[:2], jnp.bool_)
    assert "mosaic_gpu" in helpers.lower_for_cuda(
        lambda *a: fn(*a[:-1], q_valid=a[-1]), *args, valid)
  else:  # A dense cache's pages (64 = 2 rows of 32), without a table.
    no_table = helpers.lower_for_cuda(
        lambda q, kp, vp, table, n, pos: fn(q, kp, vp, None, n, pos), *args)
    # q, the pages, lengths and positions: no table, no rows' poison.
    operands = re.search(r"custom_call @mosaic_gpu\w*\(([^)]*)\)", no_table)
    assert len(operands.group(1).split(",")) == 5, operands.group(1)
  if kw["num_splits"] == 1:  # The output is the kernel's, untouched, with
    # overflowing rows too (the kernel writes their NaN).
    overflow = jax.ShapeDtypeStruct(args[0].shape[:1], jnp.bool_)
    out_only = helpers.lower_for_cuda(
        lambda *a: fn(*a[:-1], overflow=a[-1])[0], *args, overflow)
    name = re.search(r"(%\w+):2 = stablehlo.custom_call @mosaic_gpu",
                     out_only).group(1)
    assert re.search(rf"return {name}#0 :", out_only)


@pytest.mark.parametrize("causal,window", [
    (True, None), (False, None), (True, (5, 0)), (False, (3, 2))],
    ids=["causal", "full", "causal_window", "two_sided_window"])
def test_token_range_holds_every_visible_key(causal, window):
  """`DecodeStatic.token_range`, which both kernels skip by: the Mosaic
  kernel's scalar form (`mosaic_decode._token_range`, run here on arrays
  standing for its refs) equals the `[B]` form the Triton kernel's
  operands get; every key a real query of the row sees lies in `[lo, hi)`,
  inside `[0, length]`; a row with no real query has an empty range."""
  rng = helpers.rng_for(f"token_range_{causal}_{window}")
  batch, q_len, capacity = 64, 4, 48
  lengths = jnp.asarray(rng.integers(-2, 60, batch), jnp.int32)
  positions = jnp.asarray(rng.integers(-8, 70, (batch, q_len)), jnp.int32)
  valid = jnp.asarray(rng.random((batch, q_len)) < 0.6)
  assert not valid.all(axis=1).all() and not valid.any(axis=1).all()
  st = structure.DecodeStatic(sm_scale=1.0, softcap=None, precision=None,
                              causal=causal, window=window, launch=None,
                              interpret=True)
  big = 2**30
  pos = jnp.clip(positions, -big, big)
  length, lo, hi = (np.broadcast_to(np.asarray(x), (batch,)) for x in
                    st.token_range(
                        lengths, jnp.min(jnp.where(valid, pos, big), axis=1),
                        jnp.max(jnp.where(valid, pos, -big), axis=1),
                        jnp.any(valid, axis=1), capacity))
  tokens = jnp.arange(capacity)
  for b in range(batch):
    scalars = mosaic_decode._token_range(st, lengths, positions,
                                         valid.astype(jnp.int32), b, capacity)
    assert [int(x) for x in scalars] == [length[b], lo[b], hi[b]]
    seen = masks.pair_visible(
        valid[b][:, None] & (tokens < lengths[b])[None, :],
        positions[b][:, None], tokens[None, :], causal=causal, window=window)
    seen = np.flatnonzero(np.asarray(seen.any(axis=0)))
    assert 0 <= length[b] <= capacity
    assert np.all((seen >= lo[b]) & (seen < hi[b])), b
    assert lo[b] >= 0 and hi[b] <= length[b]
    if not valid[b].any():
      assert hi[b] <= lo[b]


def test_mosaic_launch_rule():
  """Slots per head size; splits of whole blocks and whole pages that
  cover the table, in whole waves of programs; the shared-memory budget is
  checked."""
  one_row = flash_kernel.mosaic_decode_launch(1, 8, 8192, 16, 128,
                                              core_count=132)
  assert (one_row.block_tokens, one_row.stages) == (128, 2)
  assert one_row.num_splits == 16  # 128 programs: one wave.
  eight_rows = flash_kernel.mosaic_decode_launch(8, 8, 2048, 16, 128,
                                           core_count=132)
  assert eight_rows.num_splits == 2  # 128 programs of 256 blocks.
  # A short row: as many splits as keep 2 blocks each (64 programs of 4
  # blocks fill no wave).
  short_row = flash_kernel.mosaic_decode_launch(1, 8, 256, 16, 128,
                                                core_count=132)
  assert (short_row.num_splits, short_row.tokens_per_split) == (16, 256)
  assert one_row.tokens_per_split % 128 == 0
  assert one_row.num_splits * one_row.tokens_per_split >= 8192 * 16
  big_page = flash_kernel.mosaic_decode_launch(8, 8, 32, 128, 128, num_splits=5)
  assert big_page.tokens_per_split % 128 == 0 and big_page.num_splits == 5
  assert flash_kernel.mosaic_decode_launch(2, 2, 8, 16, 256).stages == 2
  with pytest.raises(ValueError, match="shared memory"):
    flash_kernel.mosaic_decode_launch(2, 2, 8, 16, 128, block_tokens=128,
                                      stages=4)
  with pytest.raises(ValueError, match="block_tokens"):
    flash_kernel.mosaic_decode_launch(2, 2, 8, 16, 128, block_tokens=32)
  assert one_row.producers == 1  # Keys and values from one warpgroup.
  assert flash_kernel.mosaic_decode_launch(
      1, 8, 8192, 16, 128, producers=2, core_count=132) == (
          dataclasses.replace(one_row, producers=2))
  for bad in (0, 3, True, 2.0):
    with pytest.raises(ValueError, match="producers"):
      flash_kernel.mosaic_decode_launch(2, 2, 8, 16, 128, producers=bad)


def test_backend_policy_refuses_what_it_cannot_serve():
  """Triton without a Hopper GPU; asking for Mosaic where it cannot serve,
  or giving the other backend's launch fields, is an error."""
  q, kp, vp, table, lengths, q_pos = _paged("policy", b=2, lengths=(9, 5))
  args = dict(q=q, key_pages=kp, value_pages=vp, page_table=table,
              kv_lengths=lengths, q_positions=q_pos, sm_scale=0.3)
  choose = flash_launch.choose_decode_backend
  assert choose(None, mosaic_reason="x", triton_fields=False,
                mosaic_fields=False, interpret=True) == "triton"
  with pytest.raises(ValueError, match="no interpreter"):
    decode.decode_attention(**args, backend="mosaic", interpret=True)
  with pytest.raises(ValueError, match="float32"):
    decode.decode_attention(**args, block_tokens=64)
  with pytest.raises(ValueError, match="float32"):  # A Mosaic field too.
    decode.decode_attention(**args, producers=2)
  with pytest.raises(ValueError, match="unused"):
    choose("triton", mosaic_reason=None, triton_fields=False,
           mosaic_fields=True, interpret=False)
  with pytest.raises(ValueError, match="backend"):
    decode.decode_attention(**args, backend="cuda", interpret=True)


@pytest.mark.parametrize("page_size", [16, None], ids=["paged", "dense"])
def test_mosaic_kernel_tests_the_cache_itself(page_size):
  """`check_overflow` on the Mosaic kernel: the kernel takes no rows'
  poison and XLA runs no reduction over the table before it (the lowered
  program reduces as much as a call without the test); with a window
  (entries below it are never read) the test is an XLA reduction."""
  args = _abstract_decode_args(1, 32, 8, 128, page_size or 16)

  def lowered(**kw):
    fn = functools.partial(decode.decode_attention, sm_scale=0.1,
                           backend="mosaic", num_splits=3, **kw)
    if page_size is None:  # A dense cache's pages: no table.
      return helpers.lower_for_cuda(
          lambda q, kp, vp, n, pos: fn(q, kp, vp, None, n, pos),
          *args[:3], *args[4:])
    return helpers.lower_for_cuda(fn, *args)

  reductions = lambda text: text.count("stablehlo.reduce")
  plain, checked = lowered(), lowered(check_overflow=True)
  operands = re.search(r"custom_call @mosaic_gpu\w*\(([^)]*)\)", checked)
  assert len(operands.group(1).split(",")) == 5 + (page_size is not None)
  assert reductions(checked) == reductions(plain)
  if page_size:
    assert (reductions(lowered(check_overflow=True, window=64)) >
            reductions(lowered(window=64)))


def _dense_bf16(name, *, b, length, sq, h=8, hkv=2, d=64):
  """bf16 queries `[b, sq, h, d]` and a dense cache's pages
  (`dense_as_pages` of random keys and values `[b, length, hkv, d]`):
  `(q, key_pages, value_pages, table)`."""
  rng = helpers.rng_for(name)
  keys, values = (jnp.asarray(rng.standard_normal((b, length, hkv, d)),
                              jnp.bfloat16) for _ in range(2))
  kp, vp, table = decode.dense_as_pages(keys, values)
  q = jnp.asarray(rng.standard_normal((b, sq, h, d)), jnp.bfloat16)
  return q, kp, vp, table


MOSAIC_CASES = ("gqa_paged16_causal_ragged",
                "four_new_paged128_window_softcap",
                "mqa_paged8_padded_queries_splits_overflow", "dense_d64",
                "sinks_d256", "one_split_four_new_padded_queries_overflow",
                "paged16_splits_check_the_cache",
                "one_split_checks_the_cache_past_its_queries",
                "dense_checks_its_length",
                # Keys and values streamed by two producer warpgroups.
                "gqa_paged16_causal_ragged_two_producers",
                "paged16_splits_check_the_cache_two_producers",
                "dense_d64_two_producers")


@pytest.mark.skipif(gpu_interpret.UNAVAILABLE is not None,
                    reason=gpu_interpret.UNAVAILABLE or "")
@pytest.mark.parametrize("case", MOSAIC_CASES)
def test_mosaic_kernel_matches_reference_in_gpu_interpreter(case):
  """The Hopper cases below on a CPU: the Mosaic decode kernel run by JAX's
  GPU interpreter (`gpu_interpret`: warpgroups as threads, its barriers and
  TMA copies simulated)."""
  with gpu_interpret.mosaic_on_cpu():
    test_mosaic_kernel_matches_reference_on_hopper(case)


@pytest.mark.skipif(gpu_interpret.UNAVAILABLE is not None,
                    reason=gpu_interpret.UNAVAILABLE or "")
def test_mosaic_default_launch_of_a_hopper_in_gpu_interpreter(monkeypatch):
  """A default case with the split rule of a 132-multiprocessor Hopper
  (on a CPU it plans for one multiprocessor: one split): 8 rows of 8
  blocks take 4 splits of 2 blocks (a wave of 32 programs), in the GPU
  interpreter."""
  monkeypatch.setattr(gpu, "core_count", lambda: 132)
  launch = flash_kernel.mosaic_decode_launch(4, 2, 64, 16, 128)
  assert (launch.num_splits, launch.tokens_per_split) == (4, 256)
  with gpu_interpret.mosaic_on_cpu():
    test_mosaic_kernel_matches_reference_on_hopper("gqa_paged16_causal_ragged")


@pytest.mark.skipif(not _HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("case", MOSAIC_CASES)
def test_mosaic_kernel_matches_reference_on_hopper(case):
  """The Mosaic kernel (bf16) against the float32 reference: shuffled
  tables with shared prefix pages and -1 entries, ragged lengths (0 and not
  a page multiple), several splits (some empty), windows, soft cap, padded
  query slots, 64-token slots inside 128-token pages, a dense cache (its
  pages without a table), sinks, rows that overflowed; one split, where
  the kernel writes the attention itself; keys and values streamed by a
  producer warpgroup each (`producers=2`)."""
  lengths = (1000, 0, 357, 3)
  kw, q_valid, sinks, overflow = dict(causal=True), None, None, None
  if case.endswith("_two_producers"):  # The same case, keys and values
    # streamed by a warpgroup each.
    case = case.removesuffix("_two_producers")
    kw.update(producers=2)
  no_table = False
  check = None  # The rows `check_overflow` must find (the kernel's test).
  if case == "gqa_paged16_causal_ragged":
    inputs = _paged(case, d=128, ps=16, max_pages=64, lengths=lengths,
                    dtype=jnp.bfloat16)
  elif case == "four_new_paged128_window_softcap":
    inputs = _paged(case, h=32, hkv=8, d=128, ps=128, max_pages=8,
                    lengths=lengths, dtype=jnp.bfloat16)
    kw.update(window=200, softcap=5.0, num_splits=3, block_tokens=64)
  elif case == "mqa_paged8_padded_queries_splits_overflow":
    inputs = _paged(case, b=3, sq=16, h=4, hkv=1, d=64, ps=8, max_pages=128,
                    lengths=(1024, 500, 9), dtype=jnp.bfloat16)
    q_valid = jnp.asarray(np.arange(16)[None, :] < np.array([[16], [1], [0]]))
    overflow = jnp.asarray([False, True, False])
    kw.update(num_splits=7)
  elif case == "one_split_four_new_padded_queries_overflow":
    inputs = _paged(case, h=32, hkv=8, d=128, ps=16, max_pages=64,
                    lengths=lengths, dtype=jnp.bfloat16)
    q_valid = jnp.asarray(np.arange(4)[None, :] < np.array([[4], [0], [1],
                                                            [3]]))
    overflow = jnp.asarray([False, False, True, False])
    kw.update(num_splits=1)
  elif case == "dense_d64":
    n = jnp.asarray([768, 130, 64], jnp.int32)
    inputs = (*_dense_bf16(case, b=3, length=768, sq=2), n,
              n[:, None] - 2 + jnp.arange(2)[None, :])
    no_table = True  # The kernel takes the dense pages without it.
  elif case == "paged16_splits_check_the_cache":
    # Row 1: an entry below its length names no page (found by the split
    # that copies it); row 2: a length past the table's 1024 tokens (the
    # consumer's test); row 3: -1 entries past its length only.
    q, kp, vp, table, n, pos = _paged(
        case, h=32, hkv=8, d=128, ps=16, max_pages=64, sq=1,
        lengths=(1000, 700, 1024, 3), dtype=jnp.bfloat16)
    inputs = (q, kp, vp, table.at[1, 40].set(-1), n.at[2].set(1030), pos)
    check = [False, True, True, False]
    kw.update(num_splits=3)
  elif case == "one_split_checks_the_cache_past_its_queries":
    # The queries stop at token 100 and the bad entry (token 900) is in
    # blocks no copy reads: the producer's walk past them finds it.
    q, kp, vp, table, n, pos = _paged(
        case, b=2, h=32, hkv=8, d=128, ps=16, max_pages=64, sq=1,
        lengths=(1000, 1000), shared=0, dtype=jnp.bfloat16)
    inputs = (q, kp, vp, table.at[0, 56].set(-1), n, jnp.full_like(pos, 100))
    check = [True, False]
    kw.update(num_splits=1)
  elif case == "dense_checks_its_length":
    inputs = (*_dense_bf16(case, b=2, length=512, sq=1),
              jnp.asarray([513, 300], jnp.int32),
              jnp.asarray([[511], [299]], jnp.int32))
    no_table, check = True, [True, False]
  else:
    inputs = _paged(case, d=256, ps=16, max_pages=32, lengths=(500, 0, 37, 3),
                    dtype=jnp.bfloat16)
    sinks = jnp.asarray(helpers.rng_for(case).standard_normal(8),
                        jnp.float32)
  decode_kw = {k: kw.pop(k) for k in ("num_splits", "block_tokens",
                                      "producers") if k in kw}
  res = jax.jit(functools.partial(
      decode.decode_attention, sm_scale=0.125, backend="mosaic", sinks=sinks,
      q_valid=q_valid, overflow=overflow, check_overflow=check is not None,
      **decode_kw, **kw))(
          *inputs[:3], None if no_table else inputs[3], *inputs[4:])
  if check is not None:
    overflow = jnp.asarray(check)
    np.testing.assert_array_equal(  # The write's flags for this cache.
        decode._overflowing_rows(None if no_table else inputs[3],
                                 inputs[4], inputs[1]), overflow)
  f32 = [x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x
         for x in inputs]
  capacity = inputs[3].shape[1] * inputs[1].shape[1]
  f32[4] = jnp.minimum(f32[4], capacity)  # The reference's range.
  out, lse = _reference(*f32, sm_scale=0.125, q_valid=q_valid,
                        overflow=overflow, **kw)
  if sinks is not None:
    out, lse = merge.merge_sinks(out, lse, sinks)
  _compare((res.out.astype(jnp.float32), res.lse), (out, lse),
           TOL["bfloat16"], case)
