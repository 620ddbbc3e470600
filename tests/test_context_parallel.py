"""Context parallelism: the sequence sharded over meshes of 8 CPU devices.

Every mechanism that can shard the sequence (capability `sharded_sequence`)
runs with `sp` in {2, 4, 8}, mixed with dp / fsdp / tp, on the features of
the semantics; outputs and dq/dk/dv must match the unsharded float32
reference within the float32 tolerance (1e-5 relative). To keep compile
time down, one program checks several features (the structured masks and
grouped heads together; a non-causal call, a user-permuted layout and
dropout apart) and the cases cycle the meshes over them (each mechanism
sees every mesh and every feature, not their full product; `ring[flash]`,
whose interpreted kernels cost most, runs its features on sp2, and causal
rings of 4 in the ring-size and bfloat16 tests).
"""

import contextlib
import io
import math
import re

import haiku as hk
import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.sharding import mesh as mesh_lib
from flexible_attention.sharding import shard
import helpers

# (dp, fsdp, tp, sp) over the 8 devices.
MESHES = {"sp2": (2, 1, 2, 2), "sp4": (1, 2, 1, 4), "sp8": (1, 1, 1, 8)}
BATCH, SEQ, HEADS, DIM = 2, 32, 8, 8
# "masks": causal, a sliding window, segment ids, kv lengths and grouped
# heads in one call (each would change the output on its own).
FEATURES = ("plain", "masks", "permuted", "dropout")


def _sequence_mechanisms():
  return [m for m in fa.available_mechanisms()
          if fa.capabilities(m).sharded_sequence and
          jax.default_backend() in fa.capabilities(m).platforms and
          m != "auto"]


# Variants of a mechanism run as their own cases: `ring` with the fused
# flash block kernel, and `ulysses` around `flash` (interpreted off GPU).
_INTERPRET = jax.default_backend() != "gpu"
VARIANTS = {
    "ring[flash]": ("ring", {"block_kernel": "flash",
                             "interpret": _INTERPRET}),
    "ulysses[flash]": ("ulysses", {"local_mechanism": "flash",
                                   "local_options": {
                                       "interpret": _INTERPRET}}),
}


def _case(feature: str, rng, num_shards: int):
  """`(kv_heads, call, options, permute)` of a feature."""
  call, options, kv_heads, permute = {"causal": True}, {}, HEADS, None
  if feature == "plain":
    call = {}
  elif feature == "masks":
    options = {"sliding_window": 5}
    ids = np.sort(rng.integers(0, 4, (BATCH, SEQ)), axis=1).astype(np.int32)
    call["segment_ids"] = jnp.asarray(ids)
    call["kv_lengths"] = jnp.asarray([SEQ - 3, 7], jnp.int32)
    kv_heads = 2
  elif feature == "permuted":
    # The user permutes once (zigzag) and passes the permuted positions.
    positions = np.broadcast_to(
        fa.sequence_positions("zigzag", SEQ, num_shards), (BATCH, SEQ))
    call["q_positions"] = call["kv_positions"] = jnp.asarray(positions)
    permute = "zigzag"
  elif feature == "dropout":
    options = {"dropout_rate": 0.25}
    call["deterministic"] = False
  return kv_heads, call, options, permute


def _mesh(mechanism: str, i: int, feature: str) -> str:
  """The mesh of a mechanism's `i`-th feature: the meshes in turn.

  `ring[flash]`'s interpreted kernels are traced once but compiled once per
  ring step (a program takes ~3 s on sp2, ~4 s on sp4, ~8 s on sp8): its
  features run on sp2 (the ring's steps are the same code at any size); its
  causal ring of 4 devices is checked against the reference (and one
  device) by `test_ring_gradient_error_does_not_grow_with_ring_size`, which
  runs the ring of 8 with the blockwise block kernel, and in bfloat16 by
  `test_bfloat16_ring_error_no_worse_than_its_dense_block_kernel`.
  """
  del feature
  if mechanism in VARIANTS:
    return "sp2"
  return list(MESHES)[i % len(MESHES)]


