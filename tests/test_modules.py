"""The drop-in modules: `fa.MultiHeadAttention` and `fa.FlexibleAttentionModule`.

`MultiHeadAttention` is checked against `hk.MultiHeadAttention` itself (same
parameters, same outputs and parameter gradients); the facade against the
float32 reference. Tolerances: float32, 2e-5 relative to the largest value.
"""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa

RTOL_F32 = 2e-5
# XLA's backend optimisation level 0 on CPU: faster compiles, same results.
_FAST_COMPILE = ({"xla_backend_optimization_level": 0}
                 if jax.default_backend() == "cpu" else None)


def _jit(fn):
  """`jax.jit` with `_FAST_COMPILE` (one compiled program per call site,
  never op-by-op dispatch)."""
  return jax.jit(fn, compiler_options=_FAST_COMPILE)


def _close(x, ref, rtol=RTOL_F32):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  scale = max(float(np.max(np.abs(ref))), 1e-6)
  np.testing.assert_allclose(x / scale, ref / scale, atol=rtol, rtol=0)


def _embeddings(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _haiku_mha(q, k, v, mask=None):
  return hk.MultiHeadAttention(
      num_heads=4, key_size=8, w_init=hk.initializers.VarianceScaling(1.0),
      value_size=6, model_size=12, name="mha")(q, k, v, mask=mask)


# Haiku's module and its init, jitted once: the tests that initialise it at
# the same shapes share one compiled program.
_HAIKU_MHA = hk.without_apply_rng(hk.transform(_haiku_mha))
_haiku_init = _jit(_HAIKU_MHA.init)


def _our_mha(mechanism, **options):
  def forward(q, k, v, mask=None):
    return fa.MultiHeadAttention(
        num_heads=4, key_size=8, w_init=hk.initializers.VarianceScaling(1.0),
        value_size=6, model_size=12, mechanism=mechanism, name="mha",
        **options)(q, k, v, mask=mask)
  return forward


def test_parameter_tree_matches_haiku():
  rng = np.random.default_rng(0)
  q, kv = _embeddings(rng, 2, 5, 16), _embeddings(rng, 2, 7, 10)
  key = jax.random.PRNGKey(0)
  ours = _jit(hk.transform(_our_mha("vanilla")).init)(key, q, kv, kv)
  theirs = _haiku_init(key, q, kv, kv)
  shapes = lambda p: jax.tree.map(jnp.shape, p)
  assert shapes(ours) == shapes(theirs)
  assert set(ours["mha/query"]) == {"w", "b"}
  # Same names, same initialisation order: checkpoints load unchanged.
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)


@pytest.mark.parametrize("mechanism", ["vanilla", "blockwise", "auto"])
def test_output_and_param_grads_match_haiku(mechanism):
  rng = np.random.default_rng(1)
  # Two leading batch dims, Sq != Sk, a truthy int mask [..., H=1, T, T'].
  q, kv = _embeddings(rng, 2, 3, 5, 16), _embeddings(rng, 2, 3, 7, 10)
  mask = (rng.random((2, 3, 1, 5, 7)) < 0.7).astype(np.int32)
  mask[..., 0] = 1  # No fully masked row: there Haiku averages, we give 0.
  theirs_fn = _HAIKU_MHA
  ours_fn = hk.without_apply_rng(hk.transform(_our_mha(mechanism)))
  params = _haiku_init(jax.random.PRNGKey(2), q, kv, kv, mask)
  ct = _embeddings(rng, 2, 3, 5, 12)

  @_jit
  def outputs_and_grads(params, mask):
    """Both modules' outputs and parameter gradients (one program)."""
    def run(fn):
      loss = lambda p: jnp.sum(fn.apply(p, q, kv, kv, mask) * ct)
      return fn.apply(params, q, kv, kv, mask), jax.grad(loss)(params)
    return run(ours_fn), run(theirs_fn)

  (ours, ours_grads), (theirs, theirs_grads) = outputs_and_grads(
      params, jnp.asarray(mask))
  _close(ours, theirs)
  # One scale for all parameters: the key bias's gradient is zero in exact
  # arithmetic (softmax ignores a per-query constant), so only noise remains.
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(
      theirs_grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, atol=RTOL_F32 * scale, rtol=0), ours_grads, theirs_grads)


