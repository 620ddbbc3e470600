"""`flash`: the project's own fused Pallas kernels (Triton on GPU)."""

from __future__ import annotations

import dataclasses
import functools

from flexible_attention.kernels import flash_tpu
from flexible_attention.kernels import flash as flash_kernel
from flexible_attention.mechanisms import base
from flexible_attention.mechanisms import registry

BLOCK_FIELDS = flash_kernel.TILE_FIELDS


@dataclasses.dataclass(frozen=True)
class FlashConfig(base.AttentionConfig):
  """`flash`'s options: the common ones plus `interpret` and `launch`.

  Attributes:
    interpret: run the Pallas kernels in Pallas' interpreter (any backend;
      slow: for tests on CPU).
    launch: the Triton launches in full (`fa.FlashLaunchConfig`: tiles,
      warps and pipeline stages of the forward, dK/dV and dQ kernels, and
      `atomic_dq`, the one-kernel backward), replacing the defaults of
      `flash_kernel.default_launch_config`; None keeps them (with the
      tiles of `block_sizes`, if any). Setting both `launch` and flash's
      `block_sizes` fields is an error. Not read by the TPU kernel, which
      refuses it.
  """

  interpret: bool = False
  launch: flash_kernel.LaunchConfig | None = None

  def __post_init__(self):
    if not isinstance(self.interpret, bool):
      raise TypeError(f"interpret must be a bool, got {self.interpret!r}.")
    for field in BLOCK_FIELDS:
      flash_kernel.check_block_size(field, getattr(self.block_sizes, field))
    if self.launch is not None:
      flash_kernel.check_launch_config(self.launch, self.block_sizes)


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
  to 256 (padded inside). See `kernels/flash/`.

  Runs on GPU. On Hopper (sm_90) the forward and dK/dV kernels of the calls
  they serve run through Mosaic GPU kernels instead
  (`kernels/flash/mosaic_fwd.py`, `mosaic_bwd.py`: TMA, warp-specialised `wgmma`; bf16 / fp16,
  head sizes padding to 64, 128 or 256, no bias, dense mask or dropout),
  the same function; `launch=` with `fwd_backend` / `dkv_backend`
  `"triton"` or `"mosaic"` picks them explicitly. `interpret=True`
  runs the Triton kernels in Pallas' interpreter on any backend (slow; for
  tests on CPU).

  On TPU (without `interpret`) it runs JAX's Pallas TPU flash kernel instead
  (`kernels/flash_tpu.py`), which computes fewer features: causal only with
  Sq == Sk, grouped-query heads only without causal, segment ids, kv
  lengths, bias; windows, soft cap, dropout, dense masks, explicit positions,
  caches, sequence sharding, float16 and `precision` are refused there, and
  its tiles are multiples of 128.

  Block sizes (`fa.BlockSizes`, powers of two >= 16): `block_q`/`block_k`
  tile the forward pass, `block_q_dkv`/`block_k_dkv` the dK/dV kernel,
  `block_q_dq`/`block_k_dq` the dQ kernel; defaults depend on the head size
  and GPU generation (`flash_kernel.default_launch_config`). `launch=`
  (`fa.FlashLaunchConfig`) sets tiles, warps and stages of every kernel at
  once, and can select the one-kernel backward (`atomic_dq=True`: dQ by
  float32 atomic adds, not bitwise reproducible run to run).
  """

  capabilities = registry.Capabilities(
      platforms=("gpu", "tpu"), weights=False,
      block_size_fields=BLOCK_FIELDS, sharded_sequence=True,
      notes=("Pallas/Triton fused kernels; D, Dv <= 256; CPU only with "
             "interpret=True; on TPU JAX's Pallas TPU kernel, with fewer "
             "features (see the class docstring)."))

  config_class = FlashConfig

  @classmethod
  def unsupported_reason(cls, request):
    reason = super().unsupported_reason(request)
    if reason is not None:
      return reason
    if _uses_tpu_kernel(request):
      return _tpu_unsupported_reason(request)
    return flash_kernel.head_dim_reason(request.dims)

  @classmethod
  def block_size_reason(cls, request):
    # FlashConfig checks powers of two when built; `auto`'s options do not,
    # and the TPU kernel needs multiples of 128 instead.
    if _uses_tpu_kernel(request):
      return request.block_size_reason(BLOCK_FIELDS, flash_tpu.check_block)
    return request.block_size_reason(BLOCK_FIELDS,
                                     flash_kernel.block_size_reason)

  @classmethod
  def make_kernel(cls, config, request):
    if _uses_tpu_kernel(request):
      return functools.partial(flash_tpu.flash_attention,
                               sm_scale=config.scale,
                               block_sizes=config.block_sizes)
    return functools.partial(
        flash_kernel.flash_attention, sm_scale=config.scale,
        softcap=config.logits_soft_cap, precision=config.precision,
        block_sizes=config.block_sizes,
        # `auto`'s options have neither: it runs the compiled kernels with
        # their default launches.
        launch=getattr(config, "launch", None),
        interpret=getattr(config, "interpret", False))


# --- TPU: JAX's Pallas TPU flash kernel (kernels/flash_tpu.py) ----------------

# Features of the semantics that kernel cannot compute.
_TPU_REFUSED = ("window", "positions", "mask", "softcap", "dropout", "cache")


def _uses_tpu_kernel(request) -> bool:
  """On TPU, flash runs JAX's TPU kernel (`interpret=True` keeps the
  project's own kernels, interpreted, on any platform)."""
  return request.platform == "tpu" and not dict(request.options).get(
      "interpret")


def _tpu_unsupported_reason(request) -> str | None:
  """What the TPU kernel refuses, on top of the common checks."""
  features, dims = request.features, request.dims

  def refuse(feature, what):
    others = [m for m in registry.mechanisms_supporting(feature)
              if m != "flash"]
    return (f"on TPU, {what} is not supported by mechanism 'flash' (JAX's "
            f"Pallas TPU flash kernel); mechanisms that support it: "
            f"{', '.join(others)}.")

  for feature in _TPU_REFUSED:
    if feature in features:
      return refuse(feature, f"feature {feature!r}")
  if {"gqa", "causal"} <= features:
    # Grouped heads are folded into the query sequence, which the causal
    # mask (a function of the row index) cannot see through.
    return refuse("gqa", "feature 'gqa' together with 'causal'")
  if "causal" in features and dims.q_len != dims.kv_len:
    return ("on TPU, mechanism 'flash' (JAX's Pallas TPU flash kernel) "
            "aligns its causal mask top-left, which matches the library's "
            "bottom-right alignment only when Sq == Sk; got Sq = "
            f"{dims.q_len}, Sk = {dims.kv_len} (mechanism 'splash' aligns "
            "it bottom-right).")
  if request.dtype == "float16":
    return ("on TPU, mechanism 'flash' supports dtypes float32, bfloat16, "
            "not float16.")
  if request.sequence_sharded:
    return refuse("sharded_sequence",
                  "sharding a sequence axis over the mesh")
  if dict(request.options).get("precision") is not None:
    return ("on TPU, mechanism 'flash' has no matmul precision setting; "
            "leave precision=None.")
  if dict(request.options).get("launch") is not None:
    return ("on TPU, mechanism 'flash' (JAX's Pallas TPU flash kernel) has "
            "no Triton launches; leave launch=None (its tiles are "
            "`block_sizes`).")
  return None
