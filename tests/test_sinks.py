"""Learnable attention sinks (semantics step 6): forward and backward.

Every mechanism that declares the `sinks` capability and runs on CPU
(`flash` in Pallas' interpreter, `splash` in its TPU interpreter) is checked
against the float32 reference with sinks (`core/reference.py`): outputs,
log-sum-exps (splash has none) and the gradients of q, k, v and the sinks,
on a causal grouped-query call with dropout whose second batch row sees no
key (it must give zeros, with lse = the sink's logit), on one device and on
meshes of 8 CPU devices (ring, ulysses); `flash`'s decode kernel through a
cache call; `merge_attention` with the sink counted once; the modules'
parameter; the launch policy on Hopper; and the misuse errors. Tolerance:
2e-5 relative to the largest reference entry (everything here is float32).
"""

from __future__ import annotations

import dataclasses
import functools

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
from flexible_attention.kernels.flash import decode as decode_lib
from flexible_attention.mechanisms import registry
import helpers

B, S, H, HKV, D = 2, 16, 4, 2, 16  # D = 16: the decode kernel's least.
TOL = 2e-5
# The CPU mechanisms with sinks and the options they need here.
MECHANISMS = {
    "vanilla": {}, "blockwise": {"block_sizes": fa.BlockSizes(4, 8)},
    "flash": {"interpret": True}, "ring": {}, "ulysses": {},
}
# Row 1 sees no key at all (kv_lengths 0): zeros, lse = the sink.
KV_LENGTHS = jnp.asarray([S - 3, 0], jnp.int32)
# The single-device checks drop probabilities (after the softmax that
# counts the sink) with the library's hash, identical in every mechanism.
DROPOUT_RATE = 0.25
RNG = jax.random.PRNGKey(3)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  # Sinks around the logits' size, so p_sink is neither ~0 nor ~1.
  return arr(B, S, H, D) * 2, arr(B, S, HKV, D), arr(B, S, HKV, D), arr(H)


def _loss(out, lse):
  """A loss that reaches both outputs (so dlse is exercised), with lse
  finite on every row once sinks count."""
  return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.sin(lse))


def _value_and_grads(f, *args):
  """`(out, lse, (dq, dk, dv, dsinks))` of `f(q, k, v, sinks) -> (out,
  lse)` in one compiled function (opt level 0 on CPU: `helpers.jit`)."""

  def loss(*a):
    out, lse = f(*a)
    return _loss(out, lse), (out, lse)

  (_, (out, lse)), grads = helpers.jit(
      jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
  return out, lse, grads


def _reference_fn(q, k, v, sinks, dropout=None):
  record = inputs_lib.canonicalize(q, k, v, causal=True,
                                   kv_lengths=KV_LENGTHS, sinks=sinks)
  result = reference.reference_attention(
      record.query, record.key, record.value, None, record.visibility,
      dropout, sm_scale=D**-0.5, sinks=record.sinks)
  return result.out, result.lse


@functools.lru_cache(maxsize=None)
def _reference(dropout: bool):
  """`(out, lse, (dq, dk, dv, dsinks))` of the float32 reference on
  `_inputs()`, with the modules' dropout or without (computed once)."""
  dropout = helpers.reference_dropout(RNG, DROPOUT_RATE) if dropout else None
  return _value_and_grads(
      lambda *a: _reference_fn(*a, dropout=dropout), *_inputs())


def _module_fn(mechanism, dropout=False, **options):
  """`apply(params, q, k, v, sinks) -> (out, lse)` of a module call, with
  dropout (key `RNG`) or without."""
  def f(q, k, v, sinks):
    attn = fa.create_attention(mechanism, num_heads=H, head_dim=D,
                               num_kv_heads=HKV, dropout_rate=DROPOUT_RATE,
                               **options)
    result = attn(q, k, v, causal=True, kv_lengths=KV_LENGTHS, sinks=sinks,
                  deterministic=not dropout, return_lse=True)
    return result.attention_outputs, result.lse
  apply = hk.transform(f).apply
  return lambda params, *args: apply(params, RNG, *args)


def _check(mechanism, apply, dropout=False):
  q, k, v, sinks = _inputs()
  want_out, want_lse, want_grads = _reference(dropout)
  out, lse, grads = _value_and_grads(lambda *a: apply({}, *a), q, k, v,
                                     sinks)
  assert _rel(out, want_out) < TOL, mechanism
  assert _rel(lse, want_lse) < TOL, mechanism
  # The row that sees no key: zeros, and lse is the sink's logit.
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
  np.testing.assert_allclose(np.asarray(lse[1]),
                             np.broadcast_to(np.asarray(sinks)[:, None],
                                             (H, S)), rtol=1e-6)
  for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads,
                             want_grads):
    assert _rel(got, want) < TOL, (mechanism, name, _rel(got, want))


