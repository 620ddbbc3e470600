"""`vanilla`: dense XLA attention, the only mechanism that returns weights."""

from __future__ import annotations

import functools

from flexible_attention.core import reference
from flexible_attention.mechanisms import base
from flexible_attention.mechanisms import registry


@registry.register_mechanism("vanilla")
class VanillaAttention(base.AttentionModule):
  """Dense attention: the whole `[B, H, Sq, Sk]` score matrix at once.

  The semantics' dense reference (`core/reference.py`) run at the inputs'
  dtype and the configured precision, differentiated by JAX. Every feature is
  supported, `return_weights=True` included, and float64 (with
  `jax_enable_x64`; computed in float64); memory is O(Sq * Sk).
  """

  capabilities = registry.Capabilities(
      dtypes=("float32", "bfloat16", "float16", "float64"),
      weights=True, sinks=True, score_mod=True, mask_mod=True,
      sharded_sequence=True,
      notes="O(Sq * Sk) memory; the only one returning weights.")

  @classmethod
  def make_kernel(cls, config, request):
    kernel = functools.partial(
        reference.dense_attention, sm_scale=config.scale,
        softcap=config.logits_soft_cap, precision=config.precision,
        softmax_dtype=config.softmax_dtype,
        return_weights="weights" in request.features)
    return lambda inputs, dropout: kernel(
        inputs.query, inputs.key, inputs.value, inputs.bias,
        inputs.visibility, dropout, sinks=inputs.sinks, mods=inputs.mods)
