"""Every misuse of DESIGN.md's "Bad input" section gets its clear error.

Each test pins the exception type and a message fragment that names the
argument (and, where the contract says so, the expected and actual values):
rank and shape mismatches, a non-boolean mask, `H % Hkv != 0`, a dtype the
mechanism does not support, a feature the mechanism does not support (the
message names those that do), mesh axes that do not exist, sequences, KV
heads or batch not divisible by their mesh axes,
invalid block sizes, dropout without an rng key, unknown mechanism names
(the message lists the valid ones), and misuse of the KV cache. The errors
are raised while tracing, before anything is compiled: every call here runs
under `jax.eval_shape`, which compiles nothing.
"""

from __future__ import annotations

import contextlib
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.mechanisms import base
from flexible_attention.mechanisms import registry
from flexible_attention.mechanisms import vanilla

import helpers

B, SQ, SK, H, HKV, D = 2, 6, 10, 4, 2, 8


def cpu_mesh(*args):
  """`fa.make_mesh` over the 8 CPU devices (tests/conftest.py) on any host."""
  return fa.make_mesh(*args, devices=jax.devices("cpu"))


def qkv(dtype=jnp.float32, batch=B, q_len=SQ, kv_len=SK, heads=H,
        kv_heads=HKV, dim=D):
  return helpers.random_qkv(helpers.rng_for("bad", batch, q_len, kv_len),
                            batch, q_len, kv_len, heads, kv_heads, dim,
                            dtype=dtype)


def attend(q, k, v, mechanism="vanilla", *, rng=None, options=None, **call):
  """Builds and calls a module under `jax.eval_shape` (no compilation)."""
  options = dict(options or {})
  num_heads = options.pop("num_heads", np.shape(q)[2])
  head_dim = options.pop("head_dim", np.shape(q)[3])
  num_kv_heads = options.pop("num_kv_heads", np.shape(k)[2])

  def fn(q, k, v):
    attn = fa.create_attention(mechanism, num_heads=num_heads,
                               head_dim=head_dim, num_kv_heads=num_kv_heads,
                               **options)
    return attn(q, k, v, **call)

  return jax.eval_shape(lambda q, k, v: hk.transform(fn).apply({}, rng, q, k,
                                                                v), q, k, v)


# --- Shapes, ranks and dtypes of q, k, v --------------------------------------


def test_query_of_wrong_rank_is_a_value_error_naming_query():
  q, k, v = qkv()
  with pytest.raises(ValueError,
                     match=r"query must have rank 4 .*\(2, 6, 32\)"):
    fa.canonicalize(q.reshape(B, SQ, H * D), k, v)


def test_key_and_value_of_wrong_rank_are_value_errors():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"key must have rank 4"):
    fa.canonicalize(q, k[0], v)
  with pytest.raises(ValueError, match=r"value must have rank 4"):
    fa.canonicalize(q, k, v[..., None])


def test_non_array_query_is_a_type_error():
  _, k, v = qkv()
  with pytest.raises(TypeError, match=r"query must be an array"):
    fa.canonicalize([[1.0]], k, v)


def test_batch_mismatch_names_the_batch_sizes():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"batch size B, got 2, 1, 1"):
    fa.canonicalize(q, k[:1], v[:1])


def test_key_head_size_must_match_the_query():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"key head size must equal the query's "
                     r"D = 8"):
    fa.canonicalize(q, k[..., :4], v)


def test_value_must_match_key_length_and_heads():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"value must be \[B, Sk, Hkv, Dv\]"):
    fa.canonicalize(q, k, v[:, :5])


def test_heads_not_a_multiple_of_kv_heads_is_a_value_error():
  q, _, _ = qkv()
  _, k, v = qkv(kv_heads=3)
  with pytest.raises(ValueError,
                     match=r"H = 4 must be a multiple of .*Hkv = 3"):
    fa.canonicalize(q, k, v)
  with pytest.raises(ValueError, match=r"num_heads = 4 must be a multiple of "
                     r"num_kv_heads = 3"):
    attend(q, k, v, options=dict(num_kv_heads=3))


def test_integer_or_mixed_dtypes_are_type_errors():
  q, k, v = qkv()
  with pytest.raises(TypeError, match=r"query must be a floating array"):
    fa.canonicalize(q.astype(jnp.int32), k, v)
  with pytest.raises(TypeError, match=r"share a dtype.*float32, bfloat16"):
    fa.canonicalize(q, k.astype(jnp.bfloat16), v)