def test_reference_matches_the_written_formula():
  """The oracle itself: the sink is a key with logit sinks[h], value 0."""
  q, k, v, sinks = _inputs(1)
  out, lse = jax.jit(_reference_fn)(q, k, v, sinks)
  want, want_lse = jax.jit(_written_formula)(q, k, v, sinks)
  assert _rel(out, want) < TOL and _rel(lse, want_lse) < TOL


def _written_formula(q, k, v, sinks):
  kk, vv = (jnp.repeat(x, H // HKV, axis=2) for x in (k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kk,
                 precision="highest") * D**-0.5
  visible = (jnp.tril(jnp.ones((S, S), bool))[None, None] &
             (jnp.arange(S) < KV_LENGTHS[:, None])[:, None, None, :])
  s = jnp.where(visible, s, -jnp.inf)
  with_sink = jnp.concatenate(
      [s, jnp.broadcast_to(sinks[None, :, None, None], (B, H, S, 1))], -1)
  want_lse = jax.nn.logsumexp(with_sink, axis=-1)
  want = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - want_lse[..., None]), vv,
                    precision="highest")
  return want, want_lse


@pytest.mark.parametrize("mechanism", sorted(MECHANISMS))
def test_sinks_match_the_reference(mechanism):
  """Outputs, lse and dq/dk/dv/dsinks of a causal GQA call with dropout
  and a row that sees no key (zeros; lse = the sink)."""
  assert fa.capabilities(mechanism).sinks
  _check(mechanism, _module_fn(mechanism, dropout=True,
                               **MECHANISMS[mechanism]), dropout=True)


@pytest.mark.parametrize("mechanism,dims", [
    # tp = 2 shards the sinks with the heads; dp / fsdp and sp shard the
    # rows whose shares of dsinks shard_map sums.
    ("ring", (2, 1, 2, 2)),
    ("ulysses", (1, 2, 2, 2)),
])
def test_sinks_on_a_mesh(mechanism, dims):
  """Sharded over a mesh of 8 CPU devices (the sinks over the head axis;
  their gradient summed over the batch and sequence shards)."""
  mesh = fa.make_mesh(axis_dims=dims, axis_names=("dp", "fsdp", "tp", "sp"))
  _check(f"{mechanism}{dims}", _module_fn(mechanism, mesh=mesh))


