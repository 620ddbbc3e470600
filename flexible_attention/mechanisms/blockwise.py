"""`blockwise`: memory-efficient pure-JAX attention (online softmax)."""

from __future__ import annotations

import functools

from flexible_attention.kernels import blockwise as blockwise_kernel
from flexible_attention.mechanisms import base
from flexible_attention.mechanisms import registry


@registry.register_mechanism("blockwise")
class BlockwiseAttention(base.AttentionModule):
  """Tiled attention with O(S) memory on every platform.

  Online softmax over `block_q x block_k` tiles with a hand-written backward
  pass (`jax.custom_vjp`) whose residuals are q, k, v, the output and the
  float32 log-sum-exp; tiles that causal / window / segments / kv lengths make
  fully invisible are skipped. Score and mask mods are evaluated per tile
  (the `mod_args` gradients by the score_mod's VJP per tile). Float64
  inputs (with `jax_enable_x64`) are computed in float64. See
  `kernels/blockwise.py`.

  Block sizes (`fa.BlockSizes`): `block_q`, `block_k` tile the forward pass
  (default 512 each, clipped to the sequence lengths); `block_q_dkv`,
  `block_k_dkv` tile the backward pass (default: the forward's).
  """

  capabilities = registry.Capabilities(
      dtypes=("float32", "bfloat16", "float16", "float64"),
      block_size_fields=("block_q", "block_k", "block_q_dkv", "block_k_dkv"),
      sharded_sequence=True, sinks=True, score_mod=True, mask_mod=True,
      notes="O(S) memory; skips fully-masked tiles.")

  @classmethod
  def make_kernel(cls, config, request):
    del request
    tiles = blockwise_kernel.tile_config(
        config.block_sizes, sm_scale=config.scale,
        softcap=config.logits_soft_cap, precision=config.precision)
    return functools.partial(blockwise_kernel.blockwise_attention, tiles)