def test_inputs_not_matching_the_module_sizes_are_value_errors():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"built for H \(query heads\) = 8, "
                     r"the inputs have 4"):
    attend(q, k, v, options=dict(num_heads=8, num_kv_heads=2))
  with pytest.raises(ValueError, match=r"built for D \(head size\) = 16"):
    attend(q, k, v, options=dict(head_dim=16))


# --- Masks, bias and the structured inputs ------------------------------------


def test_non_boolean_mask_is_a_type_error_pointing_to_bias():
  q, k, v = qkv()
  with pytest.raises(TypeError, match=r"mask must be boolean.*float32.*bias"):
    attend(q, k, v, mask=jnp.zeros((SQ, SK)))


def test_mask_not_broadcastable_names_the_axis():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"mask must be broadcastable to "
                     r"\[B, H, Sq, Sk\] = \(2, 4, 6, 10\).*axis 3 is 9"):
    attend(q, k, v, mask=jnp.ones((SQ, 9), bool))
  with pytest.raises(ValueError, match=r"mask must be broadcastable.*rank 5"):
    attend(q, k, v, mask=jnp.ones((1, B, H, SQ, SK), bool))


def test_bad_bias_dtype_and_shape():
  q, k, v = qkv()
  with pytest.raises(TypeError, match=r"bias must be a floating array"):
    attend(q, k, v, bias=jnp.ones((SQ, SK), jnp.int32))
  with pytest.raises(ValueError, match=r"bias must be broadcastable.*axis 1 "
                     r"is 3"):
    attend(q, k, v, bias=jnp.ones((B, 3, SQ, SK)))


def test_bad_segment_ids():
  q, k, v = qkv()
  ids = jnp.zeros((B, SQ), jnp.int32)
  with pytest.raises(ValueError, match=r"single segment_ids array needs "
                     r"Sq == Sk"):
    attend(q, k, v, segment_ids=ids)
  with pytest.raises(ValueError, match=r"segment_ids \(keys\) must have shape "
                     r"\[B, Sk\] = \(2, 10\), got \(2, 6\)"):
    attend(q, k, v, segment_ids=(ids, ids))
  with pytest.raises(TypeError, match=r"segment_ids \(queries\) must be an "
                     r"integer array"):
    attend(q, k, v, segment_ids=(ids.astype(jnp.float32),
                                 jnp.zeros((B, SK), jnp.int32)))
  with pytest.raises(ValueError, match=r"segment_ids must be one \[B, S\] "
                     r"array or a \(q_ids, kv_ids\) pair, got 3 items"):
    attend(q, k, v, segment_ids=(ids, ids, ids))


def test_bad_kv_lengths_and_positions():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"kv_lengths must have shape \[B\]"):
    attend(q, k, v, kv_lengths=jnp.ones((B, 1), jnp.int32))
  with pytest.raises(TypeError, match=r"kv_lengths must be an integer"):
    attend(q, k, v, kv_lengths=jnp.ones((B,)))
  with pytest.raises(ValueError, match=r"q_positions must have shape "
                     r"\[B, Sq\]"):
    attend(q, k, v, q_positions=jnp.zeros((B, SK), jnp.int32))
  with pytest.raises(TypeError, match=r"kv_positions must be an integer"):
    attend(q, k, v, kv_positions=jnp.zeros((B, SK)))


def test_bad_causal_and_window():
  q, k, v = qkv()
  with pytest.raises(TypeError, match=r"causal must be a python bool"):
    attend(q, k, v, causal=1)
  with pytest.raises(TypeError, match=r"sliding_window must be an int or a "
                     r"\(left, right\) pair"):
    attend(q, k, v, options=dict(sliding_window=(1, 2, 3)))
  with pytest.raises(ValueError, match=r"sliding_window sizes must be >= 0"):
    attend(q, k, v, options=dict(sliding_window=(-1, 2)))


