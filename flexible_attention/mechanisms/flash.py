"""`flash`: the project's own fused Pallas kernels (Triton on GPU)."""

from __future__ import annotations

import dataclasses
import functools

from flexible_attention.kernels import flash_triton
from flexible_attention.mechanisms import base
from flexible_attention.mechanisms import registry

_BLOCK_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv",
                 "block_q_dq", "block_k_dq")


@registry.register_mechanism("flash")
class FlashAttention(base.AttentionModule):
  """Fused flash attention: Pallas kernels lowered through Triton.

  Forward and backward (FlashAttention-2: a dK/dV kernel over key tiles and
  a dQ kernel over query tiles) are Pallas kernels wrapped in a
  `jax.custom_vjp` whose residuals are q, k, v, the output and the float32
  log-sum-exp. Every feature of the semantics is evaluated inside the
  kernels from position / segment / key-validity vectors (causal, sliding
  window, segment ids, kv lengths, explicit positions, KV caches), with
  fully invisible tiles skipped; grouped-query heads read their KV head
  through the launch's index maps (K/V are never repeated); soft cap, bias
  (and its gradient), a dense mask when one is passed, and dropout with the
  library's hash (bit-identical to `vanilla`). Any Sq, Sk and head sizes up
  to 256 (padded inside). See `kernels/flash_triton.py`.

  Runs on GPU. `interpret=True` runs the same kernels in Pallas' interpreter
  on any backend (slow; for tests on CPU).

  Block sizes (`fa.BlockSizes`, powers of two >= 16): `block_q`/`block_k`
  tile the forward pass, `block_q_dkv`/`block_k_dkv` the dK/dV kernel,
  `block_q_dq`/`block_k_dq` the dQ kernel; defaults depend on the head size
  (`flash_triton.default_launch_config`).
  """

  capabilities = registry.Capabilities(
      platforms=("gpu",), weights=False, block_size_fields=_BLOCK_FIELDS,
      notes=("Pallas/Triton fused kernels; D, Dv <= 256; CPU/TPU only with "
             "interpret=True."))

  # Whether `make_kernel` builds the interpreted kernels (see
  # `_InterpretedFlashAttention`).
  interpret = False

  def __init__(self, num_heads: int, head_dim: int, *,
               interpret: bool = False, **options):
    """Initialises the module.

    Args:
      num_heads: H.
      head_dim: D.
      interpret: run the Pallas kernels in interpret mode (any backend;
        for tests on CPU).
      **options: the common options of `fa.AttentionModule`.
    """
    super().__init__(num_heads, head_dim, **options)
    if not isinstance(interpret, bool):
      raise TypeError(f"interpret must be a bool, got {interpret!r}.")
    for field in _BLOCK_FIELDS:
      flash_triton.check_block_size(field,
                                    getattr(self.config.block_sizes, field))
    self.interpret = interpret
    if interpret:
      # The base class asks `self.resolve(request)` which class serves a
      # call; an interpreted module answers with the interpreted variant,
      # whose capabilities admit every platform. (An instance attribute, so
      # the class-level `resolve` of the registry stays untouched.)
      self.resolve = lambda request: _InterpretedFlashAttention

  @classmethod
  def unsupported_reason(cls, request):
    reason = super().unsupported_reason(request)
    if reason is not None:
      return reason
    dims = request.dims
    if max(dims.head_dim, dims.value_dim) > flash_triton.MAX_HEAD_DIM:
      return (f"mechanism 'flash' supports head sizes up to "
              f"{flash_triton.MAX_HEAD_DIM}, got D = {dims.head_dim}, "
              f"Dv = {dims.value_dim}.")
    return None

  @classmethod
  def make_kernel(cls, config, request):
    del request
    return functools.partial(
        flash_triton.flash_attention, sm_scale=config.scale,
        softcap=config.logits_soft_cap, precision=config.precision,
        block_sizes=config.block_sizes, interpret=cls.interpret)


class _InterpretedFlashAttention(FlashAttention):
  """`flash` with `interpret=True`: the same kernels, interpreted, anywhere.

  Not registered: `create_attention("flash", ..., interpret=True)` builds a
  `FlashAttention` whose `resolve` returns this class.
  """

  capabilities = dataclasses.replace(FlashAttention.capabilities,
                                     platforms=("cpu", "gpu", "tpu"))
  interpret = True
