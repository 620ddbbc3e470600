"""The KV caches' writes and views (`core/cache.py`) and `merge_attention`.

The dense and the paged cache hold the same tokens after the same writes
(random, non-contiguous page tables, shared prefix pages, ragged new
tokens); padded query slots and overflowing rows write nothing, and
overflow is flagged; `merge_attention` of attentions over disjoint key sets
equals one attention over their union (float32 reference, tolerance 1e-5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.core import cache as cache_lib
from flexible_attention.core import merge

B, HKV, D = 3, 2, 4

# The caches' writes and views, compiled (op by op, each call was dozens of
# small programs): what a model's jitted step runs.
_write = jax.jit(cache_lib.write)
_dense_view = jax.jit(cache_lib.dense_view)


def _tokens(seed, batch, count, same_rows=False):
  """`(keys, values)` of `count` new tokens per row (rows 0 and 1 the same
  ones if `same_rows`)."""
  rng = np.random.default_rng(seed)
  new = rng.normal(size=(batch, count, HKV, D)).astype(np.float32)
  if same_rows:
    new[1] = new[0]
  return jnp.asarray(new), jnp.asarray(new + 100.0)


def _paged(lengths, page_size=4, max_pages=5, num_pages=20, seed=0):
  """A paged cache with a random, non-contiguous table; rows 0 and 1 share
  their first page (a common prefix) when both are at least a page long."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(num_pages)[:B * max_pages].reshape(B, max_pages)
  if min(lengths[0], lengths[1]) >= page_size:
    order[1, 0] = order[0, 0]
  cache = fa.init_paged_cache(num_pages, page_size, HKV, D, batch_size=B,
                              max_pages_per_row=max_pages)
  return cache._replace(page_table=jnp.asarray(order, jnp.int32))


def _dense(lengths, length=20):
  return fa.init_cache(B, length, HKV, D)


def _fill(cache, lengths, seed=1):
  """Writes a prefix of `lengths[b]` tokens per row in one ragged call, as a
  prefill would; rows 0 and 1 get the same prefix (they may share a page)."""
  k, v = _tokens(seed, B, max(lengths), same_rows=True)
  new, overflow = _write(cache, k, v, jnp.asarray(lengths))
  assert not np.any(overflow)
  return new


def test_paged_and_dense_hold_the_same_tokens_after_ragged_writes():
  lengths = [6, 4, 0]  # Rows 0, 1 share their first page (read-only).
  dense, paged = _fill(_dense(lengths), [4, 4, 0]), _fill(
      _paged(lengths), [4, 4, 0])
  k, v = _tokens(2, B, 3)
  q_lengths = jnp.asarray([2, 0, 3])
  dense, dense_over = _write(dense, k, v, q_lengths)
  paged, paged_over = _write(paged, k, v, q_lengths)
  assert not np.any(dense_over) and not np.any(paged_over)
  np.testing.assert_array_equal(dense.lengths, [6, 4, 3])
  np.testing.assert_array_equal(paged.lengths, [6, 4, 3])
  keys, values = _dense_view(paged)
  for b, n in enumerate([6, 4, 3]):
    np.testing.assert_array_equal(keys[b, :n], dense.keys[b, :n])
    np.testing.assert_array_equal(values[b, :n], dense.values[b, :n])
  # Padded slots wrote nothing: row 1's slots past its length are zeros.
  np.testing.assert_array_equal(dense.keys[1, 4:], 0.0)
  np.testing.assert_array_equal(keys[1, 4:], 0.0)