BAD_OPTIONS = [
    ("dropout_rate", 1.0, ValueError, r"dropout_rate must be in \[0, 1\)"),
    ("dropout_rate", -0.1, ValueError, r"dropout_rate must be in \[0, 1\)"),
    ("sm_scale", -1.0, ValueError, r"sm_scale must be a finite positive"),
    ("sm_scale", float("inf"), ValueError, r"sm_scale must be a finite"),
    ("sm_scale", float("nan"), ValueError, r"sm_scale must be a finite"),
    ("logits_soft_cap", 0.0, ValueError, r"logits_soft_cap must be a finite "
     r"positive"),
    ("logits_soft_cap", float("inf"), ValueError, r"logits_soft_cap must be "
     r"a finite"),
    ("softmax_dtype", jnp.bfloat16, ValueError, r"softmax_dtype must be "
     r"float32"),
    ("dtype", jnp.int32, TypeError, r"dtype must be a floating dtype"),
    ("value_dim", 0, ValueError, r"value_dim must be a positive int"),
    ("num_kv_heads", 3, ValueError, r"num_heads = 4 must be a multiple of "
     r"num_kv_heads = 3"),
    ("sliding_window", (1, 2, 3), TypeError, r"sliding_window must be"),
    ("block_sizes", {"block_q": 16}, TypeError, r"block_sizes must be a "
     r"fa.BlockSizes"),
    ("max_cache_length", 8, ValueError, r"max_cache_length is only used "
     r"with decode=True"),
    ("decode", True, ValueError, r"max_cache_length must be a positive int"),
    ("partition_axis", fa.PartitionAxis(head_axis="model"), ValueError,
     r"partition_axis was given without a mesh"),
]


@pytest.mark.parametrize("option,value,error,match", BAD_OPTIONS)
def test_bad_module_options(option, value, error, match):
  q, k, v = qkv()
  with pytest.raises(error, match=match):
    attend(q, k, v, options={option: value})


@pytest.mark.parametrize("config_class", [
    registry.get_mechanism(m).config_class for m in fa.available_mechanisms()
], ids=fa.available_mechanisms())
@pytest.mark.parametrize("option,value,error,match", BAD_OPTIONS)
def test_configs_built_directly_are_validated_like_modules(
    config_class, option, value, error, match):
  """Every mechanism's config checks the common options itself, with the
  module's errors (a config built by hand is no way around them)."""
  options = dict(num_heads=H, head_dim=D, num_kv_heads=HKV)
  options[option] = value
  with pytest.raises(error, match=match):
    config_class(**options)


@pytest.mark.parametrize("options,error,match", [
    ({"local_mechanism": "ring"}, ValueError,
     r"local_mechanism must attend a whole sequence on one device, not the "
     r"context-parallel 'ring'"),
    ({"local_mechanism": "ulysses"}, ValueError, r"not the context-parallel "
     r"'ulysses'"),
    ({"local_mechanism": "nope"}, ValueError, r"unknown attention mechanism "
     r"'nope'"),
    ({"local_options": {"interpret": True}}, TypeError,
     r"local_options \['interpret'\] are not options of local_mechanism "
     r"'blockwise'; its own options: none"),
    ({"local_mechanism": "flash", "local_options": [1]}, TypeError,
     r"local_options must be a mapping of 'flash''s options"),
    ({"local_mechanism": "flash", "local_options": {"interpret": 1}},
     TypeError, r"interpret must be a bool, got 1"),
])
def test_bad_ulysses_local_mechanism(options, error, match):
  """Its local mechanism's options are checked when the module is built
  (`ulysses` around itself once recursed without end)."""
  with pytest.raises(error, match=match):
    registry.get_mechanism("ulysses").config_class(
        num_heads=H, head_dim=D, num_kv_heads=HKV, **options)


@pytest.mark.parametrize("mechanism", ["flash", "splash", "ring"])
def test_interpret_must_be_a_bool(mechanism):
  config_class = registry.get_mechanism(mechanism).config_class
  with pytest.raises(TypeError, match=r"interpret must be a bool, got 1"):
    config_class(num_heads=H, head_dim=D, num_kv_heads=HKV, interpret=1)


def test_bad_structural_sizes():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"num_heads must be a positive int, "
                     r"got 0"):
    attend(q, k, v, options=dict(num_heads=0))
  with pytest.raises(ValueError, match=r"head_dim must be a positive int"):
    attend(q, k, v, options=dict(head_dim=2.5))


def test_return_weights_must_be_a_bool():
  q, k, v = qkv()
  with pytest.raises(TypeError, match=r"return_weights must be a bool"):
    attend(q, k, v, return_weights=1)