def _apply_both(mechanism, *args, **options):
  """(ours, Haiku's) outputs for the same parameters (Haiku's init)."""
  theirs_fn = _HAIKU_MHA
  ours_fn = hk.without_apply_rng(hk.transform(_our_mha(mechanism,
                                                       **options)))
  params = _haiku_init(jax.random.PRNGKey(0), *args)
  both = lambda params, *args: (ours_fn.apply(params, *args),
                                theirs_fn.apply(params, *args))
  return _jit(both)(params, *args)


def test_leading_dims_of_masks_and_keys_broadcast_like_haiku():
  rng = np.random.default_rng(7)
  q = _embeddings(rng, 2, 3, 5, 16)  # [2, 3, T, D]
  kv = _embeddings(rng, 3, 7, 10)  # [3, T', D]: broadcast over the 2.
  mask = rng.random((2, 1, 1, 5, 7)) < 0.7  # [2, 1, 1, T, T']
  mask[..., 0] = True
  ours, theirs = _apply_both("vanilla", q, kv, kv, jnp.asarray(mask))
  assert ours.shape == theirs.shape == (2, 3, 5, 12)
  _close(ours, theirs)


def test_leading_dims_of_a_bias_broadcast():
  rng = np.random.default_rng(8)
  q, kv = _embeddings(rng, 2, 3, 5, 16), _embeddings(rng, 1, 3, 7, 10)
  bias = _embeddings(rng, 2, 1, 1, 5, 7)

  def forward(bias):
    return fa.MultiHeadAttention(
        num_heads=4, key_size=8, w_init=hk.initializers.VarianceScaling(1.0),
        mechanism="vanilla", name="mha")(q, kv, kv, bias=bias)

  fn = hk.without_apply_rng(hk.transform(forward))
  params = _jit(fn.init)(jax.random.PRNGKey(0), bias)
  apply = _jit(fn.apply)
  _close(apply(params, bias),
         apply(params, jnp.broadcast_to(bias, (2, 3, 1, 5, 7))))


def test_leading_dims_that_do_not_broadcast_are_an_error():
  x = jnp.ones((2, 3, 5, 8))
  fn = lambda q, k, m=None: fa.MultiHeadAttention(
      2, 4, w_init=jnp.ones, mechanism="vanilla")(q, k, k, mask=m)
  init = lambda *a: hk.transform(fn).init(jax.random.PRNGKey(0), *a)
  with pytest.raises(ValueError, match=r"leading dimensions of key"):
    init(x, jnp.ones((4, 3, 5, 8)))
  with pytest.raises(ValueError, match=r"leading dimensions of Mask"):
    init(x, x, jnp.ones((3, 3, 1, 5, 5), bool))
  with pytest.raises(ValueError, match=r"query must be"):
    init(jnp.ones((8,)), x)


@pytest.mark.parametrize("mechanism", ["vanilla", "blockwise", "auto"])
def test_float64_is_computed_in_float64_like_haiku(mechanism):
  rng = np.random.default_rng(9)
  with jax.enable_x64(True):
    q = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float64)
    kv = jnp.asarray(rng.standard_normal((2, 7, 10)), jnp.float64)
    ours, theirs = _apply_both(mechanism, q, kv, kv)
    assert ours.dtype == theirs.dtype == jnp.float64
    np.testing.assert_allclose(ours, theirs, rtol=0,
                               atol=1e-12 * float(jnp.max(jnp.abs(theirs))))


def test_float64_is_refused_clearly_where_it_cannot_be_computed():
  with jax.enable_x64(True):
    x = jnp.ones((1, 4, 2, 8), jnp.float64)
    fn = hk.transform(lambda x: fa.create_attention(
        "ring", num_heads=2, head_dim=8)(x, x, x))
    with pytest.raises(NotImplementedError, match="not float64"):
      fn.init(None, x)
  assert "float64" not in fa.capabilities("flash").dtypes
  assert "float64" in fa.capabilities("auto").dtypes


