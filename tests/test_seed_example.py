"""The seed's example (../shared/reference/seed-flexible-attention.md) as a user
would run it: EasyDeL's `FlexibleAttentionModule` example with only the
changes it needs here — the calls wrapped in `hk.transform`, the mask built
with `jnp` instead of flax, a stand-in for EasyDeL's config object, and
reduced sizes (8 CPU devices, so B = 8 over `fsdp = 8`). As in the seed,
`flash` (interpreted on CPU) is compared with the pure-JAX mechanism
(`jax_flash_attn2`, an alias of `blockwise`); both are also checked against
the float32 reference. Tolerance: float32, 1e-5 relative to the largest
reference value (`helpers.TOLERANCES`).
"""

import math
import types

import haiku as hk
import jax
from jax import lax
from jax import numpy as jnp
from jax import random
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention import FlexibleAttentionModule
from flexible_attention import PartitionAxis

import helpers

BATCH_SIZE = len(jax.devices())
NUM_ATTN_HEADS = 4  # The seed: 32.
CONTEXT_LENGTH = 64  # The seed: 8192.
HEAD_DIM = 32  # The seed: 256.
BLOCK = 32  # The seed's config: block_q = block_k = 512.


def _config():
  """What the seed reads from EasyDeL's `EDPretrainedConfig`."""
  return types.SimpleNamespace(
      mesh=fa.make_mesh(axis_dims=(1, -1, 1, 1),
                        axis_names=("dp", "fsdp", "tp", "sp")),
      block_q=BLOCK, block_k=BLOCK, block_b=1, block_k_major=BLOCK,
      block_q_major_dkv=BLOCK, block_k_major_dkv=BLOCK,
      block_k_major_dq=BLOCK, block_k_dkv=BLOCK, block_q_dkv=BLOCK,
      block_q_dq=BLOCK, block_k_dq=BLOCK, shard_attention_computation=True,
      scan_ring_attention=True)


def make_fake_input_data(key, batch_size, num_attention_head, context_length,
                         head_dim):
  kq, kk, kv = random.split(key, 3)
  shape = (batch_size, context_length, num_attention_head, head_dim)
  q = random.normal(kq, shape, dtype=jnp.float32)
  k = random.normal(kk, shape, dtype=jnp.float32)
  v = random.normal(kv, shape, dtype=jnp.float32)

  attention_mask = jnp.ones((batch_size, context_length))
  # flax.linen.attention.make_causal_mask(attention_mask): [B, 1, S, S].
  causal_mask = jnp.broadcast_to(
      jnp.tril(jnp.ones((context_length, context_length), bool)),
      (batch_size, 1, context_length, context_length))
  at_ = jnp.broadcast_to(jnp.expand_dims(attention_mask, axis=(-3, -2)),
                         causal_mask.shape)
  at_ = jnp.logical_and(at_ > 0, causal_mask)  # flax's combine_masks.
  attention_bias = lax.select(
      at_,
      jnp.full(at_.shape, 0.0).astype(jnp.float32),
      jnp.full(at_.shape, jnp.finfo(jnp.float32).min).astype(jnp.float32),
  )
  return q, k, v, attention_mask, causal_mask, attention_bias


def _module(config, attn_mechanism, q, **mechanism_options):
  return FlexibleAttentionModule(
      block_k_major=config.block_k_major,
      block_b=config.block_b,
      block_q=config.block_q,
      block_k=config.block_k,
      block_q_major_dkv=config.block_q_major_dkv,
      block_k_major_dkv=config.block_k_major_dkv,
      block_k_major_dq=config.block_k_major_dq,
      block_k_dkv=config.block_k_dkv,
      block_q_dkv=config.block_q_dkv,
      block_q_dq=config.block_q_dq,
      block_k_dq=config.block_k_dq,
      num_attention_heads=NUM_ATTN_HEADS,
      attention_dropout=0.0,
      head_dims=HEAD_DIM,
      partition_axis=PartitionAxis(
          batch_axis=("dp", "fsdp"),
          query_sequence_axis="sp",
          key_sequence_axis="sp",
          head_axis="tp",
          attention_dim_axis=None
      ),
      shard_attention_computation=config.shard_attention_computation,
      precision=lax.Precision("fastest"),
      force_float32_tpu=True,
      attn_mechanism=attn_mechanism,
      dtype=jnp.float32,
      scan_ring_attention=config.scan_ring_attention,
      mesh=config.mesh,
      sm_scale=1 / math.sqrt(q.shape[-1]),
      **mechanism_options,
  )


@pytest.mark.filterwarnings("ignore:.*mesh.*context manager.*deprecated")
def test_seed_example_runs_and_flash_matches_the_pure_jax_mechanism():
  config = _config()
  q, k, v, _, _, attention_bias = make_fake_input_data(
      random.PRNGKey(42), BATCH_SIZE, NUM_ATTN_HEADS, CONTEXT_LENGTH,
      HEAD_DIM)
  # On CPU the fused kernels run in Pallas' interpreter.
  interpret = jax.default_backend() == "cpu"

  def run(q, k, v, attention_bias):
    flash_attention = _module(config, "flash", q, interpret=interpret)
    normal_attention = _module(config, "jax_flash_attn2", q)
    flash_attn_out = flash_attention(
        query_states=q,
        key_states=k,
        value_states=v,
        bias=attention_bias,
        key_value_sequence_length=CONTEXT_LENGTH,
        query_sequence_length=CONTEXT_LENGTH
    )
    normal_attn_out = normal_attention(
        query_states=q,
        key_states=k,
        value_states=v,
        bias=attention_bias,
        key_value_sequence_length=CONTEXT_LENGTH,
        query_sequence_length=CONTEXT_LENGTH
    )
    return flash_attn_out, normal_attn_out

  fn = hk.without_apply_rng(hk.transform(run))
  with config.mesh:  # As the seed does (deprecated by jax for set_mesh).
    flash_attn_out, normal_attn_out = helpers.jit(fn.apply)(
        {}, q, k, v, attention_bias)

  assert isinstance(flash_attn_out, fa.AttentionOutput)
  flash = flash_attn_out.attention_outputs
  normal = normal_attn_out.attention_outputs
  assert flash.shape == normal.shape == (BATCH_SIZE, CONTEXT_LENGTH,
                                         NUM_ATTN_HEADS, HEAD_DIM)
  assert flash.dtype == normal.dtype == jnp.float32
  expected = helpers.reference_vjp(q, k, v, None, bias=attention_bias).out
  helpers.assert_close(flash, expected, jnp.float32, "flash")
  helpers.assert_close(normal, expected, jnp.float32, "jax_flash_attn2")
  # The seed prints one row's last values of both; they agree.
  np.testing.assert_allclose(
      flash[0, CONTEXT_LENGTH - 5, NUM_ATTN_HEADS - 1, HEAD_DIM - 10:],
      normal[0, CONTEXT_LENGTH - 5, NUM_ATTN_HEADS - 1, HEAD_DIM - 10:],
      atol=1e-5)
  # The causal bias is what it says: the first query sees only key 0.
  np.testing.assert_allclose(normal[:, 0], v[:, 0], atol=1e-6)