def test_flash_decode_kernel_takes_sinks(monkeypatch):
  """A cache call on flash runs its decode kernel (which merges the sink
  after its key splits); equal to the reference without a cache."""
  served = []
  kernel = decode_lib.decode_attention
  monkeypatch.setattr(decode_lib, "decode_attention",
                      lambda *a, **kw: served.append(1) or kernel(*a, **kw))
  q, k, v, sinks = _inputs(2)
  new = 3

  def f(cache, q, k, v, sinks):
    attn = fa.create_attention("flash", num_heads=H, head_dim=D,
                               num_kv_heads=HKV, interpret=True)
    result = attn(q, k, v, cache=cache, causal=True, sinks=sinks,
                  return_lse=True)
    return result.attention_outputs, result.lse

  apply = hk.without_apply_rng(hk.transform(f)).apply
  cache = fa.init_cache(B, S, HKV, D)
  cache = cache._replace(keys=cache.keys.at[:, :S - new].set(k[:, :S - new]),
                         values=cache.values.at[:, :S - new].set(
                             v[:, :S - new]),
                         lengths=jnp.full((B,), S - new, jnp.int32))
  qn, kn, vn = q[:, -new:], k[:, -new:], v[:, -new:]
  out, lse, grads = _value_and_grads(
      lambda qn, kn, vn, sinks: apply({}, cache, qn, kn, vn, sinks), qn, kn,
      vn, sinks)

  def ref(qn, kn, vn, sinks):
    del kn, vn  # Already in k and v (the reference has no cache).
    rec = inputs_lib.canonicalize(qn, k, v, causal=True, sinks=sinks)
    res = reference.reference_attention(
        rec.query, rec.key, rec.value, None, rec.visibility,
        sm_scale=D**-0.5, sinks=rec.sinks)
    return res.out, res.lse

  want_out, want_lse, want_grads = _value_and_grads(ref, qn, kn, vn, sinks)
  assert served, "the decode kernel did not serve the cache call"
  assert _rel(out, want_out) < TOL and _rel(lse, want_lse) < TOL
  for i in (0, 3):  # dq and dsinks (the new keys' gradients: other tests).
    assert _rel(grads[i], want_grads[i]) < TOL


def test_merge_attention_counts_the_sink_once():
  """A call with sinks over the first keys merged with a call without
  sinks over the rest equals one call with sinks over all of them."""
  q, k, v, sinks = _inputs(3)

  def f(q, k, v, sinks, lengths):
    attn = fa.create_attention("vanilla", num_heads=H, head_dim=D,
                               num_kv_heads=HKV)
    result = attn(q, k, v, kv_lengths=lengths, sinks=sinks, return_lse=True)
    return result.attention_outputs, result.lse

  apply = hk.without_apply_rng(hk.transform(f)).apply
  half = S // 2
  lengths = jnp.full((B,), half, jnp.int32)

  @helpers.jit
  def parts_and_whole(q, k, v, sinks):
    first = apply({}, q, k[:, :half], v[:, :half], sinks, lengths)
    second = apply({}, q, k[:, half:], v[:, half:], None, lengths)
    whole = apply({}, q, k, v, sinks, lengths * 2)
    return fa.merge_attention((first[0], second[0]),
                              (first[1], second[1])), whole

  (out, lse), whole = parts_and_whole(q, k, v, sinks)
  assert _rel(out, whole[0]) < TOL and _rel(lse, whole[1]) < TOL


def test_sinks_of_the_wrong_shape_or_dtype_raise():
  q, k, v, sinks = _inputs()
  apply = _module_fn("vanilla")  # Raises before it draws a key.
  with pytest.raises(ValueError, match=r"sinks must have shape \[H\] = \(4,\)"):
    apply({}, q, k, v, sinks[:3])
  with pytest.raises(ValueError, match=r"sinks must have shape"):
    apply({}, q, k, v, sinks[None])
  with pytest.raises(TypeError, match="sinks must be a floating array"):
    apply({}, q, k, v, jnp.zeros((H,), jnp.int32))
  with pytest.raises(TypeError, match="sinks must be a float array"):
    apply({}, q, k, v, [0.0] * H)


@pytest.mark.parametrize("mechanism,platform", [("cudnn", "gpu"),
                                                ("flash", "tpu")])
def test_mechanisms_without_sinks_refuse_them(mechanism, platform):
  """cuDNN and flash's TPU kernel refuse sinks, naming the feature and the
  mechanisms that have it."""
  assert not fa.capabilities(mechanism, platform).sinks
  request = registry.AttentionRequest(
      dims=inputs_lib.AttentionDims(B, S, S, H, H, 64, 64), dtype="bfloat16",
      platform=platform, features=frozenset({"sinks"}))
  reason = registry.unsupported_reason(mechanism, request)
  assert reason is not None and "'sinks'" in reason and "vanilla" in reason