# --- Mechanisms: names, dtypes, features, block sizes -------------------------


def test_unknown_mechanism_lists_the_valid_names():
  q, k, v = qkv()
  pattern = r"unknown attention mechanism 'flashy'; valid names: " + ", ".join(
      fa.available_mechanisms())
  with pytest.raises(ValueError, match=pattern):
    attend(q, k, v, "flashy")
  with pytest.raises(ValueError, match=pattern):
    fa.capabilities("flashy")


def test_unsupported_feature_names_the_mechanisms_that_support_it():
  q, k, v = qkv()
  supporting = registry.mechanisms_supporting("weights")
  assert "vanilla" in supporting and "blockwise" not in supporting
  with pytest.raises(NotImplementedError,
                     match=r"feature 'weights' is not supported by mechanism "
                     r"'blockwise'; mechanisms that support it: " +
                     ", ".join(supporting)):
    attend(q, k, v, "blockwise", return_weights=True)


@contextlib.contextmanager
def float32_only_mechanism():
  """Registers `float32_only` (vanilla's kernel, float32 only) for a test."""

  class Float32Only(base.AttentionModule):
    capabilities = registry.Capabilities(dtypes=("float32",))
    make_kernel = vanilla.VanillaAttention.make_kernel

  registry.register_mechanism("float32_only")(Float32Only)
  try:
    yield "float32_only"
  finally:
    del registry._REGISTRY["float32_only"]  # pylint: disable=protected-access


def test_unsupported_dtype_names_dtype_and_supported_ones():
  with float32_only_mechanism() as name:
    q, k, v = qkv(jnp.bfloat16)
    with pytest.raises(NotImplementedError, match=r"mechanism 'float32_only' "
                       r"supports dtypes float32, not bfloat16"):
      attend(q, k, v, name)
    # The compute dtype option counts, not the inputs' dtype.
    with pytest.raises(NotImplementedError, match=r"not float16"):
      attend(*qkv(), name, options=dict(dtype=jnp.float16))
  assert "float32_only" not in fa.available_mechanisms()


def test_cudnn_refuses_float32_and_other_platforms():
  caps = fa.capabilities("cudnn")
  dims = fa.canonicalize(*qkv()).dims
  request = lambda platform, dtype: fa.AttentionRequest(
      dims=dims, dtype=dtype, platform=platform, features=frozenset())
  assert re.search(r"supports dtypes bfloat16, float16, not float32",
                   registry.unsupported_reason("cudnn",
                                               request("gpu", "float32")))
  assert re.search(r"runs on gpu, not on 'cpu'",
                   registry.unsupported_reason("cudnn",
                                               request("cpu", "bfloat16")))
  assert caps.platforms == ("gpu",)
  q, k, v = qkv(jnp.bfloat16)
  if jax.default_backend() == "gpu":
    with pytest.raises(NotImplementedError, match=r"not float32"):
      attend(*qkv(), "cudnn")
  else:
    with pytest.raises(NotImplementedError,
                       match=rf"not on '{jax.default_backend()}'"):
      attend(q, k, v, "cudnn")


def test_invalid_block_sizes_are_value_errors():
  with pytest.raises(ValueError, match=r"BlockSizes.block_q must be a "
                     r"positive int or None, got 0"):
    fa.BlockSizes(block_q=0)
  with pytest.raises(ValueError, match=r"BlockSizes.block_k must be a "
                     r"positive int or None, got 1.5"):
    fa.BlockSizes(block_k=1.5)
  with pytest.raises(ValueError, match=r"BlockSizes.block_b"):
    fa.BlockSizes(block_b=True)
  q, k, v = qkv()
  with pytest.raises(TypeError, match=r"block_sizes must be a fa.BlockSizes"):
    attend(q, k, v, "blockwise", options=dict(block_sizes={"block_q": 16}))


def test_block_size_field_a_mechanism_does_not_read_is_refused():
  q, k, v = qkv()
  with pytest.raises(NotImplementedError, match=r"BlockSizes fields "
                     r"\['block_q'\] are not read by mechanism 'vanilla' "
                     r"\(it reads: none\)"):
    attend(q, k, v, "vanilla", options=dict(
        block_sizes=fa.BlockSizes(block_q=16)))
  reads = ", ".join(fa.capabilities("blockwise").block_size_fields)
  with pytest.raises(NotImplementedError, match=rf"BlockSizes fields "
                     rf"\['block_b'\] are not read by mechanism 'blockwise' "
                     rf"\(it reads: {reads}\)"):
    attend(q, k, v, "blockwise", options=dict(
        block_sizes=fa.BlockSizes(block_b=1)))