def test_overflow_is_flagged_and_drops_the_tokens_that_do_not_fit():
  dense = _dense([0, 0, 0], length=4)._replace(
      lengths=jnp.asarray([3, 0, 4], jnp.int32))
  k, v = _tokens(3, B, 2)
  new, overflow = _write(dense, k, v)
  np.testing.assert_array_equal(overflow, [True, False, True])
  np.testing.assert_array_equal(new.keys[0, 3], k[0, 0])  # What fits.
  # Row 1 wrote its two; the rest is dropped: nothing else changed.
  for got, old, x in ((new.keys, dense.keys, k), (new.values, dense.values,
                                                  v)):
    np.testing.assert_array_equal(
        got, old.at[0, 3].set(x[0, 0]).at[1, :2].set(x[1]))
  paged = _paged([0, 0, 0])
  table = paged.page_table.at[1, 1].set(cache_lib.UNASSIGNED)
  paged = paged._replace(page_table=table,
                         lengths=jnp.asarray([18, 3, 0], jnp.int32))
  new, overflow = _write(paged, k, v)
  np.testing.assert_array_equal(overflow, [False, True, False])
  # Row 0's two land in its 5th page, row 1's first in its 1st (its second
  # meets the unassigned slot: dropped), row 2's two in its 1st; nothing
  # else of the pool changed.
  for got, old, x in ((new.key_pages, paged.key_pages, k),
                      (new.value_pages, paged.value_pages, v)):
    np.testing.assert_array_equal(
        got, old.at[table[0, 4], 2:].set(x[0]).at[table[1, 0], 3].set(
            x[1, 0]).at[table[2, 0], :2].set(x[2]))
  # A row whose table lost a page it holds tokens in stays flagged, with new
  # tokens or without; so does a dense row past L.
  later, overflow = _write(new, k, v, jnp.asarray([0, 0, 1]))
  np.testing.assert_array_equal(overflow, [False, True, False])
  np.testing.assert_array_equal(later.lengths, [20, 5, 3])
  past = dense._replace(lengths=jnp.asarray([5, 2, 4], jnp.int32))
  _, overflow = _write(past, k, v, jnp.asarray([0, 2, 0]))
  np.testing.assert_array_equal(overflow, [True, False, False])


@pytest.mark.parametrize("cache", ["dense", "paged"])
def test_writes_scatter_at_unique_indices(cache):
  """The write's scatters tell XLA their indices are unique (a dropped
  slot's index is its own, past the end), so a GPU writes them in
  parallel; with padded slots and overflow both dropping tokens."""
  cache = _dense([0, 0, 0], length=4) if cache == "dense" else _paged(
      [0, 0, 0])
  cache = cache._replace(lengths=jnp.asarray([3, 0, 4], jnp.int32))
  k, v = _tokens(3, B, 2)
  text = jax.jit(_write).lower(cache, k, v, jnp.asarray([2, 1, 2])).as_text()
  assert text.count("unique_indices = true") == 2, text


@pytest.mark.parametrize("bad, match", [
    (dict(key_pages=jnp.zeros((20, 4, 2, 8))), "key_pages"),
    (dict(value_pages=jnp.zeros((20, 4, 2, 4), jnp.bfloat16)),
     "value_pages holds bfloat16"),
    (dict(page_table=jnp.zeros((2, 5), jnp.int32)), "page_table"),
    (dict(page_table=jnp.zeros((3, 5), jnp.float32)), "page_table must hold"),
    (dict(lengths=jnp.zeros((2,), jnp.int32)), "lengths"),
])
def test_bad_paged_caches_are_refused(bad, match):
  cache = _paged([0, 0, 0])._replace(**bad)
  k, v = _tokens(0, B, 2)
  with pytest.raises((ValueError, TypeError), match=match):
    cache_lib.check(cache, k, k, v)


@pytest.mark.parametrize("q_lengths, match", [
    (jnp.asarray([1, 2]), r"q_lengths must be \[B\]"),
    (jnp.asarray([1, 3, 0]), r"q_lengths must be in \[0, Sq = 2\]"),
    (jnp.asarray([1.0, 1.0, 1.0]), "q_lengths must hold ints"),
])
def test_bad_q_lengths_are_refused(q_lengths, match):
  k, v = _tokens(0, B, 2)
  with pytest.raises((ValueError, TypeError), match=match):
    cache_lib.check(_dense([0, 0, 0]), k, k, v, q_lengths)