def test_unbatched_inputs_work_like_haiku():
  rng = np.random.default_rng(3)
  q, kv = _embeddings(rng, 5, 16), _embeddings(rng, 7, 10)
  _close(*_apply_both("vanilla", q, kv, kv))


def test_grouped_query_projections_have_kv_head_sizes():
  rng = np.random.default_rng(4)
  q = _embeddings(rng, 2, 5, 16)
  params = jax.eval_shape(hk.transform(_our_mha("vanilla", num_kv_heads=2))
                          .init, jax.random.PRNGKey(0), q, q, q)
  assert params["mha/query"]["w"].shape == (16, 4 * 8)
  assert params["mha/key"]["w"].shape == (16, 2 * 8)
  assert params["mha/value"]["w"].shape == (16, 2 * 6)


def test_mha_requires_an_initializer_and_a_known_mechanism():
  with pytest.raises(ValueError, match="w_init"):
    hk.transform(lambda x: fa.MultiHeadAttention(2, 4)(x, x, x)).init(
        jax.random.PRNGKey(0), jnp.ones((3, 8)))
  with pytest.raises(ValueError, match="valid names"):
    hk.transform(lambda x: fa.MultiHeadAttention(
        2, 4, w_init=jnp.zeros, mechanism="nope")(x, x, x)).init(
            jax.random.PRNGKey(0), jnp.ones((3, 8)))


def test_mha_rejects_a_mask_of_the_wrong_rank():
  x = jnp.ones((2, 3, 8))
  fn = hk.transform(lambda x, m: fa.MultiHeadAttention(
      2, 4, w_init=jnp.ones, mechanism="vanilla")(x, x, x, mask=m))
  with pytest.raises(ValueError, match="dimensionality"):
    fn.init(jax.random.PRNGKey(0), x, jnp.ones((3, 3), bool))


# --- The facade ---------------------------------------------------------------


# One compiled program per configuration (op by op, a call was dozens of
# small ones).
@functools.partial(jax.jit, static_argnames=("causal",),
                   compiler_options=_FAST_COMPILE)
def _reference(q, k, v, **kwargs):
  inputs = fa.canonicalize(q, k, v, **kwargs)
  return fa.reference_attention(inputs.query, inputs.key, inputs.value,
                                inputs.bias, inputs.visibility,
                                sm_scale=q.shape[-1]**-0.5).out


@pytest.mark.parametrize("mechanism", ["vanilla", "blockwise"])
def test_facade_padding_mask_and_bias_match_reference(mechanism):
  rng = np.random.default_rng(5)
  b, s, h, hkv, d = 2, 9, 4, 2, 8
  q = _embeddings(rng, b, s, h, d)
  k, v = _embeddings(rng, b, s, hkv, d), _embeddings(rng, b, s, hkv, d)
  padding = np.ones((b, s), np.int32)
  padding[1, 6:] = 0  # The seed API's [B, Sk] attention_mask.
  bias = _embeddings(rng, 1, h, s, s)

  def forward(q, k, v):
    return fa.FlexibleAttentionModule(
        attn_mechanism=mechanism, num_attention_heads=h, head_dims=d,
        num_key_value_heads=hkv)(
            query_states=q, key_states=k, value_states=v, bias=bias,
            attention_mask=jnp.asarray(padding), causal=True,
            query_sequence_length=s, key_value_sequence_length=s)

  out = _jit(hk.without_apply_rng(hk.transform(forward)).apply)({}, q, k, v)
  assert isinstance(out, fa.AttentionOutput)
  expected = _reference(q, k, v, bias=bias, causal=True,
                        mask=jnp.asarray(padding, bool)[:, None, None, :])
  _close(out.attention_outputs, expected)