def test_dropout_without_rng_names_the_rng():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"dropout_rate=0.1 with "
                     r"deterministic=False needs a random key"):
    attend(q, k, v, options=dict(dropout_rate=0.1), deterministic=False)


# --- Meshes -------------------------------------------------------------------


def test_partition_axis_naming_a_missing_mesh_axis():
  mesh = cpu_mesh()
  with pytest.raises(ValueError, match=r"partition_axis.head_axis names mesh "
                     r"axis 'model', which the mesh does not have; mesh axes: "
                     r"\('dp', 'fsdp', 'tp', 'sp'\)"):
    attend(*qkv(), options=dict(mesh=mesh, partition_axis=fa.PartitionAxis(
        head_axis="model")))


def test_mesh_and_partition_axis_types():
  with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh"):
    attend(*qkv(), options=dict(mesh="dp"))
  with pytest.raises(ValueError, match=r"partition_axis was given without a "
                     r"mesh"):
    attend(*qkv(), options=dict(partition_axis=fa.PartitionAxis(
        head_axis="model")))


@pytest.mark.parametrize("mechanism", ["vanilla", "ring"])
def test_key_sequence_not_divisible_by_its_mesh_axis(mechanism):
  """Keys the sequence axis does not divide are refused (queries it does
  not divide split the keys instead: tests/test_context_parallel.py)."""
  mesh = cpu_mesh((1, 1, 1, -1))  # 8 sequence shards.
  q, k, v = qkv(q_len=12, kv_len=12)
  with pytest.raises(ValueError, match=r"the key sequence length Sk = 12 is "
                     r"not divisible by the 8 shards of key_sequence_axis "
                     r"'sp'"):
    attend(q, k, v, mechanism, options=dict(mesh=mesh))


def test_sequence_sharding_refusal_names_the_mechanisms_that_do_it():
  supporting = registry.mechanisms_supporting("sharded_sequence")
  refusing = [m for m in fa.available_mechanisms() if m not in supporting]
  assert "cudnn" in refusing and "ring" in supporting
  dims = fa.canonicalize(*qkv(jnp.bfloat16)).dims
  for name in refusing:
    caps = fa.capabilities(name)
    request = fa.AttentionRequest(
        dims=dims, dtype=caps.dtypes[0], platform=caps.platforms[0],
        features=frozenset(), sequence_sharded=True)
    reason = registry.unsupported_reason(name, request)
    assert reason is not None and re.search(
        r"sharding a sequence axis over the mesh is not supported by "
        rf"mechanism '{name}'; mechanisms that support it: " +
        ", ".join(supporting), reason), reason


def test_kv_heads_not_divisible_by_the_head_axis():
  mesh = cpu_mesh((1, 2, 4, 1))
  q, k, v = qkv()  # Hkv = 2 on 4 head shards.
  with pytest.raises(ValueError, match=r"KV heads Hkv = 2 is not divisible "
                     r"by the 4 shards of head_axis 'tp'"):
    attend(q, k, v, options=dict(mesh=mesh))


def test_sharding_the_head_size_is_refused():
  mesh = cpu_mesh((2, 1, 1, 4), ("dp", "fsdp", "tp", "dim"))
  with pytest.raises(NotImplementedError, match=r"attention_dim_axis='dim' "
                     r"shards the head size D"):
    attend(*qkv(), options=dict(mesh=mesh, partition_axis=fa.PartitionAxis(
        attention_dim_axis="dim", query_sequence_axis=None,
        key_sequence_axis=None)))


def test_bad_make_mesh_arguments():
  with pytest.raises(ValueError, match=r"at most one axis may be -1"):
    cpu_mesh((-1, -1, 1, 1))
  with pytest.raises(ValueError, match=r"need 16 devices, there are 8"):
    cpu_mesh((2, 8, 1, 1))
  with pytest.raises(ValueError, match=r"must have the same length"):
    cpu_mesh((1, -1), ("dp", "fsdp", "tp"))


# --- The KV cache -------------------------------------------------------------


