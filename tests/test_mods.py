"""User score and mask modifications (`score_mod`, `mask_mod`, `mod_args`).

Every CPU mechanism that declares the `score_mod` and `mask_mod`
capabilities (the list comes from the registry) is checked against the
float32 reference with the same mods (`core/reference.py`): outputs,
log-sum-exps and the gradients of q, k, v, the sinks, the bias (where the
mechanism takes one) and every floating `mod_args` array, on one odd-sized
causal call that combines a sliding window, a soft cap, segment ids,
grouped heads, sinks and dropout, with mods that read all four indices
(head-dependent empty rows: zeros; lse = the sink), on 8-device meshes
(ring, ulysses: global batch/head indices and positions per shard), and
through a KV cache. The reference itself is checked against the written
formula, the named mods (ALiBi, T5 buckets, prefix-LM, documents) against
the equivalent dense bias / mask passed as `bias=` / `mask=`, and misuse
raises clear errors. Tolerances: `helpers.tolerance` per dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.core import inputs as inputs_lib
from flexible_attention.core import reference
from flexible_attention.kernels import flash as flash_kernel
from flexible_attention.kernels import gpu
from flexible_attention.kernels.flash import launch as flash_launch
from flexible_attention.kernels.flash import mod_lowering
from flexible_attention.kernels.flash import mosaic_bwd_rows
from flexible_attention.kernels.flash import mosaic_mod_split
from flexible_attention.kernels.flash import mosaic_mods
from flexible_attention.mechanisms import registry
import gpu_interpret
import helpers

B, H, HKV, D = 2, 4, 2, 8
S_ODD, S_MESH = 13, 16
WINDOW, CAP, RATE = 6, 5.0, 0.2
RNG = jax.random.PRNGKey(7)
# The CPU mechanisms with both mods, and the options they need here.
MECHANISMS = {m: {} for m in fa.available_mechanisms()
              if fa.capabilities(m).score_mod and fa.capabilities(m).mask_mod
              and "cpu" in fa.capabilities(m).platforms and m != "auto"}
MECHANISMS["blockwise"] = {"block_sizes": fa.BlockSizes(4, 8)}


def _score_mod(score, batch, head, q_pos, kv_pos, slopes, scale, doc):
  """Non-linear in the score, reads every index and two float arrays."""
  del doc
  return (score * scale[batch] - slopes[head] * jnp.abs(q_pos - kv_pos)
          + 0.1 * jnp.sin(score))


def _mask_mod(batch, head, q_pos, kv_pos, slopes, scale, doc):
  """Same document, and a head-dependent hole: query positions with
  (head + q_pos) % 5 == 0 see no key at all (position 0 sees only key 0)."""
  del slopes, scale
  same_doc = doc[batch, q_pos] == doc[batch, kv_pos]
  return same_doc & (((head + q_pos) % 5 != 0) | (kv_pos > q_pos))


def _data(s):
  """Inputs of a call of length `s`: q, k, v, sinks, slopes, scale, bias
  (floats) and segment ids, doc ids (ints)."""
  rng = helpers.rng_for("mods", s)
  q, k, v = helpers.random_qkv(rng, B, s, s, H, HKV, D)
  arr = lambda *shape: helpers.random_array(rng, shape)
  seg = np.zeros((B, s), np.int32)
  seg[0, s // 2 + 1:] = 1  # Two segments in row 0.
  doc = np.zeros((B, s), np.int32)
  doc[1, s // 3:] = 1  # Two documents in row 1 (other boundary).
  slopes = jnp.abs(arr(H)) * 0.3
  scale = 1.0 + 0.2 * arr(B)
  return ((q, k, v, arr(H), slopes, scale, arr(1, H, s, s)),
          (jnp.asarray(seg), jnp.asarray(doc)))


def _loss(out, lse):
  """Reaches out and lse (finite everywhere: the sinks count)."""
  return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.sin(lse))


def _value_and_grads(f, floats, ints):
  """`(out, lse, grads of floats)` of `f(*floats, *ints) -> (out, lse)`."""
  def loss(floats, ints):
    out, lse = f(*floats, *ints)
    return _loss(out, lse), (out, lse)
  (_, (out, lse)), grads = helpers.jit(jax.value_and_grad(loss, has_aux=True))(
      floats, ints)
  return out, lse, grads


def _reference_fn(q, k, v, sinks, slopes, scale, bias, seg, doc, *,
                  dropout=None):
  record = inputs_lib.canonicalize(
      q, k, v, causal=True, segment_ids=seg, sliding_window=WINDOW,
      bias=bias, sinks=sinks, score_mod=_score_mod, mask_mod=_mask_mod,
      mod_args=(slopes, scale, doc))
  result = reference.reference_attention(
      record.query, record.key, record.value, record.bias,
      record.visibility, dropout, sm_scale=D**-0.5, softcap=CAP,
      sinks=record.sinks, mods=record.mods)
  return result.out, result.lse


@functools.lru_cache(maxsize=None)
def _reference(s: int, bias: bool, dropout: bool):
  """The reference's `(out, lse, grads)`, with the modules' dropout or
  without."""
  floats, ints = _data(s)
  if not bias:
    floats = floats[:-1] + (None,)
  dropout = helpers.reference_dropout(RNG, RATE) if dropout else None
  return _value_and_grads(functools.partial(_reference_fn, dropout=dropout),
                          floats, ints)


def _module_fn(mechanism, dropout=True, **options):
  def f(q, k, v, sinks, slopes, scale, bias, seg, doc):
    attn = fa.create_attention(
        mechanism, num_heads=H, head_dim=D, num_kv_heads=HKV,
        sliding_window=WINDOW, logits_soft_cap=CAP, dropout_rate=RATE,
        score_mod=_score_mod, mask_mod=_mask_mod, **options)
    result = attn(q, k, v, causal=True, segment_ids=seg, bias=bias,
                  sinks=sinks, mod_args=(slopes, scale, doc),
                  deterministic=not dropout, return_lse=True)
    return result.attention_outputs, result.lse
  apply = hk.transform(f).apply
  return lambda *args: apply({}, RNG, *args)


GRADS = ("dq", "dk", "dv", "dsinks", "dslopes", "dscale", "dbias")


def _check(what, s, apply, bias, dtype=jnp.float32, dropout=True):
  floats, ints = _data(s)
  if not bias:
    floats = floats[:-1] + (None,)
  cast = lambda x: None if x is None else x.astype(dtype)
  floats = tuple(cast(x) for x in floats[:3]) + floats[3:]
  want_out, want_lse, want_grads = _reference(s, bias, dropout)
  out, lse, grads = _value_and_grads(apply, floats, ints)
  helpers.assert_close(out, want_out, dtype, f"{what}: out")
  helpers.assert_close(lse, want_lse, dtype, f"{what}: lse")
  # Query position 0 of head 0 (and 5 of head 0, 4 of head 1, ...) sees
  # no key: zeros, and lse is the sink's logit.
  np.testing.assert_array_equal(np.asarray(out[:, 0, 0], np.float32), 0.0)
  np.testing.assert_allclose(np.asarray(lse[:, 0, 0]),
                             np.full((B,), floats[3][0]), rtol=1e-6)
  for name, got, want in zip(GRADS, grads, want_grads):
    if want is not None:
      helpers.assert_close(got, want, dtype, f"{what}: {name}")


def test_reference_matches_the_written_formula():
  """The oracle: the mod after soft cap and bias, the mask and-ed."""
  (q, k, v, sinks, slopes, scale, bias), (seg, doc) = _data(S_ODD)
  args = (q, k, v, sinks, slopes, scale, bias, seg, doc)
  out, lse = jax.jit(_reference_fn)(*args)
  want, want_lse = jax.jit(_written_formula)(*args)
  helpers.assert_close(out, want, jnp.float32, "out")
  helpers.assert_close(lse, want_lse, jnp.float32, "lse")


def _written_formula(q, k, v, sinks, slopes, scale, bias, seg, doc):
  s_len = q.shape[1]
  kk, vv = (jnp.repeat(x, H // HKV, axis=2) for x in (k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kk, precision="highest") * D**-0.5
  s = CAP * jnp.tanh(s / CAP) + bias
  b = jnp.arange(B)[:, None, None, None]
  h = jnp.arange(H)[None, :, None, None]
  qp = jnp.arange(s_len)[None, None, :, None]
  kp = jnp.arange(s_len)[None, None, None, :]
  s = _score_mod(s, b, h, qp, kp, slopes, scale, doc)
  visible = ((kp <= qp) & (kp >= qp - WINDOW) &
             (seg[:, None, :, None] == seg[:, None, None, :]) &
             _mask_mod(b, h, qp, kp, slopes, scale, doc))
  s = jnp.where(visible, s, -jnp.inf)
  with_sink = jnp.concatenate(
      [s, jnp.broadcast_to(sinks[None, :, None, None], (B, H, s_len, 1))],
      -1)
  lse = jax.nn.logsumexp(with_sink, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), vv,
                   precision="highest")
  return out, lse


@pytest.mark.parametrize("mechanism", sorted(MECHANISMS))
def test_mods_match_the_reference(mechanism):
  """Odd lengths, causal + window + soft cap + segments + GQA + sinks +
  dropout (+ bias where the mechanism takes one): out, lse and the
  gradients of q, k, v, sinks, the float mod_args (and bias)."""
  bias = fa.capabilities(mechanism).bias
  _check(mechanism, S_ODD, _module_fn(mechanism, **MECHANISMS[mechanism]),
         bias)


def test_mods_in_bfloat16():
  """blockwise on bfloat16 inputs (float32 logits, mods and mod_args),
  without bias and dropout (which alone take bfloat16's errors near the
  tolerance here, mods or not)."""
  _check("blockwise-bf16", S_ODD,
         _module_fn("blockwise", dropout=False, **MECHANISMS["blockwise"]),
         False, jnp.bfloat16, dropout=False)


def test_flash_mods_match_the_reference():
  """flash's Triton kernels (interpreted), the same battery: the score_mod
  (slopes[head] * |q_pos - kv_pos|, scale[batch], sin(score)) and the
  document mask_mod evaluated per tile (`kernels/flash/mod_lowering.py`),
  gradients of the [H] slopes and [B] scale computed in-kernel."""
  _check("flash", S_ODD, _module_fn("flash", interpret=True), True)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_flash_mods_compiled_on_a_gpu():
  """The same battery through flash's compiled Triton kernels, bfloat16
  inputs (without bias and dropout, as `test_mods_in_bfloat16`): out, lse
  and the gradients of q, k, v, sinks and the [H] / [B] mod_args."""
  _check("flash-gpu-bf16", S_ODD, _module_fn("flash", dropout=False), False,
         jnp.bfloat16, dropout=False)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("name,dq_backend,head_dim", [
    ("alibi", "triton", 64), ("both", "triton", 64), ("static", "triton", 64),
    ("both", "triton", 128), ("every_primitive", "triton", 128),  # Registers.
    # The Mosaic dQ kernel with the same mods (its default from 16k keys).
    ("alibi", "mosaic", 64), ("both", "mosaic", 64), ("static", "mosaic", 64),
    ("every_primitive", "mosaic", 64), ("affine", "mosaic", 64),
    ("alibi", "mosaic", 128),
    # dQ inside the dK/dV kernel (an explicit launch).
    ("alibi", "fused", 64), ("alibi", "fused", 128), ("both", "fused", 128),
    ("every_primitive", "fused", 128)])
def test_flash_mosaic_mods_compiled_on_a_gpu(name, dq_backend, head_dim,
                                             monkeypatch):
  """The mods the Mosaic GPU forward and dK/dV kernels evaluate (on Hopper
  the policy picks them; asserted; the dK/dV kernel's mod_args gradients
  included), over several 128-row tiles (`_check_mosaic_forward_mods`),
  with the Triton or the Mosaic dQ kernel, or dQ in the dK/dV kernel."""
  if dq_backend == "mosaic":
    monkeypatch.setattr(flash_launch, "MOSAIC_DQ_MIN_KV_LEN", 0)
  _check_mosaic_forward_mods(name, dq_backend if ON_HOPPER else "triton",
                             head_dim)


@pytest.mark.skipif(gpu_interpret.UNAVAILABLE is not None,
                    reason=gpu_interpret.UNAVAILABLE or "")
@pytest.mark.parametrize("name,head_dim,sinks,fused", [
    ("alibi", 64, False, False), ("both", 128, False, False),
    ("affine", 64, False, False), ("alibi", 64, True, False),
    ("alibi", 128, False, True), ("both", 128, False, True)])
def test_flash_mosaic_mods_in_gpu_interpreter(name, head_dim, sinks, fused,
                                              monkeypatch):
  """The same on a CPU: the policy's Hopper launches (the Mosaic forward,
  dK/dV and dQ kernels; with `fused`, dQ inside the dK/dV kernel instead)
  run by JAX's GPU interpreter (`gpu_interpret`). ALiBi (causal) and
  `affine` take the kernels' split (`mosaic_mod_split.split_slot`), in the
  forward only without sinks."""
  monkeypatch.setattr(gpu, "compute_capability", lambda: 9.0)
  # Three multiprocessors: the persistent forward's programs run several
  # query tiles each.
  monkeypatch.setattr(gpu, "core_count", lambda: 3)
  monkeypatch.setattr(flash_launch, "MOSAIC_DQ_MIN_KV_LEN", 0)
  with gpu_interpret.mosaic_on_cpu():
    _check_mosaic_forward_mods(name, "fused" if fused else "mosaic",
                               head_dim, hopper=True, jit=False, sinks=sinks)


@pytest.mark.parametrize("mechanism,dims,options", [
    # dp shards the batch, tp the heads, sp the sequence (ring: zigzag).
    ("ring", (2, 1, 2, 2), {}),
    # The same with the flash kernels at each step: the mods in the kernels
    # see each block's key positions, the blocks' mod_args gradients add up.
    ("ring", (2, 1, 2, 2), {"block_kernel": "flash", "interpret": True}),
    # fsdp = 2 shards the batch, ulysses' head slices on top of tp's.
    ("ulysses", (1, 2, 2, 2), {}),
    # flash's kernels see H / tp heads, and still differentiate the [H]
    # slopes in place (the bound is the module's H: it refused this once).
    ("flash", (2, 1, 2, 1), {"interpret": True}),
])
def test_mods_on_a_mesh(mechanism, dims, options):
  """The mods see global batch / head indices and positions on every
  shard; the gradients of mod_args are summed over the devices."""
  mesh = fa.make_mesh(axis_dims=dims, axis_names=("dp", "fsdp", "tp", "sp"))
  _check(f"{mechanism}{dims}{options}", S_MESH,
         _module_fn(mechanism, mesh=mesh, **options), False)


@pytest.mark.parametrize("mechanism", sorted(MECHANISMS))
def test_mods_through_a_kv_cache(mechanism):
  """A cache call: the queries sit at the cache's slots, the keys at its
  token indices; equal to the reference over the full keys."""
  (q, k, v, sinks, slopes, scale, _), (_, doc) = _data(S_ODD)
  new = 3
  cache = fa.init_cache(B, S_ODD, HKV, D)
  old = S_ODD - new
  cache = cache._replace(keys=cache.keys.at[:, :old].set(k[:, :old]),
                         values=cache.values.at[:, :old].set(v[:, :old]),
                         lengths=jnp.full((B,), old, jnp.int32))

  def f(cache, q, k, v):
    attn = fa.create_attention(
        mechanism, num_heads=H, head_dim=D, num_kv_heads=HKV,
        score_mod=_score_mod, mask_mod=_mask_mod, **MECHANISMS[mechanism])
    result = attn(q, k, v, cache=cache, causal=True, sinks=sinks,
                  mod_args=(slopes, scale, doc), return_lse=True)
    return result.attention_outputs, result.lse

  apply = hk.without_apply_rng(hk.transform(f)).apply
  out, lse = helpers.jit(apply)({}, cache, q[:, old:], k[:, old:],
                                v[:, old:])

  def ref(q):
    rec = inputs_lib.canonicalize(
        q, k, v, causal=True, sinks=sinks, score_mod=_score_mod,
        mask_mod=_mask_mod, mod_args=(slopes, scale, doc))
    res = reference.reference_attention(
        rec.query, rec.key, rec.value, None, rec.visibility,
        sm_scale=D**-0.5, sinks=rec.sinks, mods=rec.mods)
    return res.out, res.lse

  want_out, want_lse = jax.jit(ref)(q[:, old:])
  helpers.assert_close(out, want_out, jnp.float32, f"{mechanism}: out")
  helpers.assert_close(lse, want_lse, jnp.float32, f"{mechanism}: lse")


# --- The named mods against dense biases and masks ---------------------------


def _t5_bucket(relative_position, bidirectional, num_buckets, max_distance):
  """T5X's `_relative_position_bucket`, in numpy (the rule to match)."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps) /
      np.log(max_distance / max_exact) *
      (num_buckets - max_exact)).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(is_small, n, val_if_large)