def test_facade_checks_sequence_lengths_and_block_sizes():
  q = jnp.ones((1, 4, 2, 8))

  def call(**kwargs):  # Traced only: the checks run while tracing.
    length = kwargs.pop("query_sequence_length", None)
    init = hk.transform(lambda q: fa.FlexibleAttentionModule(
        num_attention_heads=2, head_dims=8, **kwargs)(
            q, q, q, query_sequence_length=length)).init
    return jax.eval_shape(lambda q: init(None, q), q)

  with pytest.raises(ValueError, match="query_sequence_length = 5"):
    call(attn_mechanism="vanilla", query_sequence_length=5)
  with pytest.raises(ValueError, match="BlockSizes.block_b"):
    call(attn_mechanism="vanilla", block_b=0)
  # Tile hints: a mechanism gets the fields it reads (and checks them).
  call(attn_mechanism="blockwise", block_q=2, block_k=2, block_b=1,
       block_k_major=64)
  call(attn_mechanism="vanilla", block_q=64, block_q_dq=64)
  call(attn_mechanism="auto", block_q=3, block_k_major=5)


def test_facade_seed_only_arguments_have_their_documented_meaning():
  rng = np.random.default_rng(6)
  b, s, h, d = 4, 8, 2, 8
  q, k, v = (_embeddings(rng, b, s, h, d) for _ in range(3))
  mesh = fa.make_mesh((2, 2, 1, 2))

  def run(**kwargs):
    fn = hk.transform(lambda q, k, v: fa.FlexibleAttentionModule(
        num_attention_heads=h, head_dims=d, **kwargs)(
            q, k, v, causal=True).attention_outputs)
    return _jit(fn.apply)({}, None, q, k, v)

  expected = _reference(q, k, v, causal=True)
  for mechanism, shard in (("wise_ring", True), ("jax_flash_attn2", False)):
    _close(run(attn_mechanism=mechanism, mesh=mesh,
               partition_axis=fa.PartitionAxis(),
               shard_attention_computation=shard, scan_ring_attention=False,
               force_float32_tpu=True, precision="fastest"), expected)
  # force_float32_tpu acts on TPUs only: a bf16 call stays bf16 elsewhere.
  fn = hk.transform(lambda q: fa.FlexibleAttentionModule(
      attn_mechanism="vanilla", num_attention_heads=h, head_dims=d,
      force_float32_tpu=True)(q, q, q).attention_outputs)
  assert jax.eval_shape(lambda q: fn.apply({}, None, q), q.astype(
      jnp.bfloat16)).dtype == jnp.bfloat16
  with pytest.raises(TypeError, match="scan_ring_attention"):
    run(scan_ring_attention="yes")
  with pytest.raises(TypeError, match="shard_attention_computation"):
    run(shard_attention_computation=1)
  with pytest.raises(ValueError, match="unknown attention mechanism"):
    run(attn_mechanism="flash_attn3")
  # Mechanism options reach the mechanism (and are checked by it).
  with pytest.raises(TypeError, match="unknown options"):
    run(attn_mechanism="vanilla", interpret=True)
  # Precision.DEFAULT is the backend's default, as None; others pass on.
  def precision_of(precision):
    return hk.transform(lambda: fa.FlexibleAttentionModule(
        num_attention_heads=h, head_dims=d,
        precision=precision).options["precision"]).apply({}, None)
  assert precision_of(jax.lax.Precision.DEFAULT) is None
  assert precision_of("highest") == jax.lax.Precision.HIGHEST


def test_facade_test_attentions_reports_every_mechanism():
  report = fa.FlexibleAttentionModule.test_attentions(
      axis_dims=(2, 1, 4, 1), sequence_length=32, num_attention_heads=4,
      head_dims=8, chunk_size=16, repeats=1)
  statuses = {row.mechanism: row.status for row in report.rows}
  assert set(statuses) == set(fa.available_mechanisms())
  assert report.mesh == {"dp": 2, "fsdp": 1, "tp": 4, "sp": 1}
  # chunk_size tiles the mechanisms that read block sizes; the others run
  # untiled. Every row was checked against the reference.
  assert statuses["blockwise"] == statuses["vanilla"] == "ok"
  for row in report.rows:
    if row.status == "ok":
      assert max(row.out_error, row.dq_error, row.dk_error,
                 row.dv_error) < 1e-4
  if jax.default_backend() != "gpu":
    assert statuses["cudnn"].startswith("unsupported: ")
