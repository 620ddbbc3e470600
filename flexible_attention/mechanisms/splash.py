"""`splash`: JAX's block-sparse splash attention (Pallas TPU kernels)."""

from __future__ import annotations

import dataclasses
import functools

from flexible_attention.kernels import splash_tpu
from flexible_attention.mechanisms import base
from flexible_attention.mechanisms import registry


@dataclasses.dataclass(frozen=True)
class SplashConfig(base.InterpretConfig):
  """`splash`'s options: the common ones plus `interpret` (run the Pallas
  TPU kernels in Pallas' interpreter, on any backend; slow: for tests on
  CPU)."""

  def __post_init__(self):
    super().__post_init__()
    splash_tpu.check_block_sizes(self.block_sizes)


@registry.register_mechanism("splash")
class SplashAttention(base.AttentionModule):
  """Splash attention: JAX's block-sparse Pallas TPU kernels.

  The static structure becomes splash's mask objects, from which it skips
  empty tiles and masks partial ones: causal -> `CausalMask`, a sliding
  window -> `LocalMask`, neither -> `FullMask`, all with the library's
  bottom-right alignment as their offset (`Sk - Sq`). Segment ids go to
  splash's `SegmentIds`, kv lengths too (invalid keys get a segment id no
  query has), the soft cap to `attn_logits_soft_cap`; grouped-query and
  multi-query heads are native (K/V are never repeated). Sequences of any
  length are padded inside to whole tiles (multiples of 128). A query that
  sees no key gives zeros (an attention sink below every real logit; see
  `kernels/splash_tpu.py`); the call's own sinks (`sinks=`) are splash's
  native ones, gradient included. Forward and backward are splash's
  kernels.

  Refused with a clear error: bias, dense masks, dropout, returned weights,
  explicit positions and KV caches (splash's masks are static functions of
  the token index), sharding a sequence over the mesh, float16, and
  `precision` (splash has no matmul precision setting).

  Runs on TPU. `interpret=True` runs the same kernels in Pallas' interpreter
  on any backend (slow; for tests on CPU).

  Block sizes (`fa.BlockSizes`, multiples of 128): `block_q`/`block_k` tile
  the forward pass, `block_q_dkv`/`block_k_dkv` the dK/dV pass,
  `block_q_dq`/`block_k_dq` the dQ pass; default: the largest of 512, 256
  and 128 that divides the padded sequence.
  """

  capabilities = registry.Capabilities(
      platforms=("tpu",), dtypes=("float32", "bfloat16"), positions=False,
      mask=False, bias=False, dropout=False, weights=False, lse=False,
      cache=False, precision=False, sinks=True,
      block_size_fields=tuple(splash_tpu.BLOCK_FIELDS),
      notes=("JAX's Pallas TPU splash kernels; tiles of multiples of 128 "
             "(sequences padded inside); CPU only with interpret=True."))

  config_class = SplashConfig

  @classmethod
  def block_size_reason(cls, request):
    # SplashConfig checks them when built; `auto`'s options do not.
    return request.block_size_reason(splash_tpu.BLOCK_FIELDS,
                                     splash_tpu.check_block)

  @classmethod
  def make_kernel(cls, config, request):
    del request
    return functools.partial(
        splash_tpu.splash_attention, sm_scale=config.scale,
        softcap=config.logits_soft_cap, block_sizes=config.block_sizes,
        interpret=config.interpret)