def cache_for(q_len=1, length=8, batch=B):
  return fa.init_cache(batch, length, HKV, D)


def test_cache_with_decode_mode_is_ambiguous():
  q, k, v = qkv(q_len=1, kv_len=1)
  with pytest.raises(ValueError, match=r"pass either cache= or build the "
                     r"module with decode=True"):
    attend(q, k, v, options=dict(decode=True, max_cache_length=8),
           cache=cache_for())


@pytest.mark.parametrize("argument", ["kv_lengths", "segment_ids",
                                      "q_positions", "kv_positions"])
def test_cache_defines_positions_and_lengths(argument):
  q, k, v = qkv(q_len=1, kv_len=1)
  value = {"kv_lengths": jnp.ones((B,), jnp.int32)}.get(
      argument, jnp.zeros((B, 1), jnp.int32))
  with pytest.raises(ValueError, match=rf"{argument} cannot be combined with "
                     r"a KV cache"):
    attend(q, k, v, cache=cache_for(), **{argument: value})


def test_cache_of_the_wrong_type_or_shape():
  q, k, v = qkv(q_len=1, kv_len=1)
  with pytest.raises(TypeError, match=r"cache must be a fa.KVCache"):
    attend(q, k, v, cache=(k, v))
  bad = fa.init_cache(B, 8, HKV, 4)
  with pytest.raises(ValueError, match=r"cache.keys must be \[B, L, Hkv, D\] "
                     r"= \(2, 8, 2, 8\), got \(2, 8, 2, 4\)"):
    attend(q, k, v, cache=bad)
  with pytest.raises(ValueError, match=r"cache.lengths must be \[B\]"):
    attend(q, k, v, cache=cache_for()._replace(
        lengths=jnp.zeros((3,), jnp.int32)))
  with pytest.raises(TypeError, match=r"cache.lengths must hold ints, got "
                     r"float32"):
    attend(q, k, v, cache=cache_for()._replace(
        lengths=jnp.zeros((B,), jnp.float32)))
  with pytest.raises(ValueError, match=r"cache.lengths must be >= 0 \(tokens "
                     r"a row holds\), got \[-1, 0\]"):
    attend(q, k, v, cache=cache_for()._replace(
        lengths=jnp.array([-1, 0], jnp.int32)))


def test_cache_needs_as_many_new_keys_as_queries_and_room_for_them():
  q, k, v = qkv(q_len=2, kv_len=3)
  with pytest.raises(ValueError, match=r"query, key and value hold the same "
                     r"new tokens of the same rows: got query \(2, 2, 4, 8\), "
                     r"key \(2, 3, 2, 8\)"):
    attend(q, k, v, cache=cache_for())
  q, k, v = qkv(q_len=9, kv_len=9)
  with pytest.raises(ValueError, match=r"9 new tokens do not fit a cache of "
                     r"length 8"):
    attend(q, k, v, cache=cache_for())


def test_decode_mode_needs_a_cache_length():
  q, k, v = qkv(q_len=1, kv_len=1)
  with pytest.raises(ValueError, match=r"max_cache_length must be a positive "
                     r"int, got None"):
    attend(q, k, v, options=dict(decode=True))
  with pytest.raises(ValueError, match=r"max_cache_length is only used with "
                     r"decode=True"):
    attend(q, k, v, options=dict(max_cache_length=8))


def test_bad_init_cache_arguments():
  with pytest.raises(ValueError, match=r"init_cache: max_length must be a "
                     r"positive int, got 0"):
    fa.init_cache(2, 0, 2, 8)


@pytest.mark.parametrize("mechanism", ["vanilla", "flash", "flash_bias"])
def test_cache_overflow_rows_give_nan_not_a_silent_result(mechanism):
  """Writing past a cache's end cannot raise under jit (lengths are traced):
  the rows that overflow get NaN outputs and lse; the others are unaffected.
  (`flash`'s decode kernel writes the NaN itself; with a bias its general
  kernels serve the call and the NaN follows them.)"""
  cache = fa.init_cache(2, 16, 2, 16)._replace(lengths=jnp.array([1, 15]))
  x = helpers.random_array(helpers.rng_for("overflow"), (2, 2, 2, 16))
  options = dict(interpret=True) if mechanism != "vanilla" else {}
  bias = jnp.zeros((2, 2, 2, 16)) if mechanism == "flash_bias" else None
  attend = hk.transform(lambda x, cache: fa.create_attention(
      mechanism.split("_")[0], num_heads=2, head_dim=16, **options)(
          x, x, x, cache=cache, causal=True, bias=bias, return_lse=True))
  res = jax.jit(attend.apply)({}, None, x, cache)
  out, lse = res.attention_outputs, res.lse
  assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1]))
  assert np.all(np.isfinite(lse[0])) and np.all(np.isnan(lse[1]))