def test_init_paged_cache_is_empty_and_unassigned():
  cache = fa.init_paged_cache(7, 16, 2, 8, jnp.bfloat16, batch_size=3,
                              max_pages_per_row=4, value_dim=6)
  assert cache.key_pages.shape == (7, 16, 2, 8)
  assert cache.value_pages.shape == (7, 16, 2, 6)
  assert cache.key_pages.dtype == jnp.bfloat16
  np.testing.assert_array_equal(cache.page_table, cache_lib.UNASSIGNED)
  np.testing.assert_array_equal(cache.lengths, 0)
  assert cache.max_length == 64
  with pytest.raises(ValueError, match="page_size must be a positive int"):
    fa.init_paged_cache(7, 0, 2, 8, batch_size=3, max_pages_per_row=4)


# Compiled, as the caches' writes (op by op, dozens of small programs).
_merge_attention = jax.jit(fa.merge_attention)
_merge_pair = jax.jit(merge.merge_pair)


@jax.jit
def _reference(q, k, v, **call):
  inputs = fa.canonicalize(q, k, v, **call)
  return fa.reference_attention(inputs.query, inputs.key, inputs.value,
                                inputs.bias, inputs.visibility, None,
                                sm_scale=0.5)


def test_merge_attention_equals_one_call_over_the_union():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
  k = rng.normal(size=(2, 12, 2, 8)).astype(np.float32)
  v = rng.normal(size=(2, 12, 2, 8)).astype(np.float32)
  # Row 1 sees nothing of the middle set (kv_lengths 0 there).
  parts = [(0, 5, None), (5, 9, jnp.asarray([4, 0])), (9, 12, None)]
  outs, lses = [], []
  for lo, hi, lengths in parts:
    result = _reference(q, k[:, lo:hi], v[:, lo:hi], kv_lengths=lengths)
    outs.append(result.out)
    lses.append(result.lse)
  visible = np.ones((2, 12), bool)
  visible[1, 5:9] = False
  want = _reference(q, k, v, mask=visible[:, None, None, :])
  out, lse = _merge_attention(outs, lses)
  np.testing.assert_allclose(out, want.out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, want.lse, rtol=1e-5, atol=1e-5)
  pair_out, pair_lse = _merge_pair(outs[0], lses[0], outs[2], lses[2])
  part = _reference(q, np.concatenate([k[:, :5], k[:, 9:]], 1),
                    np.concatenate([v[:, :5], v[:, 9:]], 1))
  np.testing.assert_allclose(pair_out, part.out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pair_lse, part.lse, rtol=1e-5, atol=1e-5)


def test_stacked_merge_equals_one_call_over_the_union():
  """`merge_stacked` (its two-reduction value: the decode kernel's split
  merge, the sequence mesh's) against one call over the union: a row that
  sees nothing of the middle set, a row that sees no set (out 0, lse -inf)
  and a NaN part (a row that overflowed: NaN out and lse)."""
  rng = np.random.default_rng(2)
  q = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)
  k = rng.normal(size=(3, 12, 2, 8)).astype(np.float32) * 3
  v = rng.normal(size=(3, 12, 2, 8)).astype(np.float32)
  parts = [(0, 5, jnp.asarray([5, 5, 0])), (5, 9, jnp.asarray([4, 0, 0])),
           (9, 12, jnp.asarray([3, 3, 0]))]
  results = [_reference(q, k[:, lo:hi], v[:, lo:hi], kv_lengths=lengths)
             for lo, hi, lengths in parts]
  visible = np.ones((3, 12), bool)
  visible[1, 5:9] = False
  visible[2] = False
  want = _reference(q, k, v, mask=visible[:, None, None, :])
  outs = jnp.stack([r.out for r in results])
  lses = jnp.stack([r.lse for r in results])
  out, lse = jax.jit(merge.merge_stacked)(outs, lses)
  np.testing.assert_allclose(out[:2], want.out[:2], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse[:2], want.lse[:2], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[2], 0.0)
  assert np.all(np.isneginf(lse[2]))
  out, lse = jax.jit(merge.merge_stacked)(
      outs, lses.at[1, 0, 2, 1].set(jnp.nan))
  assert np.all(np.isnan(out[0, 1, 2])) and np.isnan(lse[0, 2, 1])
  finite = np.ones(out.shape, bool)
  finite[0, 1, 2] = False
  finite[2] = False
  np.testing.assert_allclose(np.asarray(out)[finite],
                             np.asarray(want.out)[finite], rtol=1e-5,
                             atol=1e-5)