def _cases():
  cases = []
  for mechanism in _sequence_mechanisms() + list(VARIANTS):
    for i, feature in enumerate(FEATURES):
      mesh = _mesh(mechanism, i, feature)
      cases.append(pytest.param(mechanism, feature, mesh,
                                id=f"{mechanism}-{feature}-{mesh}"))
  return cases


@pytest.mark.parametrize("mechanism,feature,mesh_name", _cases())
def test_sequence_sharded_matches_unsharded_reference(mechanism, feature,
                                                      mesh_name):
  dims = MESHES[mesh_name]
  num_shards = dims[3]
  rng = helpers.rng_for("cp", mechanism, feature, mesh_name)
  kv_heads, call, options, permute = _case(feature, rng, num_shards)
  q, k, v = helpers.random_qkv(rng, BATCH, SEQ, SEQ, HEADS, kv_heads, DIM)
  ct = helpers.random_array(rng, q.shape)
  apply_rng = jax.random.PRNGKey(7)
  dropout = None
  if "dropout_rate" in options:
    dropout = helpers.reference_dropout(apply_rng, options["dropout_rate"])
  expected = helpers.reference_vjp(
      q, k, v, ct, call={**call, "q_positions": None, "kv_positions": None},
      sliding_window=options.get("sliding_window"), dropout=dropout)
  if mechanism in VARIANTS:
    mechanism, variant_options = VARIANTS[mechanism]
    options.update(variant_options)
  elif mechanism == "ring":
    options["block_sizes"] = fa.BlockSizes(block_q=4, block_k=4)
  if mechanism == "ring" and permute:
    options["layout"] = "contiguous"  # Already balanced by the user.
  options["mesh"] = fa.make_mesh(dims)
  if mechanism == "ulysses" and (HEADS // dims[2]) % math.lcm(
      kv_heads // dims[2], num_shards):
    with pytest.raises(ValueError, match="must divide the query heads"):
      helpers.run_mechanism(mechanism, q, k, v, ct, call=call,
                            options=options, rng=apply_rng)
    return
  permuted = lambda x: x if permute is None else fa.permute_sequence(
      x, permute, num_shards)
  result = helpers.run_mechanism(
      mechanism, permuted(q), permuted(k), permuted(v), permuted(ct),
      call=call, options=options, rng=apply_rng)
  natural = lambda x: x if permute is None else np.asarray(
      fa.unpermute_sequence(x, permute, num_shards))
  result = helpers.MechanismResult(
      out=natural(result.out), grads=tuple(natural(g) for g in result.grads),
      weights=None, dtype=result.dtype)
  helpers.assert_matches_reference(result, expected.out, expected.grads,
                                   f"{mechanism} {feature} on {mesh_name}")


# Per block kernel of the ring: the ring's options and the single-device
# mechanism running the same kernel.
BLOCK_KERNELS = {
    "blockwise": ({"block_sizes": fa.BlockSizes(block_q=8, block_k=8)},
                  "blockwise"),
    "flash": ({"block_kernel": "flash", **VARIANTS["ring[flash]"][1]},
              "flash"),
}


def _block_kernel_options(block_kernel):
  options, mechanism = BLOCK_KERNELS[block_kernel]
  single = {k: v for k, v in options.items() if k != "block_kernel"}
  return dict(options), mechanism, single


def _ring_errors(dtype, num_shards_list, block_kernel="blockwise"):
  """Relative errors (output, max grad) of ring per ring size."""
  rng = helpers.rng_for("ring-size", str(dtype))
  q, k, v = helpers.random_qkv(rng, 1, 64, 64, 4, 4, 16, dtype=dtype)
  ct = helpers.random_array(rng, q.shape, dtype)
  expected = helpers.reference_vjp(q, k, v, ct, call={"causal": True})
  errors = {}
  for n in num_shards_list:
    options = _block_kernel_options(block_kernel)[0]
    if n > 1:
      options["mesh"] = fa.make_mesh((1, 1, 1, n))
    result = helpers.run_mechanism("ring", q, k, v, ct, call={"causal": True},
                                   options=options)
    errors[n] = (helpers.relative_error(result.out, expected.out),
                 max(helpers.relative_error(g, e)
                     for g, e in zip(result.grads, expected.grads)))
  return errors, (q, k, v, ct, expected)


# The ring sizes per block kernel. The ring's steps (unrolled, one per
# device) and the merge of their outputs and log-sum-exps are the ring's own
# code, whichever block kernel runs a step: the blockwise kernel runs rings
# of 4 and 8 (growth with n would show on two sizes); the interpreted flash
# kernels, whose ring of 8 costs a program of 8 s, the ring of 4 (the same
# steps, unrolled 4 times).
RING_SIZES = {"blockwise": (1, 4, 8), "flash": (1, 4)}


@pytest.mark.parametrize("block_kernel", sorted(BLOCK_KERNELS))
def test_ring_gradient_error_does_not_grow_with_ring_size(block_kernel):
  errors, _ = _ring_errors(jnp.float32, RING_SIZES[block_kernel],
                           block_kernel)
  # Rounding of float32 sums scatters by a few times between programs at
  # this size (jax 0.11.2, flash blocks: 4.0e-7 on one device, 1.8e-6 on a
  # ring of 4, 8.0e-7 on 8), hence the floor; drift would grow with n.
  single = max(errors[1][1], 1e-6)
  for n, (out_error, grad_error) in errors.items():
    assert out_error <= helpers.tolerance(jnp.float32)
    # Merging through the float32 log-sum-exp adds rounding, not drift.
    assert grad_error <= 4 * single, errors


@pytest.mark.parametrize("block_kernel", sorted(BLOCK_KERNELS))
def test_bfloat16_ring_error_no_worse_than_its_dense_block_kernel(
    block_kernel):
  """The ring adds no error in bfloat16 to the kernel it runs per block.

  (Like FlashAttention, that kernel's backward uses the bfloat16 output in
  rowsum(dO * O); its bfloat16 dK error measured up to ~3x vanilla's, whose
  autodiff backward runs in float32. Both stay within the bfloat16
  tolerance.)
  """
  errors, (q, k, v, ct, expected) = _ring_errors(jnp.bfloat16, (4,),
                                                 block_kernel)
  _, mechanism, single = _block_kernel_options(block_kernel)
  dense = helpers.run_mechanism(mechanism, q, k, v, ct, call={"causal": True},
                                options=single)
  dense_out = helpers.relative_error(dense.out, expected.out)
  dense_grad = max(helpers.relative_error(g, e)
                   for g, e in zip(dense.grads, expected.grads))
  ring_out, ring_grad = errors[4]
  assert ring_out <= 1.1 * dense_out, (ring_out, dense_out)
  assert ring_grad <= 1.1 * dense_grad, (ring_grad, dense_grad)
  assert max(ring_out, ring_grad) <= helpers.tolerance(jnp.bfloat16)


@pytest.mark.parametrize("block_kernel", sorted(BLOCK_KERNELS))
def test_ring_saves_only_qkv_output_and_logsumexp(block_kernel):
  mesh = fa.make_mesh((1, 1, 1, 4))
  q, k, v = helpers.random_qkv(helpers.rng_for("ring-res"), 1, 32, 32, 4, 2,
                               8)
  options = _block_kernel_options(block_kernel)[0]
  attend = hk.without_apply_rng(hk.transform(
      lambda q, k, v: fa.create_attention(
          "ring", num_heads=4, head_dim=8, num_kv_heads=2, mesh=mesh,
          layout="contiguous", **options)(
              q, k, v, causal=True).attention_outputs))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ad_checkpoint.print_saved_residuals(
        lambda q, k, v: attend.apply({}, q, k, v), q, k, v)
  floats = []
  for line in out.getvalue().splitlines():
    match = re.match(r"(\w+)\[([\d,]*)\]", line.strip())
    if match and match.group(1).startswith(("f", "bf")):
      floats.append(tuple(int(n) for n in match.group(2).split(",") if n))
  # q, k, v, the output (global shapes) and the float32 log-sum-exp (one
  # [B, H, S / n] block per device, stacked): nothing of size S x S.
  assert sorted(floats) == sorted([(1, 32, 4, 8), (1, 32, 2, 8),
                                   (1, 32, 2, 8), (1, 32, 4, 8),
                                   (4 * 1, 4, 32 // 4)]), floats


def _ring_step_efficiency(layout: str, seq: int, num_shards: int) -> float:
  """Useful causal work / (devices x sum over ring steps of the busiest).

  Devices move in lockstep: each ring step lasts as long as the device with
  the most visible pairs in its (query shard x key block) tile.
  """
  positions = fa.sequence_positions(layout, seq, num_shards).reshape(
      num_shards, -1)
  work = np.zeros((num_shards, num_shards))
  for device in range(num_shards):
    for step in range(num_shards):
      block = (device - step) % num_shards
      work[step, device] = np.sum(
          positions[block][None, :] <= positions[device][:, None])
  return work.sum() / (num_shards * work.max(axis=1).sum())


@pytest.mark.parametrize("num_shards", [2, 4, 8])
def test_zigzag_balances_causal_ring_work(num_shards):
  zigzag = _ring_step_efficiency("zigzag", 4096, num_shards)
  contiguous = _ring_step_efficiency("contiguous", 4096, num_shards)
  assert zigzag >= 0.9, zigzag
  assert contiguous <= 0.5 + 0.5 / num_shards, contiguous


def test_layout_round_trip_and_positions():
  x = np.arange(2 * 48).reshape(2, 48)
  for layout in fa.LAYOUTS:
    permuted = fa.permute_sequence(x, layout, 4)
    np.testing.assert_array_equal(fa.unpermute_sequence(permuted, layout, 4),
                                  x)
    np.testing.assert_array_equal(permuted[0],
                                  fa.sequence_positions(layout, 48, 4))
  # Zigzag: shard 0 holds the first and the last of 8 chunks.
  shard0 = fa.sequence_positions("zigzag", 48, 4)[:12]
  np.testing.assert_array_equal(shard0, list(range(6)) + list(range(42, 48)))


def test_sequence_not_divisible_by_its_axis_is_a_clear_error():
  q, k, v = helpers.random_qkv(helpers.rng_for("div"), 1, 30, 30, 8, 8, 8)
  mesh = fa.make_mesh((1, 1, 1, 8))
  with pytest.raises(ValueError, match="Sk = 30 is not divisible by the 8"):
    helpers.call_mechanism("blockwise", q, k, v, options={"mesh": mesh})
  with pytest.raises(ValueError, match="divisible by 8"):  # 2n zigzag chunks
    helpers.call_mechanism("ring", q[:, :28], k[:, :28], v[:, :28],
                           options={"mesh": fa.make_mesh((1, 1, 1, 4))},
                           causal=True)


# Every mechanism splits the keys over a sequence axis that does not divide
# the queries: (mechanism, options to run on CPU) per case.
SPLIT_KEYS = {"vanilla": ("vanilla", {}), "blockwise": ("blockwise", {}),
              "flash": ("flash", {"interpret": _INTERPRET}),
              "ring": ("ring", {}), "ulysses": ("ulysses", {}), **VARIANTS}


@pytest.mark.parametrize("case", sorted(SPLIT_KEYS))
def test_queries_the_sequence_axis_does_not_divide_split_the_keys(case):
  """Sq = 3 against Sk = 16 on sp = 4 (and tp = 2): every device attends
  all the queries to its key shard, the shards merged by their lse (the
  sinks once): out, lse and the gradients of q, k, v and the sinks equal the
  reference's, with a window, kv lengths, grouped heads and dropout."""
  rng = helpers.rng_for("split keys", case)
  q, k, v = helpers.random_qkv(rng, 2, 3, 16, 4, 2, 16)
  sinks = helpers.random_array(rng, (4,))
  ct = helpers.random_array(rng, q.shape)
  call = {"causal": True, "kv_lengths": jnp.asarray([16, 9], jnp.int32)}
  apply_rng = jax.random.PRNGKey(5)
  mechanism, options = SPLIT_KEYS[case]
  options = dict(options, mesh=fa.make_mesh((1, 1, 2, 4)),
                 sliding_window=6, dropout_rate=0.2)

  def loss(q, k, v, sinks):
    def attend(q, k, v, sinks):
      attention = fa.create_attention(mechanism, num_heads=4, head_dim=16,
                                      num_kv_heads=2, **options)
      return attention(q, k, v, sinks=sinks, return_lse=True,
                       deterministic=False, **call)
    result = hk.transform(attend).apply({}, apply_rng, q, k, v, sinks)
    return (jnp.sum(result.attention_outputs * ct),
            (result.attention_outputs, result.lse))

  grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3),
                                       has_aux=True))(q, k, v, sinks)
  dropout = helpers.reference_dropout(apply_rng, 0.2)

  def reference(q, k, v, sinks):
    inputs = fa.canonicalize(q, k, v, sliding_window=6, **call)
    result = fa.reference_attention(
        inputs.query, inputs.key, inputs.value, None, inputs.visibility,
        dropout, sm_scale=16**-0.5, sinks=sinks)
    return jnp.sum(result.out * ct), (result.out, result.lse)

  want_grads, (want_out, want_lse) = jax.jit(jax.grad(
      reference, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, sinks)
  helpers.assert_close(out, want_out, jnp.float32, "out")
  helpers.assert_close(lse, want_lse, jnp.float32, "lse")
  for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, want_grads):
    helpers.assert_close(got, want, jnp.float32, name)


def test_indivisible_queries_with_unsharded_keys_are_replicated():
  """A query sequence axis that does not divide Sq, and no key sequence
  axis: every device computes the whole call (nothing to merge); out and
  the gradients of q, k, v equal the reference's."""
  rng = helpers.rng_for("no kv axis")
  q, k, v = helpers.random_qkv(rng, 2, 3, 16, 4, 2, 16)
  ct = helpers.random_array(rng, q.shape)
  call = {"causal": True}
  result = helpers.run_mechanism(
      "vanilla", q, k, v, ct, call=call, options={
          "mesh": fa.make_mesh((1, 1, 1, 4)),
          "partition_axis": fa.PartitionAxis(key_sequence_axis=None)})
  expected = helpers.reference_vjp(q, k, v, ct, call=call)
  helpers.assert_matches_reference(result, expected.out, expected.grads,
                                   "replicated queries")


def test_split_keys_return_the_whole_softmax_weights():
  """vanilla's weights on split keys: each device's shard rescaled from its
  own normaliser to the whole's (sinks included)."""
  rng = helpers.rng_for("split keys weights")
  q, k, v = helpers.random_qkv(rng, 2, 3, 16, 4, 2, 16)
  sinks = helpers.random_array(rng, (4,))
  call = {"causal": True, "kv_lengths": jnp.asarray([16, 9], jnp.int32)}

  def weights(q, k, v, sinks):
    attention = fa.create_attention(
        "vanilla", num_heads=4, head_dim=16, num_kv_heads=2,
        mesh=fa.make_mesh((1, 1, 2, 4)), sliding_window=6)
    return attention(q, k, v, sinks=sinks, return_weights=True,
                     **call).attention_weights

  got = jax.jit(hk.transform(weights).apply)({}, None, q, k, v, sinks)
  inputs = fa.canonicalize(q, k, v, sliding_window=6, **call)
  want = fa.reference_attention(
      inputs.query, inputs.key, inputs.value, None, inputs.visibility,
      sm_scale=16**-0.5, sinks=sinks, return_weights=True).weights
  helpers.assert_close(got, want, jnp.float32, "weights")


@pytest.mark.parametrize("case", sorted(SPLIT_KEYS))
@pytest.mark.parametrize("kind", ["dense", "paged"])
def test_decoding_on_a_sequence_mesh_reads_the_cache_in_shards(case, kind):
  """A prefill of 5 tokens then a step of one on sp = 4 (neither divisible
  by it: the cache's 16 slots split over the devices, 4 each) with a
  sliding window equals the full causal forward, outputs and the gradients
  of q, k, v through both steps. Queries before a shard and shards past a
  row's length see none of its keys; flash (and ring and ulysses around
  it) serves the shards with its decode kernel, counting from each shard's
  first slot."""
  rng = helpers.rng_for("decode on sp", case, kind)
  mechanism, options = SPLIT_KEYS[case]
  q, k, v = helpers.random_qkv(rng, 2, 6, 6, 4, 2, 16)
  ct = helpers.random_array(rng, q.shape)
  if kind == "dense":
    cache = fa.init_cache(2, 16, 2, 16)
  else:
    cache = fa.init_paged_cache(9, 4, 2, 16, batch_size=2,
                                max_pages_per_row=4)
    cache = cache._replace(page_table=jnp.asarray(
        [[3, 7, 0, 5], [8, 1, 6, 2]], jnp.int32))
  mesh = fa.make_mesh((1, 1, 1, 4))

  def steps(q, k, v, cache):
    attention = fa.create_attention(mechanism, num_heads=4, head_dim=16,
                                    num_kv_heads=2, mesh=mesh,
                                    sliding_window=3, **options)
    first = attention(q[:, :5], k[:, :5], v[:, :5], cache=cache,
                      causal=True)
    second = attention(q[:, 5:], k[:, 5:], v[:, 5:], cache=first.cache,
                       causal=True)
    return jnp.concatenate([first.attention_outputs,
                            second.attention_outputs], axis=1)

  apply = hk.transform(steps).apply
  if case in ("flash", "ring[flash]", "ulysses[flash]"):
    jaxpr = str(jax.make_jaxpr(apply)({}, None, q, k, v, cache))
    assert "flash_decode" in jaxpr and "flash_forward" not in jaxpr

  def loss(q, k, v):
    out = apply({}, None, q, k, v, cache)
    return jnp.sum(out * ct), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(
      q, k, v)
  want = helpers.reference_vjp(q, k, v, ct, call={"causal": True},
                               sliding_window=3)
  helpers.assert_close(out, want.out, jnp.float32, f"{case} {kind}")
  for name, got, expected in zip(("dq", "dk", "dv"), grads, want.grads):
    helpers.assert_close(got, expected, jnp.float32, f"{case} {name}")


@pytest.mark.parametrize("sp", [2, 4])
def test_one_token_on_a_sequence_mesh_writes_only_its_slot(sp):
  """B = 1, one new token at slot 9 of a dense cache whose 16 slots the mesh
  splits: the returned cache is the old one with that slot written, every
  other shard unchanged, jitted and differentiated (XLA rewrote the write's
  one-update scatter into one that put another slot's token into the last
  slot of each shard before 9's: `cache_lib.write`); the output and the
  gradients of q, k, v are the reference's over the row's 10 tokens."""
  rng = helpers.rng_for("one token", sp)
  q, k, v = helpers.random_qkv(rng, 1, 1, 1, 4, 2, 8)
  ct = helpers.random_array(rng, q.shape)
  keys, values = (helpers.random_array(rng, (1, 16, 2, 8)) for _ in "kv")
  cache = fa.KVCache(keys, values, jnp.asarray([9], jnp.int32))
  mesh = fa.make_mesh((1, 1, 1, sp))

  def step(q, k, v):
    attention = fa.create_attention("vanilla", num_heads=4, head_dim=8,
                                    num_kv_heads=2, mesh=mesh)
    result = attention(q, k, v, cache=cache, causal=True)
    return jnp.sum(result.attention_outputs * ct), (result.attention_outputs,
                                                    result.cache)

  loss = lambda *args: hk.transform(step).apply({}, None, *args)
  want = helpers.reference_vjp(
      q, jnp.concatenate([keys[:, :9], k], 1),
      jnp.concatenate([values[:, :9], v], 1), ct, call={"causal": True})
  _, (out, new) = jax.jit(loss)(q, k, v)
  grads, (_, new_in_grad) = jax.jit(jax.grad(loss, argnums=(0, 1, 2),
                                             has_aux=True))(q, k, v)
  for new in (new, new_in_grad):
    np.testing.assert_array_equal(new.keys, keys.at[0, 9].set(k[0, 0]))
    np.testing.assert_array_equal(new.values, values.at[0, 9].set(v[0, 0]))
    np.testing.assert_array_equal(new.lengths, [10])
  helpers.assert_close(out, want.out, jnp.float32, "out")
  dq, dk, dv = want.grads
  for name, got, expected in zip(("dq", "dk", "dv"), grads,
                                 (dq, dk[:, 9:], dv[:, 9:])):
    helpers.assert_close(got, expected, jnp.float32, name)


def test_ring_refuses_a_dense_bias_naming_who_supports_it():
  q, k, v = helpers.random_qkv(helpers.rng_for("bias"), 1, 16, 16, 4, 4, 8)
  with pytest.raises(NotImplementedError, match="'bias' is not supported by "
                     "mechanism 'ring'.*blockwise"):
    helpers.call_mechanism("ring", q, k, v, bias=jnp.zeros((1, 4, 16, 16)))


@pytest.mark.parametrize("mechanism", ["ring", "ulysses"])
def test_query_and_key_sequences_must_share_one_mesh_axis(mechanism):
  q, k, v = helpers.random_qkv(helpers.rng_for("axes"), 1, 16, 16, 4, 4, 8)
  mesh = fa.make_mesh((1, 1, 2, 4), devices=jax.devices("cpu"))
  axes = fa.PartitionAxis(batch_axis=None, head_axis=None,
                          query_sequence_axis="sp", key_sequence_axis="tp")
  with pytest.raises(NotImplementedError, match=(
      rf"{mechanism}: the query and key sequences must be sharded over the "
      r"same mesh axis, got query_sequence_axis='sp', "
      r"key_sequence_axis='tp'")):
    helpers.call_mechanism(mechanism, q, k, v,
                           options=dict(mesh=mesh, partition_axis=axes))


def test_axis_names_as_partition_spec_entries():
  entries = {None: None, (): None, "sp": "sp", ("sp",): "sp",
             ("dp", "fsdp"): ("dp", "fsdp")}
  for axes, entry in entries.items():
    assert mesh_lib.spec_entry(axes) == entry


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="CPU/TPU only")
def test_ring_flash_block_kernel_runs_on_gpu_or_interpreted():
  q, k, v = helpers.random_qkv(helpers.rng_for("ring-flash"), 1, 16, 16, 4,
                               4, 8)
  with pytest.raises(NotImplementedError, match="runs on gpu"):
    helpers.call_mechanism("ring", q, k, v,
                           options={"block_kernel": "flash"})
  with pytest.raises(ValueError, match="interpret=True applies to "
                     "block_kernel='flash'"):
    helpers.call_mechanism("ring", q, k, v, options={"interpret": True})
  with pytest.raises(NotImplementedError, match=r"\['block_q_dq'\] are not "
                     "read by mechanism 'ring'"):
    helpers.call_mechanism(
        "ring", q, k, v, options={"block_kernel": "flash", "interpret": True,
                                  "block_sizes": fa.BlockSizes(block_q_dq=16)})
  with pytest.raises(ValueError, match="power of two"):
    helpers.call_mechanism(
        "ring", q, k, v, options={"block_kernel": "flash", "interpret": True,
                                  "block_sizes": fa.BlockSizes(block_q=24)})
  with pytest.raises(ValueError, match="block_kernel must be one of"):
    helpers.call_mechanism("ring", q, k, v, options={"block_kernel": "cudnn"})