# --- Empty axes, int32 positions, rank ----------------------------------------


@pytest.mark.parametrize("mechanism", ["vanilla", "blockwise", "ring",
                                       "flash", "auto"])
def test_an_empty_batch_or_sequence_is_one_clear_error_everywhere(mechanism):
  """B, Sq or Sk = 0: the same ValueError for every mechanism (H or D = 0
  are refused by the module's sizes)."""
  q, k, v = qkv()
  options = dict(interpret=True) if mechanism == "flash" else {}
  for args, name in (((q[:0], k[:0], v[:0]), "query"),
                     ((q[:, :0], k, v), "query"),
                     ((q, k[:, :0], v[:, :0]), "key")):
    with pytest.raises(ValueError, match=rf"{name} \[B, S.*has an empty "
                       r"axis"):
      attend(*args, mechanism, options=options)


def test_an_empty_query_sequence_is_an_error():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"query \[B, Sq, H, D\] has an empty "
                     r"axis: shape \(2, 0, 4, 8\)"):
    attend(q[:, :0], k, v, "blockwise")


def test_a_rank_3_query_is_a_value_error_everywhere():
  q, k, v = qkv()
  def call(mechanism, **kwargs):
    return hk.transform(lambda: fa.create_attention(
        mechanism, num_heads=H, head_dim=D, num_kv_heads=HKV)(
            q[0], k, v, **kwargs)).init(None)

  for mechanism in ("vanilla", "auto", "ulysses"):
    with pytest.raises(ValueError, match=r"query must have rank 4"):
      call(mechanism)
  with pytest.raises(ValueError, match=r"query must have rank 4"):
    call("vanilla", cache=fa.init_cache(B, SK, HKV, D))
  with pytest.raises(ValueError, match=r"query_sequence_length was given"):
    hk.transform(lambda: fa.FlexibleAttentionModule(
        num_attention_heads=H, head_dims=D)(
            q[0], k, v, query_sequence_length=SQ)).init(None)


@pytest.mark.parametrize("mechanism", ["vanilla", "blockwise"])
def test_windows_at_the_ends_of_int32_positions_saturate(mechanism):
  """`q_pos + right` past int32's end admits every key, as it should,
  instead of wrapping to a negative bound that hides them all."""
  big, small = np.iinfo(np.int32).max, np.iinfo(np.int32).min
  q, k, v = qkv(q_len=4, kv_len=4)
  window = (2**30, 2**30)
  for base_pos in (big - 3, small):
    pos = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32) + base_pos, (B, 4))
    result = helpers.run_mechanism(
        mechanism, q, k, v, call=dict(q_positions=pos, kv_positions=pos),
        options=dict(sliding_window=window))
    expected = helpers.reference_vjp(q, k, v, None).out  # Every key visible.
    helpers.assert_close(result.out, expected, jnp.float32, f"{base_pos}")


def test_the_librarys_own_padding_is_zeros_never_non_finite():
  """Non-finite values in hidden keys' values may reach visible rows (0 x
  NaN; README): the library's own padding never holds any."""
  dense = fa.init_cache(B, 8, HKV, D)
  paged = fa.init_paged_cache(4, 4, HKV, D, batch_size=B, max_pages_per_row=2)
  for array in (dense.keys, dense.values, paged.key_pages, paged.value_pages):
    assert np.all(np.asarray(array) == 0)
  init = hk.transform_with_state(lambda q: fa.create_attention(
      "vanilla", num_heads=H, head_dim=D, num_kv_heads=HKV, decode=True,
      max_cache_length=8)(q, q[:, :, :HKV], q[:, :, :HKV])).init
  # Compiled (op by op, the module's call was dozens of small programs).
  state = jax.jit(init)(None, jnp.ones((B, 1, H, D)))[1]
  for array in jax.tree.leaves(state):
    assert np.all(np.asarray(array) == 0)
