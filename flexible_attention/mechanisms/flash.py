"""`flash`: the project's own fused Pallas kernels (Triton on GPU)."""

from __future__ import annotations

import dataclasses
import functools

from flexible_attention.kernels import flash_tpu
from flexible_attention.kernels import flash as flash_kernel
from flexible_attention.kernels import ragged_paged_tpu
from flexible_attention.mechanisms import base
from flexible_attention.mechanisms import registry

BLOCK_FIELDS = flash_kernel.TILE_FIELDS


@dataclasses.dataclass(frozen=True)
class FlashConfig(base.InterpretConfig):
  """`flash`'s options: the common ones plus `interpret` and `launch`.

  Attributes:
    interpret: run the Triton kernels in Pallas' interpreter (any backend;
      slow: for tests on CPU).
    launch: the Triton launches in full (`fa.FlashLaunchConfig`: tiles,
      warps and pipeline stages of the forward, dK/dV and dQ kernels, and
      `atomic_dq`, the one-kernel backward), replacing the defaults of
      `flash_kernel.default_launch_config`; None keeps them (with the
      tiles of `block_sizes`, if any). Setting both `launch` and flash's
      `block_sizes` fields is an error. Not read by the TPU kernel, which
      refuses it.
  """

  launch: flash_kernel.LaunchConfig | None = None

  def __post_init__(self):
    super().__post_init__()
    for field in BLOCK_FIELDS:
      _check_block_size(field, getattr(self.block_sizes, field))
    if self.launch is not None:
      flash_kernel.check_launch_config(self.launch, self.block_sizes)


def _check_block_size(field: str, value: int | None):
  """Raises the Triton kernels' `ValueError` for a tile size that neither
  flash's Triton kernels nor its TPU kernel can use (which one runs is known
  per call: `FlashAttention.block_size_reason`)."""
  if flash_tpu.check_block(field, value) is not None:
    flash_kernel.check_block_size(field, value)


# On TPU (without `interpret`) flash runs JAX's Pallas TPU flash kernel
# (`kernels/flash_tpu.py`), which computes fewer features, and serves KV-cache
# calls with JAX's ragged paged attention kernel (`kernels/ragged_paged_tpu.py`)
# under its own record, `TPU_CACHE_CAPABILITIES` (`capabilities_for`).
TPU_CAPABILITIES = registry.Capabilities(
    platforms=("tpu",), dtypes=("float32", "bfloat16"), window=False,
    positions=False, mask=False, softcap=False, dropout=False, weights=False,
    lse=False, cache=True, precision=False, block_size_fields=BLOCK_FIELDS,
    notes=("JAX's Pallas TPU flash kernel: causal only with Sq == Sk, "
           "grouped heads only without causal, no launch=; tiles of "
           "multiples of 128. KV-cache calls: JAX's ragged paged attention "
           "kernel (flash.TPU_CACHE_CAPABILITIES: causal, window, soft cap, "
           "GQA; no lse; forward only; a fused copy of the K/V pool per "
           "call)."))