def _pair_of_calls(mechanism, mod_kind, mod, call):
  """`f(q, k, v, arg, dense) -> (out with the mod and mod_args=(arg,),
  out with `dense` as bias or mask)`: the mod on `mechanism`, the dense
  one on vanilla."""
  def f(q, k, v, arg, dense):
    with_mod = fa.create_attention(mechanism, num_heads=H, head_dim=D,
                                   num_kv_heads=HKV, **{mod_kind: mod})
    plain = fa.create_attention("vanilla", num_heads=H, head_dim=D,
                                num_kv_heads=HKV)
    dense_arg = {"bias" if mod_kind == "score_mod" else "mask": dense}
    return (with_mod(q, k, v, mod_args=(arg,), **call).attention_outputs,
            plain(q, k, v, **dense_arg, **call).attention_outputs)
  return hk.without_apply_rng(hk.transform(f)).apply


def _assert_same_function(name, apply, q, k, v, arg, dense_fn):
  """Outputs and gradients (q, k, v and, for float args, the arg) of the
  mod and of the dense bias/mask built from the same arg, in one jit."""
  diff_arg = jnp.issubdtype(arg.dtype, jnp.floating)
  ct = helpers.random_array(helpers.rng_for(name, "ct"), q.shape)

  @helpers.jit
  def both(q, k, v, arg):
    def loss(which, q, k, v, arg):
      return jnp.sum(apply({}, q, k, v, arg, dense_fn(arg))[which] * ct)
    argnums = (1, 2, 3, 4) if diff_arg else (1, 2, 3)
    return [(apply({}, q, k, v, arg, dense_fn(arg))[i],
             jax.grad(loss, argnums)(i, q, k, v, arg)) for i in (0, 1)]

  (out, grads), (want, want_grads) = both(q, k, v, arg)
  helpers.assert_close(out, want, jnp.float32, f"{name}: out")
  for g, w, n in zip(grads, want_grads, ("dq", "dk", "dv", "darg")):
    helpers.assert_close(g, w, jnp.float32, f"{name}: {n}")


def _qkv(s=S_ODD):
  return helpers.random_qkv(helpers.rng_for("named", s), B, s, s, H, HKV, D)


def test_alibi_equals_its_dense_bias():
  q, k, v = _qkv()
  slopes = jnp.asarray(fa.alibi_slopes(H))
  np.testing.assert_allclose(fa.alibi_slopes(8),
                             2.0**-np.arange(1, 9, dtype=np.float32))
  assert fa.alibi_slopes(6).shape == (6,)
  distance = np.abs(np.arange(S_ODD)[:, None] - np.arange(S_ODD)[None, :])
  _assert_same_function(
      "alibi", _pair_of_calls("blockwise", "score_mod", fa.alibi_score_mod,
                              dict(causal=True)), q, k, v, slopes,
      lambda sl: -sl[None, :, None, None] * distance.astype(np.float32))


@pytest.mark.parametrize("bidirectional,causal", [(True, False),
                                                  (False, True)])
def test_t5_bias_equals_its_dense_bias(bidirectional, causal):
  """T5's buckets (8 buckets, max distance 6: exact and log buckets both
  used at S = 13) from a learned [buckets, H] table."""
  q, k, v = _qkv()
  mod = fa.T5ScoreMod(bidirectional=bidirectional, num_buckets=8,
                      max_distance=6)
  table = helpers.random_array(helpers.rng_for("t5", bidirectional), (8, H))
  relative = np.arange(S_ODD)[None, :] - np.arange(S_ODD)[:, None]  # kv - q
  buckets = _t5_bucket(relative, bidirectional, 8, 6)
  assert buckets.max() == 7 and len(np.unique(buckets)) >= 7
  _assert_same_function(
      f"t5-{bidirectional}", _pair_of_calls(
          "blockwise", "score_mod", mod, dict(causal=causal)), q, k, v, table,
      lambda t: jnp.moveaxis(t[buckets], -1, 0)[None])