def _ring_program(compiled: bool, num_shards: int) -> str:
  devices = jax.devices()[:num_shards]
  mesh = fa.make_mesh((1, 1, 1, num_shards), devices=devices)
  q = jnp.ones((1, 64 * num_shards, 4, 16), jnp.bfloat16)
  attend = hk.without_apply_rng(hk.transform(
      lambda q, k, v: fa.create_attention(
          "ring", num_heads=4, head_dim=16, mesh=mesh, layout="contiguous")(
              q, k, v, causal=True).attention_outputs))
  lowered = jax.jit(attend.apply).lower({}, q, q, q)
  return lowered.compile().as_text() if compiled else lowered.as_text()


def test_ring_issues_the_next_transfer_before_the_current_block():
  """In the program the ring emits, each step's K/V (and mask parts)
  `collective_permute` for the next step precedes that step's block compute
  (`case`, the skip-or-attend conditional): XLA can run the transfer while
  the block computes. The last step sends nothing."""
  text = _ring_program(compiled=False, num_shards=4)
  # The ring's own ops, at the nesting depth of its first transfer (newer
  # jax inlines the block kernel's inner conditionals into the case
  # regions, older jax outlines them into functions).
  ops, depth = [], 0
  for line in text.splitlines():
    found = re.search(r"stablehlo\.(collective_permute|case)", line)
    if found:
      ops.append((depth, "P" if found.group(1) == "collective_permute"
                  else "C"))
    depth += line.count("({") - line.count("})")
  ring_depth = next(d for d, op in ops if op == "P")
  program = "".join(op for d, op in ops if d == ring_depth)
  # The forward ring comes first: per step, the transfer of k, v, kv
  # positions and kv indices (P x 4), then the block (C); 4 steps.
  assert program.startswith("PPPPC" * 3 + "C"), program