def test_splash_native_sinks():
  """splash (in Pallas' TPU interpreter) runs the call's sinks through its
  own: output and dq/dk/dv/dsinks match the reference (splash returns no
  lse, so the loss reads the output only)."""
  q, k, v, sinks = _inputs()

  def f(q, k, v, sinks):
    attn = fa.create_attention("splash", num_heads=H, head_dim=D,
                               num_kv_heads=HKV, interpret=True)
    out = attn(q, k, v, causal=True, kv_lengths=KV_LENGTHS,
               sinks=sinks).attention_outputs
    return out, jnp.zeros((B, H, S))  # No lse: a constant for `_loss`.

  apply = hk.without_apply_rng(hk.transform(f)).apply
  out, _, grads = _value_and_grads(lambda *a: apply({}, *a), q, k, v, sinks)
  want_out, _, want_grads = _value_and_grads(
      lambda *a: (_reference_fn(*a)[0], jnp.zeros((B, H, S))), q, k, v,
      sinks)
  assert _rel(out, want_out) < TOL
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
  for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads,
                             want_grads):
    assert _rel(got, want) < TOL, (name, _rel(got, want))


def test_auto_picks_a_mechanism_with_sinks():
  q, k, v, sinks = _inputs()
  chosen = []

  def f(q, k, v, sinks):
    attn = fa.create_attention("auto", num_heads=H, head_dim=D,
                               num_kv_heads=HKV)
    out = attn(q, k, v, causal=True, sinks=sinks).attention_outputs
    chosen.append(attn.selected_mechanism)
    return out

  # Traced only: auto chooses while tracing.
  jax.eval_shape(hk.without_apply_rng(hk.transform(f)).apply, {}, q, k, v,
                 sinks)
  assert chosen and fa.capabilities(chosen[0]).sinks


def test_modules_learn_sinks():
  """`fa.MultiHeadAttention(..., sinks=True)` and the facade own an `[H]`
  parameter "sinks" (zeros at init) that reaches the attention and gets a
  gradient; without it the parameter trees are unchanged."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(B, S, 8)), jnp.float32)
  q, k, v, _ = _inputs(4)

  def mha(x, sinks):
    return fa.MultiHeadAttention(H, D, w_init=hk.initializers.VarianceScaling(
        1.0), mechanism="vanilla", sinks=sinks)(x, x, x)

  def facade(q, k, v, sinks):
    return fa.FlexibleAttentionModule(
        num_attention_heads=H, head_dims=D, num_key_value_heads=HKV,
        attn_mechanism="blockwise", sinks=sinks)(
            q, k, v, causal=True).attention_outputs

  for fn, args in ((mha, (x,)), (facade, (q, k, v))):
    with_sinks = hk.without_apply_rng(hk.transform(
        lambda *a, fn=fn: fn(*a, True)))
    key = jax.random.PRNGKey(0)
    params = helpers.jit(with_sinks.init)(key, *args)
    plain = jax.eval_shape(hk.without_apply_rng(hk.transform(
        lambda *a, fn=fn: fn(*a, False))).init, key, *args)
    sink_params = [(m, n) for m, ps in params.items() for n in ps
                   if n == "sinks"]
    assert len(sink_params) == 1 and all(
        n != "sinks" for ps in plain.values() for n in ps)
    module = sink_params[0][0]
    np.testing.assert_array_equal(params[module]["sinks"], np.zeros(H))

    @helpers.jit
    def grads_and_big(params, args=args, module=module):
      grads = jax.grad(lambda p: jnp.sum(with_sinks.apply(p, *args)**2))(
          params)
      # A large sink takes nearly all the attention: the output shrinks.
      big = {m: dict(ps) for m, ps in params.items()}
      big[module]["sinks"] = jnp.full((H,), 30.0)
      return grads, with_sinks.apply(big, *args), with_sinks.apply(params,
                                                                  *args)

    grads, big_out, out = grads_and_big(params)
    assert np.all(np.asarray(grads[module]["sinks"]) != 0)
    assert np.abs(big_out).max() < 1e-3 * np.abs(out).max() + 1e-3


def test_calls_with_sinks_take_the_mosaic_kernels_on_hopper(monkeypatch):
  """The Mosaic GPU forward folds sinks into its softmax (checked against
  the reference on a GPU below): on Hopper calls with sinks take the same
  Mosaic forward and dK/dV kernels as calls without (the backward reads
  only the lse), and `fwd_backend="triton"` still asks for Triton's."""
  monkeypatch.setattr(gpu, "compute_capability", lambda: 9.0)
  q = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
  record = inputs_lib.canonicalize(q, q, q, sinks=jnp.zeros((2,)))

  def launch_of(record, **options):  # Traced only: no kernel runs.
    launches = []
    jax.eval_shape(lambda r: launches.append(flash_kernel.prepare(
        r, sm_scale=0.1, **options).static.launch), record)
    return launches[0]

  launch = launch_of(record)
  assert (launch.fwd_backend, launch.dkv_backend) == ("mosaic", "mosaic")
  plain = launch_of(dataclasses.replace(record, sinks=None))
  assert launch == plain
  triton = dataclasses.replace(
      plain, fwd=flash_kernel.default_launch_config(128, False, 9.0).fwd,
      fwd_backend="triton")
  assert launch_of(record, launch=triton).fwd_backend == "triton"