def test_merge_attention_gradients_equal_one_call_over_the_union():
  """The gradients of q, k and v through the merge (of a loss of the
  merged output and lse) equal those of one call over the union: the
  merge's derivative, with a row that sees nothing of the middle set
  (weight 0, lse -inf there: no NaN)."""
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((2, 3, 4, 8), (2, 12, 2, 8), (2, 12, 2, 8)))
  ct_out = jnp.asarray(rng.normal(size=(2, 3, 4, 8)), jnp.float32)
  ct_lse = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
  parts = [(0, 5, None), (5, 9, jnp.asarray([4, 0])), (9, 12, None)]
  visible = np.ones((2, 12), bool)
  visible[1, 5:9] = False

  def loss(out, lse):
    return jnp.sum(out * ct_out) + jnp.sum(lse * ct_lse)

  def merged(q, k, v):
    results = [_reference(q, k[:, lo:hi], v[:, lo:hi], kv_lengths=lengths)
               for lo, hi, lengths in parts]
    return loss(*fa.merge_attention([r.out for r in results],
                                    [r.lse for r in results]))

  def one_call(q, k, v):
    result = _reference(q, k, v, mask=visible[:, None, None, :])
    return loss(result.out, result.lse)

  got = jax.jit(jax.grad(merged, (0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(one_call, (0, 1, 2)))(q, k, v)
  for what, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=what)


def test_merge_attention_of_empty_sets_gives_zeros():
  out = jnp.zeros((1, 2, 3, 4))
  empty = jnp.full((1, 3, 2), -jnp.inf)
  merged, lse = _merge_attention([out, out], [empty, empty])
  np.testing.assert_array_equal(merged, 0.0)
  assert np.all(np.isneginf(lse))
  # No gradient reaches a set that holds no visible key (and no NaN).
  grads = jax.grad(lambda o, l: jnp.sum(fa.merge_attention([o, out],
                                                           [l, empty])[0]),
                   (0, 1))(out + 1.0, empty)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)
  # The ring's pairwise merge alike.
  pair_out, pair_lse = _merge_pair(out, empty, out, empty)
  np.testing.assert_array_equal(pair_out, 0.0)
  assert np.all(np.isneginf(pair_lse))
  grads = jax.grad(lambda o, l: jnp.sum(merge.merge_pair(o, l, out, empty)[0]),
                   (0, 1))(out + 1.0, empty)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("outputs, lses, match", [
    ([], [], "at least one"),
    ([jnp.zeros((1, 2, 3, 4))], [], "as many outputs as lses"),
    ([jnp.zeros((1, 2, 3, 4))], [jnp.zeros((1, 2, 3))], r"lses\[0\]"),
    ([jnp.zeros((1, 2, 3, 4)), jnp.zeros((1, 2, 3, 5))],
     [jnp.zeros((1, 3, 2))] * 2, r"outputs\[1\]"),
])
def test_merge_attention_refuses_mismatched_parts(outputs, lses, match):
  with pytest.raises(ValueError, match=match):
    fa.merge_attention(outputs, lses)