# A cache call on TPU (the positions and kv lengths are the cache's):
# JAX's ragged paged attention kernel.
TPU_CACHE_CAPABILITIES = registry.Capabilities(
    platforms=("tpu",), dtypes=("float32", "bfloat16"), segments=False,
    mask=False, bias=False, dropout=False, weights=False, lse=False,
    precision=False, block_size_fields=ragged_paged_tpu.BLOCK_FIELDS,
    notes=("JAX's Pallas TPU ragged paged attention kernel, for KV-cache "
           "calls: a non-causal window only with one new token; Hkv that "
           "the kernel tiles; forward only; K/V pools fused (copied) per "
           "call."))


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
  (and its gradient), a dense mask when one is passed, dropout with the
  library's hash (bit-identical to `vanilla`), sinks, and `score_mod` /
  `mask_mod` evaluated per tile in the Triton kernels
  (`kernels/flash/mod_lowering.py`: mods that index `mod_args` by point
  gathers and use primitives Triton lowers; gradients to float `mod_args`
  leaves of at most H elements, larger ones refused). Any Sq, Sk and head sizes up
  to 256 (padded inside). See `kernels/flash/`.

  Runs on GPU. On Hopper (sm_90) the forward and dK/dV kernels of the calls
  they serve run through Mosaic GPU kernels instead
  (`kernels/flash/mosaic_*.py`: TMA, warp-specialised `wgmma`; bf16 / fp16,
  head sizes padding to 64, 128 or 256, dropout too, no bias or dense mask),
  the same function; `launch=` with `fwd_backend` / `dkv_backend` /
  `dq_backend` `"triton"` or `"mosaic"` picks them explicitly (the Mosaic
  dQ kernel, head sizes padding to 64 or 128, serves by default from 16k
  keys on: `kernels/flash/launch.py`).
  `interpret=True` runs the Triton kernels in Pallas' interpreter on any
  backend (slow; for tests on CPU).

  On TPU (without `interpret`) it runs JAX's Pallas TPU flash kernel instead
  (`kernels/flash_tpu.py`), which computes fewer features: its own record,
  `TPU_CAPABILITIES` (`fa.capabilities("flash", "tpu")`, the README's
  `flash (tpu)` row), says which; on top of it, causal only with Sq == Sk,
  grouped-query heads only without causal, no `launch`, and tiles that are
  multiples of 128. KV-cache calls on TPU go to JAX's ragged paged
  attention kernel (`kernels/ragged_paged_tpu.py`), decided by
  `TPU_CACHE_CAPABILITIES`: causal (or one new token), sliding window, soft
  cap, grouped heads, ragged `q_lengths`, dense or paged caches; no lse,
  bias, mask or dropout, and no backward; `block_q`/`block_k` tile it.

  Block sizes (`fa.BlockSizes`, powers of two >= 16): `block_q`/`block_k`
  tile the forward pass, `block_q_dkv`/`block_k_dkv` the dK/dV kernel,
  `block_q_dq`/`block_k_dq` the dQ kernel; defaults depend on the head size
  and GPU generation (`flash_kernel.default_launch_config`). `launch=`
  (`fa.FlashLaunchConfig`) sets tiles, warps and stages of every kernel at
  once, and can select the one-kernel backward (`atomic_dq=True`: dQ
  added by the dK/dV kernel; with the Triton kernel as float32 atomics,
  not bitwise reproducible run to run, which `deterministic_dq=False` must
  accept; with the Hopper kernel in int32 fixed point, reproducible, which
  the default launches use at D = 128 from 8k keys:
  `kernels/flash/launch.py`).
  """

  capabilities = registry.Capabilities(
      platforms=("gpu", "tpu"), weights=False, sinks=True, score_mod=True,
      mask_mod=True,
      block_size_fields=BLOCK_FIELDS, sharded_sequence=True,
      notes=("Pallas/Triton fused kernels; D, Dv <= 256; CPU only with "
             "interpret=True; on TPU JAX's Pallas TPU kernel (its own "
             "record: fa.capabilities('flash', 'tpu'))."))
  platform_capabilities = {"tpu": TPU_CAPABILITIES}

  config_class = FlashConfig

  @classmethod
  def capabilities_for(cls, request):
    caps = super().capabilities_for(request)
    if caps is TPU_CAPABILITIES and "cache" in request.features:
      return TPU_CACHE_CAPABILITIES  # The ragged paged kernel serves it.
    return caps

  @classmethod
  def poisons_overflow(cls, request):
    # The GPU's cache calls (`flash_kernel.cache_attention`): the decode
    # kernels poison in their epilogue, the general kernels' path after.
    return "cache" in request.features and not _uses_tpu_kernel(request)

  @classmethod
  def unsupported_reason(cls, request):
    reason = super().unsupported_reason(request)
    if reason is not None:
      return reason
    if _uses_tpu_kernel(request):
      return _tpu_limit_reason(request)
    return flash_kernel.head_dim_reason(request.dims)

  @classmethod
  def block_size_reason(cls, request):
    # FlashConfig only refuses tiles no flash kernel can use; `auto`'s
    # options not even that. Which kernel runs decides here.
    if _uses_tpu_kernel(request):
      if "cache" in request.features:
        return None  # The ragged kernel takes any positive tiles.
      return request.block_size_reason(BLOCK_FIELDS, flash_tpu.check_block)
    return request.block_size_reason(BLOCK_FIELDS,
                                     flash_kernel.block_size_reason)

  @classmethod
  def make_kernel(cls, config, request):
    if _uses_tpu_kernel(request):
      if "cache" in request.features:
        return functools.partial(ragged_paged_tpu.ragged_paged_attention,
                                 sm_scale=config.scale,
                                 softcap=config.logits_soft_cap,
                                 block_sizes=config.block_sizes)
      return functools.partial(flash_tpu.flash_attention,
                               sm_scale=config.scale,
                               block_sizes=config.block_sizes)
    # A KV-cache call goes to the decode kernel when it can serve it
    # (`decode.cache_call_reason`: with mods, the general kernels).
    attend = (flash_kernel.cache_attention if "cache" in request.features
              else flash_kernel.flash_attention)
    return functools.partial(
        attend, sm_scale=config.scale, softcap=config.logits_soft_cap,
        precision=config.precision, block_sizes=config.block_sizes,
        launch=config.launch, interpret=config.interpret)


# --- TPU: JAX's Pallas TPU flash kernel (kernels/flash_tpu.py) ----------------


def _uses_tpu_kernel(request) -> bool:
  """On TPU, flash runs JAX's TPU kernels (`interpret=True` keeps the
  project's own kernels, interpreted, on any platform)."""
  return FlashAttention.capabilities_for(request) in (TPU_CAPABILITIES,
                                                      TPU_CACHE_CAPABILITIES)


def _tpu_limit_reason(request) -> str | None:
  """The TPU kernels' limits that their records cannot say."""
  features, dims = request.features, request.dims
  if request.options.get("launch") is not None:
    return ("on TPU, mechanism 'flash' (JAX's Pallas TPU kernels) has "
            "no Triton launches; leave launch=None (its tiles are "
            "`block_sizes`).")
  if "cache" in features:
    reason = ragged_paged_tpu.unsupported_reason(
        dims, request.dtype, causal="causal" in features,
        window=request.window)
    if reason is None:
      return None
    others = [m for m in registry.mechanisms_supporting("cache")
              if m != "flash" and all(
                  registry.capabilities(m).supports(f) for f in features)]
    return (f"on TPU, mechanism 'flash' cannot serve this KV-cache call: "
            f"{reason}; mechanisms that can: {', '.join(others)} (or flash "
            "on GPU).")
  if {"gqa", "causal"} <= features:
    # Grouped heads are folded into the query sequence, which the causal
    # mask (a function of the row index) cannot see through.
    return "on TPU, " + base.feature_refusal(
        "flash", "gqa", "feature 'gqa' together with 'causal'")
  if "causal" in features and dims.q_len != dims.kv_len:
    return ("on TPU, mechanism 'flash' (JAX's Pallas TPU flash kernel) "
            "aligns its causal mask top-left, which matches the library's "
            "bottom-right alignment only when Sq == Sk; got Sq = "
            f"{dims.q_len}, Sk = {dims.kv_len} (mechanism 'splash' aligns "
            "it bottom-right).")
  return None