def test_prefix_lm_equals_its_dense_mask():
  q, k, v = _qkv()
  prefix = jnp.asarray([4, 9], jnp.int32)
  pos = np.arange(S_ODD)
  _assert_same_function(
      "prefix-lm", _pair_of_calls("blockwise", "mask_mod",
                                  fa.prefix_lm_mask_mod, {}), q, k, v, prefix,
      lambda p: ((pos[None, None, None, :] < p[:, None, None, None]) |
                 (pos[None, :] <= pos[:, None])[None, None]))


def test_document_mask_equals_its_dense_mask():
  """doc_ids [B, P] indexed by position: with Sq < Sk the queries are the
  last positions (bottom-right), and the mod reads their documents."""
  q, k, v = _qkv()
  q = q[:, -5:]  # Positions 8..12.
  doc = jnp.asarray(np.repeat([[0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4],
                               [0] * 6 + [1] * 7], 1, 0), jnp.int32)
  _assert_same_function(
      "document", _pair_of_calls("blockwise", "mask_mod",
                                 fa.document_mask_mod, dict(causal=True)),
      q, k, v, doc,
      lambda d: (d[:, -5:, None] == d[:, None, :])[:, None])


def test_flash_named_mods_equal_their_dense_bias_and_mask():
  """flash (interpreted) with ALiBi (its [H] slopes differentiated) and the
  prefix-LM mask_mod together, Sq = 5 < Sk = 13 (bottom-right positions),
  grouped heads, against vanilla with the dense bias and mask: outputs and
  gradients of q, k, v and the slopes."""
  q, k, v = _qkv()
  q = q[:, -5:]  # Positions 8..12.
  slopes = jnp.asarray(fa.alibi_slopes(H))
  prefix = jnp.asarray([10, 3], jnp.int32)
  qp, kp = np.arange(8, 13)[:, None], np.arange(S_ODD)[None, :]

  def f(q, k, v, slopes):
    modded = fa.create_attention(
        "flash", num_heads=H, head_dim=D, num_kv_heads=HKV, interpret=True,
        score_mod=lambda *a: fa.alibi_score_mod(*a[:6]),
        mask_mod=lambda *a: fa.prefix_lm_mask_mod(*a[:4], a[5]))
    dense = fa.create_attention("vanilla", num_heads=H, head_dim=D,
                                num_kv_heads=HKV)
    bias = -slopes[None, :, None, None] * np.abs(qp - kp).astype(np.float32)
    mask = (kp < prefix[:, None, None, None]) | (kp <= qp)[None, None]
    return (modded(q, k, v, mod_args=(slopes, prefix)).attention_outputs,
            dense(q, k, v, bias=bias, mask=mask).attention_outputs)

  apply = hk.without_apply_rng(hk.transform(f)).apply
  ct = helpers.random_array(helpers.rng_for("flash-named", "ct"), q.shape)

  @helpers.jit
  def both(q, k, v, slopes):
    loss = lambda i, *a: jnp.sum(apply({}, *a)[i] * ct)
    return [(apply({}, q, k, v, slopes)[i],
             jax.grad(loss, (1, 2, 3, 4))(i, q, k, v, slopes)) for i in (0, 1)]

  (out, grads), (want, want_grads) = both(q, k, v, slopes)
  helpers.assert_close(out, want, jnp.float32, "flash named: out")
  for g, w, n in zip(grads, want_grads, ("dq", "dk", "dv", "dslopes")):
    helpers.assert_close(g, w, jnp.float32, f"flash named: {n}")


def _flash_kernel_fn(mod_kind, mod, grad=True, **call):
  """`fn(q, k, v, arg)`: the flash kernels (compiled path) with one mod and
  `mod_args=(arg,)`; the gradients of q, k, v (and a float arg) if `grad`."""
  def attend(q, k, v, arg):
    record = inputs_lib.canonicalize(q, k, v, mod_args=(arg,),
                                     **{mod_kind: mod}, **call)
    out = flash_kernel.flash_attention(record, sm_scale=0.125).out
    return jnp.sum(out.astype(jnp.float32))

  def fn(q, k, v, arg):
    if not grad:
      return attend(q, k, v, arg)
    floating = jnp.issubdtype(arg.dtype, jnp.floating)
    return jax.grad(attend, (0, 1, 2, 3) if floating else (0, 1, 2))(
        q, k, v, arg)
  return fn


_T5 = fa.T5ScoreMod(num_buckets=8, max_distance=16)
LOWERED = {  # name: (mod kind, mod, arg, gradients, call)
    "alibi": ("score_mod", fa.alibi_score_mod, jnp.ones((H,)), True,
              dict(causal=True)),
    "t5": ("score_mod", _T5, jnp.ones((8, H)), False, {}),
    "prefix_lm": ("mask_mod", fa.prefix_lm_mask_mod,
                  jnp.ones((B,), jnp.int32), True, {}),
    "documents": ("mask_mod", fa.document_mask_mod,
                  jnp.ones((B, 64), jnp.int32), True, dict(causal=True)),
}


@pytest.mark.parametrize("name", sorted(LOWERED))
def test_flash_mods_lower_to_triton_for_cuda(name, monkeypatch):
  """The compiled path: forward and backward kernels with the mod lower
  through Pallas' Triton lowering (bf16, D = 64), on Hopper too (64
  queries: shorter than the Mosaic forward's tile, so every kernel is
  Triton's; longer calls: test_mosaic_forward_with_mods_lowers_for_cuda);
  T5 forward only."""
  monkeypatch.setattr(gpu, "compute_capability", lambda: 9.0)
  kind, mod, arg, grad, call = LOWERED[name]
  q = jnp.ones((B, 64, H, 64), jnp.bfloat16)
  kv = jnp.ones((B, 64, HKV, 64), jnp.bfloat16)
  text = helpers.lower_for_cuda(_flash_kernel_fn(kind, mod, grad, **call),
                               q, kv, kv, arg)
  assert "triton" in text and "mosaic_gpu" not in text


def test_flash_refuses_the_t5_table_gradient():
  """[buckets, H] is over H elements: flash's kernels cannot sum its
  gradient; the differentiated call is refused, naming who can."""
  q = jnp.ones((B, 64, H, 64), jnp.bfloat16)
  kv = jnp.ones((B, 64, HKV, 64), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match=(
      r"gradients of float mod_args of at most H = 4 elements .* leaf 0 of "
      r"shape \[8, 4\]\. Mechanisms that compute any mod_args gradient: "
      r"vanilla, blockwise, ring, ulysses")):
    jax.eval_shape(_flash_kernel_fn("score_mod", _T5), q, kv, kv,
                   jnp.ones((8, H)))


def test_flash_serves_a_frozen_t5_table():
  """Only a differentiated table is refused: with the table a constant of
  the gradient (not differentiated), flash gives q's, k's and v's
  gradients, equal to the float32 reference's."""
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((B, 24, H, 16)), jnp.float32)
  kv = jnp.asarray(rng.standard_normal((B, 40, HKV, 16)), jnp.float32)
  table = jnp.asarray(rng.standard_normal((8, H)), jnp.float32)

  def flash_loss(q, k, v):
    attention = fa.create_attention(
        "flash", num_heads=H, num_kv_heads=HKV, head_dim=16, score_mod=_T5,
        interpret=True)
    out = attention(q, k, v, causal=True, mod_args=(table,))
    return jnp.sum(out.attention_outputs * out.attention_outputs)

  def reference_loss(q, k, v):
    record = inputs_lib.canonicalize(q, k, v, causal=True, score_mod=_T5,
                                     mod_args=(table,))
    out = fa.reference_attention(record.query, record.key, record.value,
                                 None, record.visibility, sm_scale=0.25,
                                 mods=record.mods).out
    return jnp.sum(out * out)

  apply = hk.without_apply_rng(hk.transform(flash_loss)).apply
  got = helpers.jit(jax.grad(lambda *a: apply({}, *a), (0, 1, 2)))(q, kv, kv)
  want = helpers.jit(jax.grad(reference_loss, (0, 1, 2)))(q, kv, kv)
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=name)


def test_flash_skips_the_gradient_sums_of_constant_mod_args(
    monkeypatch):
  """ALiBi's slopes are most often constants: the backward's in-kernel sums
  (`KernelMods.grads`, read by both dK/dV kernels) run only for the
  differentiated leaves, and q's, k's and v's gradients equal the float32
  reference's. (Differentiated slopes get their sums and gradient:
  `test_flash_mods_match_the_reference`.)"""
  from flexible_attention.kernels.flash import triton_bwd  # pylint: disable=g-import-not-at-top
  seen = []
  dkdv = triton_bwd.dkdv

  def spy(st, *args, **kwargs):
    seen.append(st.mods.grads)
    return dkdv(st, *args, **kwargs)

  monkeypatch.setattr(triton_bwd, "dkdv", spy)
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.standard_normal((B, 24, H, 16)), jnp.float32)
  kv = jnp.asarray(rng.standard_normal((B, 40, HKV, 16)), jnp.float32)
  slopes = jnp.asarray(fa.alibi_slopes(H))

  def flash(q, k, v, slopes):
    inputs = inputs_lib.canonicalize(q, k, v, causal=True,
                                     score_mod=fa.alibi_score_mod,
                                     mod_args=(slopes,))
    return flash_kernel.flash_attention(inputs, sm_scale=0.25,
                                        interpret=True).out

  def ref(q, k, v, slopes):
    record = inputs_lib.canonicalize(q, k, v, causal=True,
                                     score_mod=fa.alibi_score_mod,
                                     mod_args=(slopes,))
    return reference.reference_attention(
        record.query, record.key, record.value, None, record.visibility,
        sm_scale=0.25, mods=record.mods).out

  loss = lambda f: lambda *a: jnp.sum(f(*a) * jnp.cos(f(*a)))
  got = helpers.jit(jax.grad(loss(flash), (0, 1, 2)))(q, kv, kv, slopes)
  want = helpers.jit(jax.grad(loss(ref), (0, 1, 2)))(q, kv, kv, slopes)
  assert seen and all(g == (False,) for g in seen), seen
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    helpers.assert_close(g, w, jnp.float32, name)


# --- Modules, auto ----------------------------------------------------------