@pytest.mark.skipif(jax.default_backend() != "gpu" or jax.device_count() < 2,
                    reason="async collectives are a GPU compile")
def test_ring_transfer_is_asynchronous_around_the_block_on_gpu():
  """On GPUs XLA turns the ring's collective-permutes into start/done pairs;
  the block's compute is scheduled between them."""
  text = _ring_program(compiled=True, num_shards=2)
  starts = [m.start() for m in re.finditer(r"collective-permute-start", text)]
  dones = [m.start() for m in re.finditer(r"collective-permute-done", text)]
  assert starts and dones, "no asynchronous collective-permute"
  between = text[starts[0]:dones[0]]
  assert re.search(r"conditional|fusion|custom-call", between), between[:2000]


# --- Any batch on any mesh ----------------------------------------------------


def test_a_batch_the_batch_axes_do_not_divide_is_sharded_where_it_can():
  """B = 2 on dp = 2, fsdp = 4: sharded over dp, replicated over fsdp;
  dropout stays that of the unsharded call."""
  mesh = fa.make_mesh((2, 4, 1, 1))
  assert fa.PartitionAxis().batch_axis == ("dp", "fsdp")
  assert shard.batch_axes(mesh, fa.PartitionAxis(), 2) == ("dp",)
  assert shard.batch_axes(mesh, fa.PartitionAxis(), 4) == ("dp",)
  assert shard.batch_axes(mesh, fa.PartitionAxis(), 1) is None
  assert shard.batch_axes(mesh, fa.PartitionAxis(), 16) == ("dp", "fsdp")
  rng = helpers.rng_for("batch-on-mesh")
  q, k, v = helpers.random_qkv(rng, 2, 8, 8, 2, 2, 8)
  ct = helpers.random_array(rng, q.shape)
  apply_rng = jax.random.PRNGKey(3)
  dropout = helpers.reference_dropout(apply_rng, 0.25)
  call = {"causal": True, "deterministic": False}
  expected = helpers.reference_vjp(q, k, v, ct, call=call, dropout=dropout)
  result = helpers.run_mechanism(
      "vanilla", q, k, v, ct, call=call, rng=apply_rng,
      options={"mesh": mesh, "dropout_rate": 0.25})
  helpers.assert_matches_reference(result, expected.out, expected.grads,
                                   "B = 2 on dp = 2, fsdp = 4")


def test_decoding_one_row_on_a_data_parallel_mesh():
  mesh = fa.make_mesh((1, 8, 1, 1))
  rng = helpers.rng_for("decode-on-mesh")
  q, k, v = helpers.random_qkv(rng, 1, 3, 3, 4, 2, 8)

  def step(q, k, v):
    attention = fa.create_attention("blockwise", num_heads=4, head_dim=8,
                                    num_kv_heads=2, mesh=mesh)
    cache = fa.init_cache(1, 8, 2, 8)
    prefill = attention(q[:, :2], k[:, :2], v[:, :2], cache=cache)
    return attention(q[:, 2:], k[:, 2:], v[:, 2:],
                     cache=prefill.cache).attention_outputs

  out = jax.jit(hk.transform(step).apply)({}, None, q, k, v)
  expected = helpers.reference_vjp(q, k, v, None, call={"causal": True}).out
  helpers.assert_close(out, expected[:, 2:], jnp.float32, "decode B = 1")