def _mosaic_sinks_case():
  """A bf16 causal GQA call whose second row sees no key, with sinks, and
  the Hopper launches with the Mosaic forward and dK/dV kernels."""
  rng = np.random.default_rng(11)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  b, s, h, hkv, d = 2, 300, 4, 2, 128
  args = (arr(b, s, h, d), arr(b, s, hkv, d), arr(b, s, hkv, d),
          jnp.asarray(rng.normal(size=h), jnp.float32))
  launch = dataclasses.replace(
      flash_kernel.default_launch_config(d, True, 9.0),
      fwd=flash_kernel.mosaic_launch(d), fwd_backend="mosaic",
      dkv=flash_kernel.mosaic_dkv_launch(d), dkv_backend="mosaic")

  def flash(q, k, v, sinks):
    record = inputs_lib.canonicalize(
        q, k, v, causal=True, sinks=sinks,
        kv_lengths=jnp.asarray([s - 7, 0], jnp.int32))
    if q.dtype == jnp.float32:  # The reference.
      return reference.reference_attention(
          record.query, record.key, record.value, None, record.visibility,
          sm_scale=d**-0.5, sinks=record.sinks)[:2]
    return flash_kernel.flash_attention(record, sm_scale=d**-0.5,
                                        launch=launch)[:2]
  return flash, args


def test_mosaic_forward_with_sinks_lowers_for_cuda():
  """The Mosaic forward with sinks, and the backward's Mosaic dK/dV,
  lower for CUDA: two Mosaic GPU kernels, the Triton dQ beside them."""
  flash, args = _mosaic_sinks_case()

  def loss(*a):
    return _loss(*(x.astype(jnp.float32) for x in flash(*a)))

  text = helpers.lower_for_cuda(jax.grad(loss, (0, 1, 2, 3)), *args)
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 2, text[:2000]


@pytest.mark.skipif(not 9.0 <= (gpu.compute_capability() or 0) < 10.0,
                    reason="runs on an sm_90 GPU")
def test_mosaic_forward_with_sinks_matches_the_reference_on_a_gpu():
  """Compiled on Hopper: out, lse and the gradients of q, k, v and the
  sinks against the float32 reference (bf16 tolerance 2e-2)."""
  flash, args = _mosaic_sinks_case()
  got = _value_and_grads(flash, *args)
  want = _value_and_grads(flash, *(x.astype(jnp.float32) for x in args))
  for name, g, w in zip(("out", "lse"), got[:2], want[:2]):
    assert _rel(g, w) < 2e-2, name
  for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got[2], want[2]):
    assert _rel(g, w) < 2e-2, name