def test_modules_take_mods_and_mod_args():
  """`fa.MultiHeadAttention(..., score_mod=)` with mod_args equals the same
  parameters with the dense bias; the facade passes mask_mod / mod_args
  on (to auto, which picks a mechanism that has mods)."""
  x = helpers.random_array(helpers.rng_for("modules"), (B, S_ODD, 8))
  distance = np.abs(np.arange(S_ODD)[:, None] - np.arange(S_ODD)[None, :])
  slopes = jnp.asarray(fa.alibi_slopes(H))

  def mha(x, with_mod):
    init = hk.initializers.VarianceScaling(1.0)
    if with_mod:
      return fa.MultiHeadAttention(
          H, D, w_init=init, mechanism="vanilla",
          score_mod=fa.alibi_score_mod)(x, x, x, mod_args=(slopes,))
    bias = (-slopes[:, None, None] * distance)[None]  # [1, H, T, T]
    return fa.MultiHeadAttention(H, D, w_init=init, mechanism="vanilla")(
        x, x, x, bias=bias)

  f, g = (hk.without_apply_rng(hk.transform(functools.partial(mha, with_mod=m)))
          for m in (True, False))
  params = helpers.jit(f.init)(jax.random.PRNGKey(0), x)
  helpers.assert_close(helpers.jit(f.apply)(params, x),
                       helpers.jit(g.apply)(params, x), jnp.float32, "mha")
  q, k, v = _qkv()
  prefix = jnp.asarray([4, 9], jnp.int32)
  chosen = []

  def facade(q, k, v):
    attn = fa.FlexibleAttentionModule(
        num_attention_heads=H, head_dims=D, num_key_value_heads=HKV,
        attn_mechanism="auto", mask_mod=fa.prefix_lm_mask_mod)
    auto = fa.create_attention("auto", num_heads=H, head_dim=D,
                               num_kv_heads=HKV,
                               mask_mod=fa.prefix_lm_mask_mod)
    auto(q, k, v, mod_args=(prefix,))
    chosen.append(auto.selected_mechanism)
    return attn(q, k, v, mod_args=(prefix,)).attention_outputs

  out = helpers.jit(hk.without_apply_rng(hk.transform(facade)).apply)(
      {}, q, k, v)
  assert fa.capabilities(chosen[0]).mask_mod
  pos = np.arange(S_ODD)
  mask = ((pos[None, None, None, :] < np.asarray(prefix)[:, None, None,
                                                         None]) |
          (pos[None, :] <= pos[:, None])[None, None])
  want = helpers.reference_vjp(q, k, v, None, call=dict(mask=mask)).out
  helpers.assert_close(out, want, jnp.float32, "facade")


# --- Misuse -----------------------------------------------------------------


def _call(mechanism="vanilla", mod_args=(), **options):
  """One unjitted call (everything below raises while tracing)."""
  q, k, v = _qkv()

  def f(q, k, v):
    attn = fa.create_attention(mechanism, num_heads=H, head_dim=D,
                               num_kv_heads=HKV, **options)
    return attn(q, k, v, causal=True, mod_args=mod_args)

  return hk.without_apply_rng(hk.transform(f)).apply({}, q, k, v)


SLOPES = (jnp.ones((H,)),)


@pytest.mark.parametrize("options,mod_args,error,match", [
    (dict(score_mod="alibi"), (), TypeError,
     r"score_mod must be a callable .* got str"),
    (dict(mask_mod=1.0), (), TypeError, r"mask_mod must be a callable"),
    # Signatures that cannot take (score, batch, head, q_pos, kv_pos, *args).
    (dict(score_mod=lambda s, b, h, q: s), (), TypeError,
     r"score_mod must be callable as score_mod\(score, batch, head, q_pos, "
     r"kv_pos, \*mod_args\): 5 positional arguments with the call's 0 "
     r"mod_args, but its signature is <lambda>\(s, b, h, q\)"),
    (dict(score_mod=fa.alibi_score_mod), (), TypeError,
     r"score_mod must be callable as .*: 5 positional arguments with the "
     r"call's 0 mod_args, but its signature is alibi_score_mod"),
    (dict(mask_mod=fa.prefix_lm_mask_mod), (jnp.ones((B,), jnp.int32),) * 2,
     TypeError, r"mask_mod must be callable as mask_mod\(batch, head, q_pos, "
     r"kv_pos, \*mod_args\): 6 positional arguments with the call's 2"),
    # Results of the wrong dtype or shape.
    (dict(score_mod=lambda s, b, h, q, k, sl: s.astype(jnp.bfloat16)),
     SLOPES, TypeError, r"score_mod must return an array of the score's "
     r"shape \[B, H, Sq, Sk\] = \(2, 4, 13, 13\) and dtype float32, got "
     r"shape \(2, 4, 13, 13\) dtype bfloat16"),
    (dict(score_mod=lambda s, b, h, q, k, sl: sl[h] * s[..., :1]), SLOPES,
     TypeError, r"score_mod must return .* got shape \(2, 4, 13, 1\)"),
    (dict(score_mod=lambda s, b, h, q, k, sl: (s, s)), SLOPES, TypeError,
     r"score_mod must return .* got tuple"),
    (dict(mask_mod=lambda b, h, q, k: (q - k).astype(jnp.float32)), (),
     TypeError, r"mask_mod must return a bool array broadcastable to \[B, H, "
     r"Sq, Sk\] = \(2, 4, 13, 13\) \(True = visible\), got shape "
     r"\(2, 1, 13, 13\) dtype float32"),
    (dict(mask_mod=lambda b, h, q, k: jnp.ones((3,), bool)), (), TypeError,
     r"mask_mod must return a bool array .* got shape \(3,\)"),
    # A mod that fails when traced (a Python branch on a traced value).
    (dict(mask_mod=lambda b, h, q, k: q > k if k.sum() > 0 else q < k), (),
     TypeError, r"mask_mod failed when traced as mask_mod\(batch, head, "
     r"q_pos, kv_pos, \*mod_args\) .*TracerBoolConversionError"),
    # mod_args without a mod, or not a tuple of arrays.
    ({}, SLOPES, ValueError, r"mod_args were given \(1 items\) but the "
     r"module has no score_mod or mask_mod"),
    (dict(score_mod=fa.alibi_score_mod), jnp.ones((H,)), TypeError,
     r"mod_args must be a tuple of arrays"),
    (dict(score_mod=fa.alibi_score_mod), ("slopes",), TypeError,
     r"mod_args must hold arrays; leaf 0 is str"),
    (dict(score_mod=fa.T5ScoreMod(num_buckets=8)), (jnp.ones((4, H)),),
     ValueError, r"score_mod failed when traced .* the T5 table must be "
     r"\[num_buckets, H\] = \[8, H\], got shape \(4, 4\)"),
])
def test_misuse_raises_naming_the_argument(options, mod_args, error, match):
  with pytest.raises(error, match=match):
    _call(mod_args=mod_args, **options)


def test_ring_with_flash_blocks_refuses_a_large_mod_args_gradient():
  """ring's flash blocks differentiate every float mod_args leaf, and the
  kernels only those of at most H elements: a T5 table is refused in the
  backward, frozen or not, naming who computes it; the forward it serves
  equals the float32 reference."""
  q, k, v = _qkv()
  table = helpers.random_array(helpers.rng_for("ring-t5"), (8, H))

  def f(q, k, v, table):
    attn = fa.create_attention("ring", num_heads=H, head_dim=D,
                               num_kv_heads=HKV, score_mod=_T5,
                               block_kernel="flash", interpret=True)
    return attn(q, k, v, causal=True, mod_args=(table,)).attention_outputs

  apply = hk.without_apply_rng(hk.transform(f)).apply
  rec = inputs_lib.canonicalize(q, k, v, causal=True, score_mod=_T5,
                                mod_args=(table,))
  want = reference.reference_attention(
      rec.query, rec.key, rec.value, None, rec.visibility, sm_scale=D**-0.5,
      mods=rec.mods).out
  helpers.assert_close(apply({}, q, k, v, table), want, jnp.float32,
                       "ring[flash] T5 forward")
  with pytest.raises(NotImplementedError, match=(
      r"ring's block_kernel='flash'\) compute the gradients of float "
      r"mod_args of at most H = 4 elements .* leaf 0 of shape \[8, 4\]\. "
      r"Mechanisms that compute any mod_args gradient: vanilla, blockwise, "
      r"ring, ulysses")):
    jax.grad(lambda q: jnp.sum(apply({}, q, k, v, table)))(q)


@pytest.mark.parametrize("mod,match", [
    # A primitive Triton cannot lower (erf), and a mod_args array used
    # whole rather than indexed.
    (lambda s, b, h, q, k, sl: s + jax.lax.erf(sl[h]), r"the primitive 'erf'"),
    (lambda s, b, h, q, k, sl: s + jnp.sum(sl), r"mod_args array used whole"),
])
def test_flash_refuses_mods_triton_cannot_lower(mod, match):
  with pytest.raises(NotImplementedError, match=match + r".*mechanisms that "
                     r"take any score_mod: vanilla, blockwise, ring, ulysses"):
    _call("flash", mod_args=SLOPES, score_mod=mod, interpret=True)


@pytest.mark.parametrize("mechanism,platform", [
    ("cudnn", "gpu"), ("splash", "tpu"), ("flash", "tpu")])
def test_capabilities_refuse_mods_elsewhere(mechanism, platform):
  for feature in ("score_mod", "mask_mod"):
    assert not fa.capabilities(mechanism, platform).supports(feature)
    request = registry.AttentionRequest(
        dims=inputs_lib.AttentionDims(B, 128, 128, H, H, 64, 64),
        dtype="bfloat16", platform=platform, features=frozenset({feature}))
    reason = registry.unsupported_reason(mechanism, request)
    assert f"'{feature}'" in reason and "vanilla, blockwise" in reason, (
        reason)


def test_t5_options_are_checked():
  with pytest.raises(ValueError, match=r"num_buckets must be an int >= 4"):
    fa.T5ScoreMod(num_buckets=2)
  with pytest.raises(ValueError, match=r"max_distance must be an int >= 9"):
    fa.T5ScoreMod(num_buckets=32, max_distance=8)
  with pytest.raises(TypeError, match=r"bidirectional must be a bool"):
    fa.T5ScoreMod(bidirectional=1)
  with pytest.raises(ValueError, match=r"num_heads must be a positive int"):
    fa.alibi_slopes(0)


# --- Block sparsity from a mask_mod (flash) ----------------------------------

S_TILES = 60  # Four 16-wide tiles, the last one padded.
TILES = fa.BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16,
                      block_q_dq=16, block_k_dq=16)


def _block_diagonal(batch, head, q_pos, kv_pos):
  """Two 32-position blocks, and every query sees the first 8 keys."""
  del batch, head
  return (q_pos // 32 == kv_pos // 32) | (kv_pos < 8)


def _fwd_bounds(mask_mod, mod_args=()):
  """flash's forward bounds `[B, nq, 4]` (`lo, flo, fhi, hi`) of a call of
  S_TILES with `mask_mod`, prepared under `jit` (as a model traces it)."""
  q, k, v = helpers.random_qkv(helpers.rng_for("tiles"), B, S_TILES, S_TILES,
                               H, HKV, D)

  def bounds(q, k, v, mod_args):
    inputs = inputs_lib.canonicalize(q, k, v, mask_mod=mask_mod,
                                     mod_args=mod_args)
    call = flash_kernel.prepare(inputs, None, sm_scale=1.0,
                                block_sizes=TILES, interpret=True)
    return call.aux["bounds_fwd"]

  return np.asarray(jax.jit(bounds)(q, k, v, mod_args))


def test_flash_static_mask_mod_skips_and_unmasks_tiles():
  """A mask_mod without mod_args gives tile tables at trace time: query
  tiles 0-1 never load key tiles 2-3 and need no mask on 0-1; tiles 2-3
  see key tile 0 masked and 2 unmasked (tile 1 lies inside the run, and
  is masked)."""
  bounds = _fwd_bounds(_block_diagonal)
  # The last key tile holds padding: never full.
  want = [[0, 0, 2, 2], [0, 0, 2, 2], [0, 2, 3, 4], [0, 2, 3, 4]]
  for row in bounds:
    np.testing.assert_array_equal(row, want)
  # The tables are per batch row and the union over heads.
  from flexible_attention.kernels.flash import mod_lowering, mod_tables  # pylint: disable=g-import-not-at-top
  per_head = lambda b, h, q, k: k // 16 == h
  km = mod_lowering.kernel_mods(inputs_lib.canonicalize(
      *helpers.random_qkv(helpers.rng_for("tiles"), 1, 64, 64, H, HKV, D),
      mask_mod=per_head).mods)
  assert mod_tables.dependence(km) == {"head", "kv_pos"}
  inputs = inputs_lib.canonicalize(
      *helpers.random_qkv(helpers.rng_for("tiles"), 1, 64, 64, H, HKV, D),
      mask_mod=per_head)
  ((maybe, full),) = mod_tables.derive(
      km, inputs.mods, inputs.visibility, num_heads=H, q_pad=64, kv_pad=64,
      blocks=((16, 16),)).values()
  assert maybe.shape == (1, 4, 4) and maybe.all() and not full.any()


def test_flash_static_mask_mod_matches_the_dense_mask(monkeypatch):
  """Through the module (jit): the derived tables are used, and outputs and
  gradients of q, k, v equal vanilla's with the dense mask."""
  from flexible_attention.kernels.flash import mod_tables  # pylint: disable=g-import-not-at-top
  derived = []
  derive = mod_tables.derive
  monkeypatch.setattr(mod_tables, "derive", lambda *a, **kw: derived.append(
      derive(*a, **kw)) or derived[-1])
  q, k, v = helpers.random_qkv(helpers.rng_for("tiles"), B, S_TILES, S_TILES,
                               H, HKV, D)
  pos = np.arange(S_TILES)
  dense = np.asarray(_block_diagonal(0, 0, pos[:, None], pos[None, :]))

  def f(q, k, v):
    flash = fa.create_attention("flash", num_heads=H, head_dim=D,
                                num_kv_heads=HKV, interpret=True,
                                block_sizes=TILES, mask_mod=_block_diagonal)
    vanilla = fa.create_attention("vanilla", num_heads=H, head_dim=D,
                                  num_kv_heads=HKV)
    return (flash(q, k, v).attention_outputs,
            vanilla(q, k, v, mask=dense[None, None]).attention_outputs)

  apply = hk.without_apply_rng(hk.transform(f)).apply
  ct = helpers.random_array(helpers.rng_for("tiles", "ct"), q.shape)

  @helpers.jit
  def both(q, k, v):
    loss = lambda i, *a: jnp.sum(jnp.sin(apply({}, *a)[i]) * ct)
    return [(apply({}, q, k, v)[i], jax.grad(loss, (1, 2, 3))(i, q, k, v))
            for i in (0, 1)]

  (out, grads), (want, want_grads) = both(q, k, v)
  assert derived and all(t is not None for t in derived), derived
  helpers.assert_close(out, want, jnp.float32, "static mask_mod: out")
  for g, w, n in zip(grads, want_grads, ("dq", "dk", "dv")):
    helpers.assert_close(g, w, jnp.float32, f"static mask_mod: {n}")


def test_flash_mask_mod_reading_mod_args_derives_no_table():
  """A mask_mod that reads mod_args (prefix-LM's lengths) skips no tile
  and masks every one: the bounds are the structure's alone (its
  correctness: test_flash_named_mods_equal_their_dense_bias_and_mask)."""
  bounds = _fwd_bounds(fa.prefix_lm_mask_mod,
                       (jnp.asarray([4, 40], jnp.int32),))
  for row in bounds:
    np.testing.assert_array_equal(row, [[0, 4, 4, 4]] * 4)


# --- The Mosaic GPU forward's mods (Hopper) ----------------------------------

# Mods whose mod_args reads are per program (one batch row, one head): the
# Mosaic forward evaluates them (`kernels/flash/mosaic_mods.py`).


def _hopper_score_mod(score, batch, head, q_pos, kv_pos, slopes, scale,
                      prefix):
  """A soft clamp of the score times scale[batch], minus ALiBi's
  slopes[head] * |q_pos - kv_pos|."""
  del prefix
  return (20.0 * jnp.tanh(score * scale[batch] / 20.0)
          - slopes[head] * jnp.abs(q_pos - kv_pos))


def _hopper_mask_mod(batch, head, q_pos, kv_pos, slopes, scale, prefix):
  """Prefix-LM (prefix[batch]) and a head-dependent hole: a query with
  (head + q_pos) % 5 == 0 sees only the prefix's keys after it (none past
  the prefix: zeros, lse -inf)."""
  del slopes, scale
  return (((kv_pos < prefix[batch]) | (kv_pos <= q_pos))
          & (((head + q_pos) % 5 != 0) | (kv_pos > q_pos)))


def _hopper_mod_args():
  rng = helpers.rng_for("hopper-mods")
  return (jnp.asarray(fa.alibi_slopes(H)),
          jnp.asarray(1.0 + 0.2 * rng.standard_normal(B), jnp.float32),
          jnp.asarray([40, 150], jnp.int32))


def _every_primitive(score, batch, head, q_pos, kv_pos, slopes, scale,
                     prefix):
  """Every primitive of `mosaic_mods.TILE_PRIMITIVES` on the tile (int32,
  float32, bool), float, int and bool values of the program; products and
  quotients of values a derivative perturbs (the score, the slope), whose
  jvp JAX writes with `add_any` and `integer_pow(y, -2)`."""
  lax = jax.lax
  i = lax.abs(lax.sub(q_pos, kv_pos))
  i = lax.rem(lax.div(lax.add(lax.mul(i, 3), 1), 2), 7)
  i = lax.clamp(0, lax.min(lax.max(i, prefix[batch]), 50), 40)
  i = lax.neg(i)
  i = lax.sign(i) + lax.integer_pow(i, 2) + lax.square(i)
  i = (lax.shift_left(i, 1) + lax.shift_right_arithmetic(i, 1)
       + lax.shift_right_logical(i, 2))
  i = lax.bitwise_not(lax.bitwise_xor(i, 3))
  c = lax.bitwise_and(q_pos >= kv_pos, lax.bitwise_not(kv_pos > q_pos + 99))
  c = lax.bitwise_xor(lax.bitwise_or(c, i == 0), i != 1)
  c = c | (i < -3) | (i <= -5) | (head < 1)
  f = lax.convert_element_type(i, jnp.float32) * 1e-3
  x = score * slopes[head] / 2.0 + lax.exp(f) + lax.exp2(f) + lax.log(
      lax.abs(f) + 1.0) + lax.tanh(score) + lax.logistic(score)
  x = x + (score * lax.tanh(score) / (2.0 + lax.abs(score))
           * slopes[head] * slopes[head])
  x = jnp.where(c, x, -1e9)
  x = lax.min(lax.max(x, -1e8), 1e8) + lax.sign(x) + lax.square(x) * 1e-3
  x = lax.clamp(-1e4, lax.div(lax.neg(x), scale[batch]), 1e4)
  return x + lax.integer_pow(lax.abs(x), 3) * 0.0 + lax.convert_element_type(
      lax.convert_element_type(x, jnp.int32), jnp.float32) * 1e-6


def _static_mask_mod(batch, head, q_pos, kv_pos, *args):
  """Two 128-position blocks, and every query sees the first 8 keys."""
  del batch, head, args
  return (q_pos // 128 == kv_pos // 128) | (kv_pos < 8)


MOSAIC_MODS = {  # name: (score_mod, mask_mod, structure)
    "alibi": (lambda s, b, h, q, k, sl, *_: fa.alibi_score_mod(
        s, b, h, q, k, sl), None, dict(causal=True)),
    "prefix_lm": (None, lambda b, h, q, k, sl, sc, pre: fa.prefix_lm_mask_mod(
        b, h, q, k, pre), {}),
    "static": (None, _static_mask_mod, dict(causal=True)),
    "both": (_hopper_score_mod, _hopper_mask_mod, dict(sliding_window=200)),
    "every_primitive": (_every_primitive, _hopper_mask_mod, {}),
    # Not causal, no mask: every dK/dV tile unmasked (`rotate_dq` acts).
    "alibi_full": (lambda s, b, h, q, k, sl, *_: fa.alibi_score_mod(
        s, b, h, q, k, sl), None, {}),
    # Affine in the positions, not causal: the kernels' split (a key term
    # per element, the row term in the lse), its slopes products of two
    # program values, with a constant.
    "affine": (lambda s, b, h, q, k, sl, sc, _: (
        s + sl[h] * sc[b] * (k - q).astype(s.dtype) + 3.0 * sc[b]), None,
               dict(sliding_window=200)),
}


def _hopper_call(name, q, k, v, mod_args, **options):
  score_mod, mask_mod, call = MOSAIC_MODS[name]
  return inputs_lib.canonicalize(q, k, v, score_mod=score_mod,
                                 mask_mod=mask_mod, mod_args=mod_args,
                                 **call, **options)


def _backends(inputs, **options):
  """`(fwd_backend, dkv_backend, dq_backend)` that `prepare` picks for a
  call; dq_backend "fused" where the dK/dV kernel computes dQ."""
  launches = []
  jax.eval_shape(lambda: launches.append(flash_kernel.prepare(
      inputs, sm_scale=0.125, **options).static.launch))
  launch = launches[0]
  return (launch.fwd_backend, launch.dkv_backend,
          "fused" if launch.atomic_dq else launch.dq_backend)


@pytest.mark.parametrize("long_keys,name,frozen", [
    # The Triton dQ beside the Mosaic kernels (the dK/dV kernel of every
    # mod lowers in the Mosaic dQ cases below as here).
    (False, "alibi", False), (False, "every_primitive", False),
    (True, "alibi", False), (True, "prefix_lm", False),
    (True, "static", False), (True, "every_primitive", False),
    # Constant mod_args: the dK/dV kernel without the gradient sums.
    (True, "alibi", True)],
    ids=["short-alibi", "short-every_primitive", "mosaic_dq-alibi",
         "mosaic_dq-prefix_lm", "mosaic_dq-static",
         "mosaic_dq-every_primitive", "mosaic_dq-alibi-frozen"])
def test_mosaic_forward_with_mods_lowers_for_cuda(name, long_keys, frozen,
                                                  monkeypatch):
  """On Hopper the policy gives these mods the Mosaic forward and dK/dV
  kernels, whose gradient program (of q, k, v and the float mod_args)
  lowers through Mosaic GPU: every primitive it allows among them, and the
  score_mods' derivatives in the score and in the program values they read
  (the jvp of every allowed primitive) in the dK/dV kernel, beside the
  Triton dQ kernel. From `MOSAIC_DQ_MIN_KV_LEN` keys on (lowered at 0 here)
  the dQ kernel is Mosaic's too, with every mod. With the mod_args not
  differentiated (`frozen`) the dK/dV kernel skips their sums. Below that
  length (`long_keys` False) the gradient of q alone is lowered: the
  forward and the Triton dQ kernel (the dK/dV kernel, the same as with the
  Mosaic dQ, is dropped; the policy's choice of it is asserted)."""
  monkeypatch.setattr(gpu, "compute_capability", lambda: 9.0)
  if long_keys:
    monkeypatch.setattr(flash_launch, "MOSAIC_DQ_MIN_KV_LEN", 0)
  q = jax.ShapeDtypeStruct((B, 200, H, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((B, 328, HKV, 64), jnp.bfloat16)

  def loss(q, k, v, slopes, scale, prefix):
    out = flash_kernel.flash_attention(
        _hopper_call(name, q, k, v, (slopes, scale, prefix)),
        sm_scale=0.125).out
    return jnp.sum(out.astype(jnp.float32))

  argnums = (0, 1, 2) if frozen else (0, 1, 2, 3, 4)
  if not long_keys:
    zeros = [jnp.zeros(x.shape, x.dtype) for x in (q, kv)]
    assert _backends(_hopper_call(name, zeros[0], zeros[1], zeros[1],
                                  _hopper_mod_args())) == (
                                      "mosaic", "mosaic", "triton")
    argnums = 0
  text = helpers.lower_for_cuda(jax.grad(loss, argnums), q, kv, kv,
                                *_hopper_mod_args())
  targets = re.findall(r"custom_call @\"?([\w$.]+)", text)
  kinds = sorted("mosaic" if "mosaic_gpu" in t else
                 "triton" if "triton" in t else t for t in targets)
  want = (["mosaic", "mosaic", "mosaic"] if long_keys else
          ["mosaic", "triton"])
  assert kinds == want, targets


@pytest.mark.parametrize("name,mod_kind,mod,arg,backends", [
    ("alibi", "score_mod", fa.alibi_score_mod, jnp.ones((H,)), "mosaic"),
    ("prefix_lm", "mask_mod", fa.prefix_lm_mask_mod,
     jnp.ones((B,), jnp.int32), "mosaic"),
    ("static", "mask_mod", lambda b, h, q, k, _: q >= k, None, "mosaic"),
    ("t5", "score_mod", _T5, jnp.ones((8, H)), "triton"),
    ("documents", "mask_mod", fa.document_mask_mod,
     jnp.ones((B, 256), jnp.int32), "triton"),
])
def test_policy_gives_per_program_mods_the_mosaic_forward(
    name, mod_kind, mod, arg, backends, monkeypatch):
  """`choose_launch` on Hopper: the Mosaic forward and dK/dV kernels (and,
  with 16k keys, dQ) for mods that read mod_args per program, Triton's for
  per-element reads (T5's buckets, document ids)."""
  monkeypatch.setattr(gpu, "compute_capability", lambda: 9.0)
  q = jnp.zeros((B, 256, H, 64), jnp.bfloat16)
  mod_args = (jnp.zeros((1,)) if arg is None else arg,)
  inputs = inputs_lib.canonicalize(q, q, q, mod_args=mod_args,
                                   **{mod_kind: mod})
  kernel_mods = mod_lowering.kernel_mods(inputs.mods)
  for kv_len, dq in ((256, "triton"),
                     (flash_launch.MOSAIC_DQ_MIN_KV_LEN, backends)):
    launch = flash_launch.choose_launch(
        dtype=jnp.bfloat16, head_dim=64, value_dim=64, q_len=256,
        kv_len=kv_len, causal=False, bias=False, mask=False, precision=None,
        interpret=False, block_sizes=None, launch=None,
        float32_results=False, mods=kernel_mods, groups=1)
    assert (launch.fwd_backend, launch.dkv_backend, launch.dq_backend) == (
        backends, backends, dq)
  reason = mosaic_mods.unsupported_reason(kernel_mods)
  assert (reason is None) == (backends == "mosaic"), reason


@pytest.mark.parametrize("mod_kind,mod,arg,match", [
    ("score_mod", _T5, jnp.ones((8, H)),
     r"its score_mod indexes mod_args per element .*table\[bucket, head\]"),
    ("mask_mod", fa.document_mask_mod, jnp.ones((B, 256), jnp.int32),
     r"its mask_mod indexes mod_args per element"),
    ("score_mod", lambda s, b, h, q, k, sl: s + jnp.sin(s), jnp.ones((H,)),
     r"its score_mod uses the primitive 'sin' per element"),
    ("score_mod", lambda s, b, h, q, k, sl: jnp.fmod(s, sl[h]),
     jnp.ones((H,)), r"its score_mod uses 'rem' on floats"),
])
def test_explicit_mosaic_forward_refuses_mods_naming_the_reason(
    mod_kind, mod, arg, match):
  """`LaunchConfig(fwd_backend="mosaic")` for a mod it cannot evaluate is
  an error naming why (never a silent Triton forward)."""
  launch = dataclasses.replace(
      flash_kernel.default_launch_config(64, False, 9.0),
      fwd=flash_kernel.mosaic_launch(64), fwd_backend="mosaic")
  q = jnp.zeros((B, 256, H, 64), jnp.bfloat16)
  inputs = inputs_lib.canonicalize(q, q, q, mod_args=(arg,),
                                   **{mod_kind: mod})
  with pytest.raises(ValueError, match=r"fwd_backend='mosaic' cannot serve "
                     r"this call: " + match):
    _backends(inputs, launch=launch)


@pytest.mark.parametrize("head_dim,atomic_dq,mod_kind,mod,arg,match", [
    (256, False, "score_mod", fa.alibi_score_mod, jnp.ones((H,)),
     r"its dK/dV kernel evaluates score_mod / mask_mod at padded head sizes "
     r"below 256 \(the rows layout\), got 256"),
    (64, False, "score_mod", _T5, jnp.ones((8, H)),
     r"its score_mod indexes mod_args per element"),
])
def test_explicit_mosaic_dkv_refuses_mods_naming_the_reason(
    head_dim, atomic_dq, mod_kind, mod, arg, match, monkeypatch):
  """`LaunchConfig(dkv_backend="mosaic")` with mods it cannot serve (the
  columns layout at Dp = 256, per-element reads) is an error naming why;
  the default launches keep Triton's dK/dV kernel there."""
  launch = dataclasses.replace(
      flash_kernel.default_launch_config(head_dim, False, 9.0),
      dkv=flash_kernel.mosaic_dkv_launch(head_dim), dkv_backend="mosaic",
      atomic_dq=atomic_dq)
  q = jnp.zeros((B, 256, H, head_dim), jnp.bfloat16)
  inputs = inputs_lib.canonicalize(q, q, q, mod_args=(arg,),
                                   **{mod_kind: mod})
  with pytest.raises(ValueError, match=r"dkv_backend='mosaic' cannot serve "
                     r"this call: " + match):
    _backends(inputs, launch=launch)
  monkeypatch.setattr(gpu, "compute_capability", lambda: 9.0)
  if not atomic_dq:
    assert _backends(inputs)[1] == "triton"


@pytest.mark.parametrize("name", ["both", "every_primitive"])
def test_mosaic_dkv_slot_gradients_give_mod_args_gradients(name):
  """The Mosaic dK/dV kernel's `mod_args` gradients, emulated on plain
  arrays: per (batch row, head) and slot of `mosaic_mods.grad_slots`, the
  sum of a cotangent of the modified logits times the score_mod's
  derivative in that program value (`TileMods.slot_grads`, forward mode,
  zero where the cotangent is), then `args_grads` (the vjp of
  `program_rows`), equal `jax.grad` of the score_mod on the whole call for
  the [H] slopes and the [B] scale (and None for the int prefix); so does
  the chain rule in the score (`TileMods.score_grads`)."""
  rng = helpers.rng_for("slot-gradients", name)
  sq, sk = 8, 16
  s = jnp.asarray(rng.normal(size=(B, H, sq, sk)) * 3, jnp.float32)
  ct = rng.normal(size=(B, H, sq, sk))
  ct = jnp.asarray(np.where(rng.random((B, H, sq, sk)) < 0.3, 0.0, ct),
                   jnp.float32)  # Invisible pairs: no cotangent.
  q_pos = jnp.asarray(rng.integers(0, 300, (B, sq)), jnp.int32)
  kv_pos = jnp.asarray(rng.integers(0, 300, (B, sk)), jnp.int32)

  def program(km, floats, ints, s, ct, q_pos, kv_pos):  # One (b, h).
    counts = mosaic_mods.plan(km).counts
    scalars = [list(r[:n]) for r, n in zip((floats, ints), counts)]
    tile = mosaic_mods.TileMods(km, scalars, s.shape)
    qp = jnp.broadcast_to(q_pos[:, None], s.shape)
    kp = jnp.broadcast_to(kv_pos[None, :], s.shape)
    dslots = jnp.stack([jnp.sum(jnp.where(ct != 0.0, ct * d, 0.0))
                        for d in tile.slot_grads(s, qp, kp,
                                                 mosaic_mods.grad_slots(km))])
    return dslots, ct * tile.score_grads(s, qp, kp)[1]

  @jax.jit
  def got_and_want(slopes, scale, prefix):
    q = jnp.zeros((B, 300, H, 8))
    mods = _hopper_call(name, q, q, q, (slopes, scale, prefix)).mods
    km = mod_lowering.kernel_mods(mods)
    floats, ints = mosaic_mods.program_rows(km, mods, B, H)
    heads = jax.vmap(functools.partial(program, km),
                     (0, 0, 0, 0, None, None))
    # [B, H, n], [B, H, Sq, Sk]
    dslots, ds = jax.vmap(heads)(floats, ints, s, ct, q_pos, kv_pos)
    want = jax.grad(lambda s, args: jnp.sum(
        ct * mods.score(s, q_pos, kv_pos, args=args + (prefix,))), (0, 1))(
            s, (slopes, scale))
    return (ds, mosaic_mods.args_grads(km, mods, dslots)), want

  (ds, (dslopes, dscale, dprefix)), (want_ds, want) = got_and_want(
      *_hopper_mod_args())
  assert dprefix is None
  helpers.assert_close(ds, want_ds, jnp.float32, f"{name}: ds")
  for n, got, w in zip(("dslopes", "dscale"), (dslopes, dscale), want):
    assert got.dtype == jnp.float32, n
    helpers.assert_close(got, w, jnp.float32, f"{name}: {n}")


def test_mosaic_mods_evaluator_computes_the_mods():
  """The Mosaic forward's evaluator (`mosaic_mods.TileMods`: the program
  part through `program_rows`, the tile part on `[64, 128]` tiles) run on
  plain arrays equals the mods on the whole call (`core.mods.Mods`), for
  every (batch row, head) and any positions."""
  rng = helpers.rng_for("evaluator")
  s = jnp.asarray(rng.normal(size=(B, H, 64, 128)) * 3, jnp.float32)
  q_pos = jnp.asarray(rng.integers(0, 300, (B, 64)), jnp.int32)
  kv_pos = jnp.asarray(rng.integers(0, 300, (B, 128)), jnp.int32)

  def program(km, floats, ints, s, q_pos, kv_pos):  # One (batch row, head).
    counts = mosaic_mods.plan(km).counts
    scalars = [tuple(r[:n]) for r, n in zip((floats, ints), counts)]
    tile = mosaic_mods.TileMods(km, scalars, s.shape)
    qp = jnp.broadcast_to(q_pos[:, None], s.shape)
    kp = jnp.broadcast_to(kv_pos[None, :], s.shape)
    return tile.score(s, qp, kp), tile.visible(qp, kp)

  @jax.jit
  def got_and_want(mod_args, s, q_pos, kv_pos):
    q = jnp.zeros((B, 300, H, 8))
    mods = _hopper_call("every_primitive", q, q, q, mod_args).mods
    km = mod_lowering.kernel_mods(mods)
    assert mosaic_mods.plan(km).reason is None, mosaic_mods.plan(km).reason
    rows = [jnp.zeros((B, H, mosaic_mods.ROW)) if r is None else r
            for r in mosaic_mods.program_rows(km, mods, B, H)]
    heads = jax.vmap(functools.partial(program, km), (0, 0, 0, None, None))
    return (jax.vmap(heads)(*rows, s, q_pos, kv_pos),
            (mods.score(s, q_pos, kv_pos),
             jnp.broadcast_to(mods.visible(B, H, q_pos, kv_pos), s.shape)))

  (got_s, got_keep), (want_s, want_keep) = got_and_want(
      _hopper_mod_args(), s, q_pos, kv_pos)
  np.testing.assert_allclose(got_s, want_s, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got_keep, want_keep)


def _positions_mod(score, batch, head, q_pos, kv_pos, slopes):
  """ALiBi's distance and more integer arithmetic on the positions (every
  equation the Mosaic kernels may do in float32: `neg`, `add` of a
  literal, `min`, `max`, `abs`, `sub`), converted to float32; `1 / +0.0`
  where q_pos == kv_pos (a `-0.0` would give `-inf`)."""
  del batch
  d = jnp.maximum(jnp.minimum(-(q_pos - kv_pos) + 5, 1 << 22), -kv_pos)
  return (score - slopes[head] * jnp.abs(q_pos - kv_pos).astype(jnp.float32)
          + (d - 5).astype(jnp.float32) * 1e-7
          + 1.0 / (-(q_pos - kv_pos)).astype(jnp.float32))


@pytest.mark.parametrize("bound,floated", [
    (None, 0),  # Positions unknown at trace time: int32 all the way.
    (1 << 22, 3),  # Every conversion in float32, exactly.
    (1 << 23, 2)])  # |q_pos - kv_pos| may reach 2^24, `d - 5` more: int32.
def test_mosaic_tile_mods_do_exact_position_arithmetic_in_float32(
    bound, floated):
  """With a position bound (`Static.position_bound`), `TileMods` does the
  integer arithmetic on positions that a mod converts to float32 in
  float32 (positions converted once), exactly where every value stays
  within 2^24: the same bits as the int32 way, for positions at the
  bound; past 2^24 it keeps the int32 way."""
  rng = helpers.rng_for("float-positions")
  tile = (64, 128)
  s = jnp.asarray(rng.normal(size=tile) * 3, jnp.float32)
  top = (1 << 22) if bound is None else bound
  q_pos = rng.integers(-top, top + 1, tile[0]).astype(np.int32)
  kv_pos = rng.integers(-top, top + 1, tile[1]).astype(np.int32)
  q_pos[:3], kv_pos[:3] = [top, -top, 7], [-top, top, 7]  # Extremes, a tie.
  slopes = jnp.asarray(fa.alibi_slopes(H))
  q = jnp.zeros((1, tile[0], H, 8))
  mods = inputs_lib.canonicalize(q, q, q, score_mod=_positions_mod,
                                 mod_args=(slopes,)).mods
  km = mod_lowering.kernel_mods(mods)
  assert mosaic_mods.plan(km).reason is None, mosaic_mods.plan(km).reason
  floats, _ = mosaic_mods.program_rows(km, mods, 1, H)
  head = 3
  evaluator = mosaic_mods.TileMods(
      km, (tuple(floats[0, head, :mosaic_mods.plan(km).counts[0]]), ()),
      tile, position_bound=bound)
  qp = jnp.broadcast_to(jnp.asarray(q_pos)[:, None], tile)
  kp = jnp.broadcast_to(jnp.asarray(kv_pos)[None, :], tile)
  got = jax.jit(evaluator.score)(s, qp, kp)
  want = jax.jit(_positions_mod)(s, 0, head, qp, kp, slopes)
  np.testing.assert_array_equal(got, want)
  assert evaluator.floated == floated


@pytest.mark.parametrize("bound", [None, 4096])
def test_mosaic_tile_mods_drop_the_causal_distances_abs(bound):
  """In a causal call the kernels keep only pairs with q_pos >= kv_pos, so
  ALiBi's `|q_pos - kv_pos|` is evaluated as `q_pos - kv_pos` (no `abs`
  in the tile's program): equal to the mod on every such pair, in the
  int32 way and in float32 (`position_bound`); not without causal."""
  rng = helpers.rng_for("causal-distance")
  tile = (64, 128)
  s = jnp.asarray(rng.normal(size=tile) * 3, jnp.float32)
  q_pos = rng.integers(0, 4096, tile[0]).astype(np.int32)
  kv_pos = rng.integers(0, 4096, tile[1]).astype(np.int32)
  slopes = jnp.asarray(fa.alibi_slopes(H))
  q = jnp.zeros((1, tile[0], H, 8))
  mods = inputs_lib.canonicalize(q, q, q, score_mod=fa.alibi_score_mod,
                                 mod_args=(slopes,)).mods
  km = mod_lowering.kernel_mods(mods)
  floats, _ = mosaic_mods.program_rows(km, mods, 1, H)
  head = 5
  scalars = (tuple(floats[0, head, :mosaic_mods.plan(km).counts[0]]), ())
  qp = jnp.broadcast_to(jnp.asarray(q_pos)[:, None], tile)
  kp = jnp.broadcast_to(jnp.asarray(kv_pos)[None, :], tile)
  want = fa.alibi_score_mod(s, 0, head, qp, kp, slopes)
  kept = q_pos[:, None] >= kv_pos[None, :]
  for causal in (True, False):
    evaluator = mosaic_mods.TileMods(km, scalars, tile, position_bound=bound,
                                     causal=causal)
    prims = {e.primitive.name for e in jax.make_jaxpr(evaluator.score)(
        s, qp, kp).jaxpr.eqns}
    assert ("abs" in prims) != causal, prims
    assert evaluator.elided == int(causal)
    got = jax.jit(evaluator.score)(s, qp, kp)
    np.testing.assert_allclose(np.where(kept, got, 0.0),
                               np.where(kept, want, 0.0), rtol=1e-6,
                               atol=1e-5)
    if not causal:
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


_SPLIT_MODS = {  # name: (score_mod, split when causal, split otherwise)
    "alibi": (fa.alibi_score_mod, True, False),
    "head_shift": (lambda s, b, h, q, k, sl: s - sl[h], True, True),
    "key_only": (lambda s, b, h, q, k, sl: s - sl[h] * k.astype(s.dtype),
                 True, True),
    "literals": (lambda s, b, h, q, k, sl: (
        s + 0.25 * (k - q).astype(s.dtype) / 2.0 + 3.0), True, True),
    "product": (lambda s, b, h, q, k, sl: (
        s + sl[h] * sl[b] * (q - k).astype(s.dtype)), True, True),
    "scaled_score": (lambda s, b, h, q, k, sl: s * sl[h], False, False),
    "integer_div": (lambda s, b, h, q, k, sl: (
        s + ((k - q) // 2).astype(s.dtype)), False, False),
    "squared": (lambda s, b, h, q, k, sl: (
        s - ((q - k) ** 2).astype(s.dtype)), False, False),
    "abs_of_sum": (lambda s, b, h, q, k, sl: (
        s - sl[h] * jnp.abs(q + k).astype(s.dtype)), False, False),
}


@pytest.mark.parametrize("name", sorted(_SPLIT_MODS))
def test_mosaic_split_score_mod_is_the_mod(name):
  """`split_slot` finds the score_mods that are `score + a q_pos + b kv_pos
  + c` (ALiBi's `|q - k|` only in a causal call), and the split the
  kernels compute, the key term `b (kv_pos - ref)` plus the row term
  (`row_terms`) from the rows (`split_rows`), equals the mod on every
  pair a kernel keeps, at positions near a million (float32: as exact as
  the mod's own logits there)."""
  mod, causal_split, plain_split = _SPLIT_MODS[name]
  batch, sq, sk = 2, 128, 96
  slopes = jnp.asarray(fa.alibi_slopes(H))
  q = jnp.zeros((batch, sq, H, 8))
  mods = inputs_lib.canonicalize(q, q, q, score_mod=mod,
                                 mod_args=(slopes,)).mods
  km = mod_lowering.kernel_mods(mods)
  rng = helpers.rng_for("split", name)
  q_pos = jnp.asarray(np.sort(rng.integers(2**20, 2**20 + 4096, (batch, sq)),
                              axis=1), jnp.int32)
  kv_pos = jnp.asarray(rng.integers(2**20, 2**20 + 4096, (batch, sk)),
                       jnp.int32)
  score = jnp.asarray(rng.normal(size=(batch, H, sq, sk)) * 3, jnp.float32)
  idx = mods.indices(batch, H, q_pos, kv_pos)
  want = mod(score, *idx, slopes)
  for causal, split in ((True, causal_split), (False, plain_split)):
    n = mosaic_mod_split.split_slot(km, causal)
    assert (n is not None) == split, (name, causal)
    if n is None:
      continue
    rows = mosaic_mod_split.split_rows(
        km, causal, mods, mosaic_mods.program_rows(km, mods, batch, H),
        batch, H)
    ref = jnp.repeat(q_pos[:, ::mosaic_mod_split.REF_ROWS], mosaic_mod_split.REF_ROWS,
                     axis=1)
    key = rows[0][:, :, n, None, None] * (
        kv_pos[:, None, None, :] - ref[:, None, :, None]).astype(jnp.float32)
    got = score + key + mosaic_mod_split.row_terms(km, causal, rows[0],
                                               q_pos)[..., None]
    kept = (q_pos[:, None, :, None] >= kv_pos[:, None, None, :]
            if causal else True)
    np.testing.assert_allclose(np.where(kept, got, 0.0),
                               np.where(kept, want, 0.0), rtol=1e-6,
                               atol=1e-3)


@pytest.mark.parametrize("mod,unit", [
    (fa.alibi_score_mod, True),
    (lambda s, b, h, q, k, sl: s + sl[h] * (q - k).astype(s.dtype), True),
    (lambda s, b, h, q, k, sl: s * sl[h], False),
    (lambda s, b, h, q, k, sl: 20.0 * jnp.tanh(s / 20.0), False),
    (lambda s, b, h, q, k, sl: s + 0.0 * s, False)])
def test_mosaic_backward_skips_the_unit_derivative_of_additive_mods(mod, unit):
  """An additive score_mod's derivative in the score is 1: the Mosaic
  backward kernels' chain rule skips it (`score_grads` gives `dmod` None),
  and gives every other mod's derivative, equal to `jax.grad`'s."""
  rng = helpers.rng_for("unit-slope")
  s = jnp.asarray(rng.normal(size=(64, 128)) * 3, jnp.float32)
  slopes = jnp.asarray(fa.alibi_slopes(H))
  q = jnp.zeros((1, 64, H, 8))
  mods = inputs_lib.canonicalize(q, q, q, score_mod=mod,
                                 mod_args=(slopes,)).mods
  km = mod_lowering.kernel_mods(mods)
  assert mosaic_mods.unit_slope(km) == unit
  head = 2
  floats, _ = mosaic_mods.program_rows(km, mods, 1, H)
  values = () if floats is None else tuple(
      floats[0, head, :mosaic_mods.plan(km).counts[0]])
  evaluator = mosaic_mods.TileMods(km, (values, ()), s.shape)
  qp = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32)[:, None], s.shape)
  kp = jnp.broadcast_to(jnp.arange(128, dtype=jnp.int32)[None, :], s.shape)
  got, dmod = evaluator.score_grads(s, qp, kp)
  want = jax.vmap(jax.vmap(jax.value_and_grad(
      lambda x, i, j: mod(x, 0, head, i, j, slopes))))(s, qp, kp)
  np.testing.assert_allclose(got, want[0], rtol=1e-6, atol=1e-6)
  if unit:
    assert dmod is None
  else:
    np.testing.assert_allclose(dmod, want[1], rtol=1e-5, atol=1e-6)


ON_HOPPER = 9.0 <= (gpu.compute_capability() or 0.0) < 10.0


def _check_mosaic_forward_mods(name, dq_backend="triton", head_dim=64,
                               hopper=ON_HOPPER, jit=True, sinks=False,
                               lengths=(260, 328), rotate=False):
  """`MOSAIC_MODS[name]` through flash's default launches on a GPU
  (bfloat16, Sq = 260 < Sk = 328: bottom-right positions, padded tiles,
  grouped heads, soft cap; D = `head_dim`): out, lse (-inf rows included)
  and the gradients of q, k, v, the [H] slopes and the [B] scale against
  the float32 reference. On Hopper (`hopper`) the forward and dK/dV
  kernels must be the Mosaic GPU ones (the dK/dV kernel computes the
  slopes' and the scale's gradients), and dQ `dq_backend`'s ("fused":
  the dK/dV kernel's, an explicit launch: the default launches do not
  fuse calls with mods). `jit=False`
  runs flash op by op (`gpu_interpret`'s kernels); `sinks`: with sink
  logits too (fixed; a split score_mod is then evaluated per element in
  the forward, split in the backward); `lengths`: (Sq, Sk); `rotate`: the
  fused launch with `rotate_dq`."""
  rng = helpers.rng_for("mosaic-forward-mods", name, head_dim)
  q, k, v = (x.astype(jnp.bfloat16) for x in helpers.random_qkv(
      rng, B, *lengths, H, HKV, head_dim))
  slopes, scale, prefix = _hopper_mod_args()
  cap = 30.0
  extra = dict(sinks=jnp.linspace(-1.0, 2.0, H)) if sinks else {}
  launch = (dataclasses.replace(flash_kernel.hopper_launch_config(
      head_dim, dq="fused"), rotate_dq=rotate)
            if dq_backend == "fused" else None)
  if hopper:
    assert _backends(_hopper_call(name, q, k, v, (slopes, scale, prefix),
                                  **extra), softcap=cap, launch=launch) == (
                                      "mosaic", "mosaic", dq_backend), name

  def flash(q, k, v, slopes, scale):
    result = flash_kernel.flash_attention(
        _hopper_call(name, q, k, v, (slopes, scale, prefix), **extra),
        sm_scale=0.125, softcap=cap, launch=launch)
    return result.out, result.lse

  def ref(q, k, v, slopes, scale):
    record = _hopper_call(name, q, k, v, (slopes, scale, prefix), **extra)
    result = reference.reference_attention(
        record.query, record.key, record.value, None, record.visibility,
        sm_scale=0.125, softcap=cap, mods=record.mods, sinks=record.sinks)
    return result.out, result.lse

  def value_and_grads(f, *args):
    def loss(*args):
      out, lse = f(*args)
      finite = jnp.where(jnp.isneginf(lse), 0.0, lse)
      return (jnp.sum(out.astype(jnp.float32) * jnp.cos(out)) +
              jnp.sum(jnp.sin(finite)), (out, lse))
    grad_fn = jax.value_and_grad(loss, (0, 1, 2, 3, 4), has_aux=True)
    (_, (out, lse)), grads = (jax.jit(grad_fn) if jit or f is ref else
                              grad_fn)(*args)
    return out, lse, grads

  out, lse, grads = value_and_grads(flash, q, k, v, slopes, scale)
  f32 = lambda x: x.astype(jnp.float32)
  want_out, want_lse, want_grads = value_and_grads(ref, f32(q), f32(k),
                                                   f32(v), slopes, scale)
  what = f"mosaic kernels {name}, D = {head_dim}, dq {dq_backend}"
  helpers.assert_close(out, want_out, jnp.bfloat16, f"{what}: out")
  empty = np.isneginf(np.asarray(want_lse))
  np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty)
  helpers.assert_close(jnp.where(empty, 0.0, lse),
                       jnp.where(empty, 0.0, want_lse), jnp.bfloat16,
                       f"{what}: lse")
  for n, got, want in zip(("dq", "dk", "dv", "dslopes", "dscale"), grads,
                          want_grads):
    helpers.assert_close(got, want, jnp.bfloat16, f"{what}: {n}")


@pytest.mark.skipif(gpu_interpret.UNAVAILABLE is not None and not ON_HOPPER,
                    reason=gpu_interpret.UNAVAILABLE or "")
@pytest.mark.parametrize("lagged", [False, True])
def test_rotated_fused_backward_with_mods_and_sinks(lagged, monkeypatch):
  """`rotate_dq` (the default fused backward's from 16k keys) with ALiBi,
  whose slopes get their gradient in the dK/dV kernel, and sinks: lengths
  in whole tiles and no mask, so each program walks its 4 query tiles from
  its key tile's index; compiled on Hopper, else in JAX's GPU interpreter.
  `lagged`: with `mosaic_bwd_rows.DQ_LAG` and `STAGGER` (each step's dQ a
  step late, the consumers half a step apart: the default), which ALiBi's
  shared memory leaves room for; else the step before."""
  helpers.use_step_schedule(
      monkeypatch, ("DQ_LAG", "STAGGER") if lagged else ())
  chosen, lagged_of = [], mosaic_bwd_rows.lagged
  monkeypatch.setattr(mosaic_bwd_rows, "lagged",
                      lambda *a: chosen.append(lagged_of(*a)) or chosen[-1])
  monkeypatch.setattr(gpu, "compute_capability", lambda: 9.0)
  monkeypatch.setattr(gpu, "core_count", lambda: 3)
  with (contextlib.nullcontext() if ON_HOPPER
        else gpu_interpret.mosaic_on_cpu()):
    _check_mosaic_forward_mods("alibi_full", "fused", 128, hopper=True,
                               jit=ON_HOPPER, sinks=True,
                               lengths=(256, 384), rotate=True)
  assert chosen and all(x == lagged for x in chosen), chosen
