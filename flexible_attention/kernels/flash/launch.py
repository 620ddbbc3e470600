"""The launch policy of the flash kernels: which backend and tiles serve a call.

This module sits above the two backends (`triton_*`, `mosaic_*`), which never
import each other or it. It holds:

- the launch records, `Launch` (one kernel's tiles, warps, stages) and
  `LaunchConfig` (the forward, dK/dV and dQ kernels, their backends);
- the per-GPU defaults (`default_launch_config`, measured on an H200) and
  the user's `fa.BlockSizes` over them (`launch_config`);
- the checks of tiles and launches (`check_block_size`,
  `check_launch_config`);
- the choice (`choose_launch`): which backend serves each kernel of a call.

Which path serves what (the README has it too):

- forward: on Hopper (sm_90) by default the Mosaic GPU kernel wherever it
  serves the call (`mosaic_common.unsupported_reason`: bf16 / fp16, padded
  D == Dv in 64, 128, 256, dropout too, no bias, dense mask or
  `precision`; sinks too; Sq and Sk at least one of its tiles; forward
  tiles not set by the user), with a score_mod / mask_mod too when it
  reads `mod_args` only at the program's batch row and head and is
  elementwise in primitives Mosaic GPU lowers
  (`mosaic_mods.unsupported_reason`: ALiBi, prefix-LM, soft clamps,
  mask_mods without mod_args; not T5 buckets or document ids, which index
  `mod_args` per element), else Triton;
- dK/dV: likewise on Hopper (its own tiles), mods included where the
  forward takes them, at padded D of 64 or 128 (the kernel's rows layout:
  it evaluates the mods on its transposed tiles and accumulates the
  gradients of the program values the score_mod reads, which XLA pulls
  back to `mod_args`; `mosaic_mods.grad_slots`); at D = 256 calls with
  mods keep the Triton kernel (`mosaic_common.dkv_mods_reason`), as do
  mods the forward cannot take; else Triton. The fused kernel
  (`atomic_dq=True`) runs mods where their shared memory fits
  (`mosaic_mod_rows.fused_mods_reason`: `mosaic_common.FUSED_MODS_SMEM`;
  an error for a launch that asks beyond it).
- dQ: on Hopper by default, at padded D = `FUSED_DQ_HEAD_DIM` (128) with
  `FUSED_DQ_MIN_KV_LEN` <= Sk <= `FUSED_DQ_MAX_KV_LEN` (by dtype: speed below,
  precision above) where the Mosaic dK/dV kernel serves the call (with mods
  where the fused kernel fits them), inside that kernel (the fused backward,
  `atomic_dq=True`, reproducible in int32 fixed point); else the Mosaic GPU dQ
  kernel (`mosaic_dq`) for the calls the forward serves (mods included) at
  padded D of 64 or 128 (`mosaic_common.dq_reason`) with Sk >=
  `MOSAIC_DQ_MIN_KV_LEN`; else Triton's (each where it measured fastest).
  `LaunchConfig(dq_backend=...)` picks a dQ kernel explicitly;
  `LaunchConfig(atomic_dq=True)` the dK/dV kernel's dQ: Triton's float32
  atomics with `dkv_backend="triton"` (not reproducible), the fused Mosaic GPU
  backward's TMA reduce-adds with `dkv_backend="mosaic"` (padded D of 64 or
  128; D = 256 keeps the split backward: `mosaic_common.fused_dq_reason`);
- the bias gradient: Triton;
- GPUs before Hopper and `interpret=True`: Triton for every kernel.
- decode (a cache call with few new tokens, `decode.py`): on Hopper the
  Mosaic GPU decode kernel (`mosaic_decode`) wherever it serves the call
  (bf16 / fp16, D == Dv in 64, 128, 256, power-of-two pages of at least 8
  tokens, `G * Sq <= 64` query rows per KV head, no `precision`) and no
  Triton launch field is set, else Triton's (`triton_decode`)
  (`choose_decode_backend`).

`LaunchConfig(fwd_backend=..., dkv_backend=..., dq_backend=...)` asks for a
backend explicitly; a Mosaic kernel asked for a call it cannot serve is an
error (never a silent fallback). A call whose results must be float32 (a ring's
blocks: `float32_results=True`) stays on Triton, whose kernels write any
dtype.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from flexible_attention.core.types import BlockSizes
from flexible_attention.kernels import gpu
from flexible_attention.kernels.flash import mosaic_common
from flexible_attention.kernels.flash import mosaic_mod_rows
from flexible_attention.kernels.flash import mosaic_mods
from flexible_attention.kernels.flash.structure import MAX_HEAD_DIM
from flexible_attention.kernels.flash.structure import MIN_BLOCK
from flexible_attention.kernels.flash.structure import next_power_of_2

# The `fa.BlockSizes` fields the kernels read: (q, k) tiles of each kernel.
TILE_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv",
               "block_q_dq", "block_k_dq")
BACKENDS = ("triton", "mosaic")  # Of the forward, dK/dV, dQ and decode
# kernels.
# The default launches on Hopper take the Mosaic GPU dQ kernel (`mosaic_dq`)
# where it serves the call and each query tile's program runs over at least
# this many keys (Sk). Measured on an H200 (jax 0.11.2, bf16, B * S = 16k,
# H * D = 2048; `benchmarks/fused_bwd_probe.py --variants=split,mosaic_dq`):
# forward+backward 0.91-0.96x the time of the Triton dQ's at S = 16k, 1.02-
# 1.035x at S = 4k (its fixed cost per program, the q / dO / stats loads
# and the barriers, weighs on short key loops).
MOSAIC_DQ_MIN_KV_LEN = 16384

# On Hopper the default launches fuse dQ into the Mosaic dK/dV kernel (the
# fused backward, `LaunchConfig.atomic_dq`, reproducible in int32 fixed
# point) at this padded head size, where that kernel serves the call and
# FUSED_DQ_MIN_KV_LEN <= Sk <= FUSED_DQ_MAX_KV_LEN[dtype]. Measured on an
# H100 (jax 0.11.2, bf16, B * S = 16k, H * D = 2048, forward+backward,
# `benchmarks/fused_bwd_probe.py`, `flash_ab.py`): 0.96x the time of the
# Mosaic dQ kernel's at S = 16k; 0.86-0.92x the Triton dQ's at 8k and,
# since the Mosaic kernels launch tile by tile (`structure.
# MOSAIC_TILES_FIRST`; heads first it was 1.09x), 0.88-0.94x at 4k (2k
# not measured). At D = 64 it was 1.05x the Mosaic dQ's (16k, causal);
# lagged (`mosaic_bwd_rows.DQ_LAG`), 0.99-1.05x the split's (4k-16k, H100).
# The upper bound is precision: the fixed point's summation error grows
# about linearly with Sk (`mosaic_common.fixed_point_scales`: ~4e-4 of a
# row's largest entry at 128k keys on random rows), and the default keeps
# it under a fifth of the rounding of the dtype dQ is returned in (bf16
# 2^-9, fp16 2^-12).
FUSED_DQ_HEAD_DIM = 128
FUSED_DQ_MIN_KV_LEN = 4096
FUSED_DQ_MAX_KV_LEN = {jnp.dtype(jnp.bfloat16): 131072,
                       jnp.dtype(jnp.float16): 16384}
# The fused backward's default has `rotate_dq` from this many keys: on an
# H100 (tiles first) 0.976-0.985x its time at 16k full, 0.979x causal; at
# 4k-8k within +1% of none (`fused_bwd_probe.py --variants=fused,
# fused_rotated`, benchmarks/flash_notes.md).
ROTATE_DQ_MIN_KV_LEN = 16384


@dataclasses.dataclass(frozen=True)
class Launch:
  """Tile sizes and Triton settings of one kernel."""

  block_q: int
  block_k: int
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
  """The launches of the forward, dK/dV and dQ kernels.

  With `atomic_dq`, the backward is one kernel: the dK/dV kernel also adds
  each tile pair's share of dQ (`ds k`) into a float32 buffer, so `dq` (its
  launch then unused) is not launched: 5 matmuls per tile pair instead of
  the split backward's 7. With `dkv_backend="triton"` the adds are Triton
  atomics, as FlashAttention-2's CUDA backward does; with
  `dkv_backend="mosaic"` they are TMA reduce-adds of `[64, Dp / 2]`
  float32 (or int32, below) tiles from the Mosaic GPU dK/dV kernel's
  consumers (the fused backward, FlashAttention-3's; padded head sizes 64
  and 128 only, `mosaic_common.fused_dq_reason`).

  `deterministic_dq` (default True) keeps dQ bitwise reproducible, as the
  split backward is: the fused Mosaic backward then adds int32 fixed-point
  values (each row's share times a power of two bounded from the row's
  inputs, `mosaic_numerics.fixed_point_scales`; integer sums do not depend
  on the order of the adds) and scales the sum back to float32. Its
  summation error grows about linearly with Sk (~5e-5 of a row's largest
  entry at 16k keys, ~4e-4 at 128k on random rows; float32 sums ~1e-6),
  which is why the default launches stop at `FUSED_DQ_MAX_KV_LEN`. With
  False the adds are float32 and land in the order the GPU runs the
  programs (float32 rounding of the same sum differs from run to run).
  Triton's atomics have no fixed order: `atomic_dq=True` with
  `dkv_backend="triton"` needs `deterministic_dq=False` (an error
  otherwise). Without `atomic_dq` the field changes nothing: the split
  backward's dQ is always reproducible.

  A user's `LaunchConfig` has `atomic_dq=False` unless set; the default
  launches (`choose_launch`) set it on Hopper at Dp = 128 from
  `FUSED_DQ_MIN_KV_LEN` to `FUSED_DQ_MAX_KV_LEN` keys, with
  `deterministic_dq` (the fixed point).
  Its speed: at `FUSED_DQ_MIN_KV_LEN`'s comment (at D = 64 1.05x the split
  backward's time). In any order 0.89-0.91x the fixed point's (D = 128,
  16k); Triton's atomics 2.7x the split backward's (H200); fixed orders of
  float32 adds 1.4-1.7x the any order's (benchmarks/flash_notes.md).

  `rotate_dq` (the fused Mosaic backward only, an error elsewhere; the
  default launches set it from `ROTATE_DQ_MIN_KV_LEN` keys) starts each
  program whose query tiles are unmasked at its key tile's index
  (`mosaic_bwd`): the programs that run at once add into different dQ
  tiles. dK, dV sum in another fixed order; dQ's bits stay.

  `fwd_backend` picks the forward kernel: `"triton"` (this module's), or
  `"mosaic"`, the Hopper kernel of `mosaic_fwd` (Mosaic GPU: TMA, warp
  specialisation, asynchronous `wgmma`; persistent, one program per
  multiprocessor over `mosaic_schedule.WorkOrder`'s query tiles: on an H100
  1.04-1.76x the speed of one program per tile at 512 to 4k tokens,
  benchmarks/BENCHMARKS.md), for the calls it serves
  (`mosaic_common.unsupported_reason`; an error otherwise), with
  `fwd=mosaic_launch(Dp)`, its fixed launch (another is an error). On
  Hopper the default launches use `"mosaic"` wherever it serves the call
  and the forward tiles are not the user's (`choose_launch`).

  `dkv_backend="mosaic"` likewise runs the dK/dV kernel through
  `mosaic_bwd.dkdv` (the calls the forward serves, with mods only at
  padded head sizes below 256, `mosaic_common.dkv_mods_reason`, and with
  `atomic_dq` only where their shared memory fits `mosaic_common.
  FUSED_MODS_SMEM`; `dkv=mosaic_dkv_launch(Dp)`), and the
  default launches use it on Hopper
  wherever it serves the call and the dK/dV tiles are not the user's (with
  `atomic_dq=False`: dQ through Triton).

  `dq_backend="mosaic"` runs the dQ kernel through `mosaic_dq.dq` (the
  calls the dK/dV kernel serves, at padded head sizes 64 and 128:
  `mosaic_common.dq_reason`; `dq=mosaic_dq_launch(Dp)`); an error together
  with `atomic_dq=True`, whose dK/dV kernel computes dQ. The default
  launches use it on Hopper wherever it serves the call, Sk is at least
  `MOSAIC_DQ_MIN_KV_LEN` and the dQ tiles are not the user's.

  The Mosaic kernels write the inputs' dtype: a call prepared with
  `float32_results=True` (a ring's blocks) never uses them by default and
  refuses them when asked.
  """

  fwd: Launch
  dkv: Launch
  dq: Launch
  atomic_dq: bool = False
  fwd_backend: str = "triton"
  dkv_backend: str = "triton"
  dq_backend: str = "triton"
  deterministic_dq: bool = True
  rotate_dq: bool = False


def default_launch_config(head_dim: int, causal: bool = False,
                          capability: float | None = None) -> LaunchConfig:
  """Tiles, warps and stages per (padded) head size and GPU generation.

  Hopper (compute capability 9.x, and `capability=None`): measured on an
  H200 (jax 0.11.2, bf16, B*S = 16k, S = 4096, H*D = 2048), each kernel's
  launches timed alone by `benchmarks/flash_probe.py`; the sweep and its
  numbers are in benchmarks/flash_notes.md. At D <= 128 the causal forward
  prefers 64 x 64 tiles (less work on the diagonal). At D = 256 the
  shared memory (227 KiB a block) bounds the tiles: two float32 `[bk, 256]`
  accumulators make the dK/dV kernel's best tile 64 x 32 at 4 warps.

  Earlier GPUs (capability < 9) have less shared memory per block (164 KiB
  on an A100 against 227 KiB): the same tiles with at most 2 pipeline
  stages, an untuned starting point (no pre-Hopper GPU was measured).
  """
  config = _hopper_launch_config(head_dim, causal)
  if capability is None or capability >= 9.0:
    return config
  cap = lambda launch: dataclasses.replace(
      launch, num_stages=min(launch.num_stages, 2))
  return dataclasses.replace(config, fwd=cap(config.fwd),
                             dkv=cap(config.dkv), dq=cap(config.dq))


def _hopper_launch_config(head_dim: int, causal: bool) -> LaunchConfig:
  if head_dim <= 64:
    fwd = Launch(64, 64, 4, 3) if causal else Launch(128, 128, 4, 3)
    dq = Launch(128, 32, 4, 3) if causal else Launch(128, 64, 4, 3)
    return LaunchConfig(fwd=fwd, dkv=Launch(32, 128, 4, 3), dq=dq)
  if head_dim <= 128:
    fwd = Launch(64, 64, 4, 3) if causal else Launch(128, 64, 4, 2)
    return LaunchConfig(fwd=fwd, dkv=Launch(64, 128, 8, 3),
                        dq=Launch(128, 32, 4, 3))
  fwd = Launch(128, 64, 8, 2) if causal else Launch(64, 64, 4, 3)
  return LaunchConfig(fwd=fwd, dkv=Launch(64, 32, 4, 2),
                      dq=Launch(128, 32, 8, 2))


def head_dim_reason(dims, mechanism: str = "flash") -> str | None:
  """The kernels' head size limit as a refusal for `mechanism` (or None)."""
  if max(dims.head_dim, dims.value_dim) > MAX_HEAD_DIM:
    return (f"mechanism {mechanism!r} with the flash kernels supports head "
            f"sizes up to {MAX_HEAD_DIM}, got D = {dims.head_dim}, Dv = "
            f"{dims.value_dim}.")
  return None


def _warps_for(block_q: int, block_k: int, head_dim: int) -> int:
  return 8 if block_q * block_k >= 128 * 64 and head_dim > 64 else 4


def block_size_reason(name: str, value: int | None) -> str | None:
  """Why `fa.BlockSizes.<name>` cannot serve the Triton kernels (None when
  it can)."""
  return _tile_reason(f"BlockSizes.{name}", value)


def _tile_reason(label: str, value: int | None) -> str | None:
  """Tiles must be powers of two >= 16 (Triton's tensor shapes)."""
  if value is not None and (value < MIN_BLOCK or value & (value - 1)):
    return (f"{label} must be a power of two >= {MIN_BLOCK} for the flash "
            f"kernels, got {value}.")
  return None


def check_block_size(name: str, value: int | None):
  """Raises `ValueError` for a tile size the Triton kernels cannot use."""
  reason = block_size_reason(name, value)
  if reason is not None:
    raise ValueError(reason)


def check_launch_config(config: LaunchConfig,
                        block_sizes: BlockSizes | None = None):
  """Raises `TypeError` / `ValueError` for launches the kernels cannot use
  (tiles must be powers of two >= 16, warps a power of two from 1 to 32,
  stages >= 1), or given together with tile sizes in `block_sizes` (which
  would be ignored)."""
  both = [f for f in TILE_FIELDS
          if block_sizes is not None and getattr(block_sizes, f) is not None]
  if both:
    raise ValueError(
        f"flash: pass the tiles either in `launch` or in `block_sizes`, not "
        f"both (block_sizes sets {both}).")
  if not isinstance(config, LaunchConfig):
    raise TypeError(f"launch must be a LaunchConfig, got {config!r}.")
  for field in ("atomic_dq", "deterministic_dq", "rotate_dq"):
    if not isinstance(getattr(config, field), bool):
      raise TypeError(f"LaunchConfig.{field} must be a bool, got "
                      f"{getattr(config, field)!r}.")
  for field in ("fwd_backend", "dkv_backend", "dq_backend"):
    if getattr(config, field) not in BACKENDS:
      raise ValueError(f"LaunchConfig.{field} must be one of {BACKENDS}, "
                       f"got {getattr(config, field)!r}.")
  if (config.atomic_dq and config.dkv_backend == "triton"
      and config.deterministic_dq):
    raise ValueError(
        "flash: atomic_dq=True with dkv_backend='triton' adds dQ with "
        "Triton's atomics, in the order the GPU runs the programs (not "
        "bitwise reproducible); pass deterministic_dq=False to accept that, "
        "or use dkv_backend='mosaic' (Hopper), whose adds keep a fixed "
        "order.")
  if config.rotate_dq and not (config.atomic_dq
                               and config.dkv_backend == "mosaic"):
    raise ValueError(
        "flash: rotate_dq=True orders the fused Mosaic backward's dQ adds; it "
        "needs atomic_dq=True and dkv_backend='mosaic', got atomic_dq="
        f"{config.atomic_dq} and dkv_backend={config.dkv_backend!r}.")
  for kernel in ("fwd", "dkv", "dq"):
    launch = getattr(config, kernel)
    if not isinstance(launch, Launch):
      raise TypeError(f"LaunchConfig.{kernel} must be a Launch, got "
                      f"{launch!r}.")
    for name in ("block_q", "block_k", "num_warps", "num_stages"):
      value = getattr(launch, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LaunchConfig.{kernel}.{name} must be an int, got "
                        f"{value!r}.")
    for name in ("block_q", "block_k"):
      reason = _tile_reason(f"LaunchConfig.{kernel}.{name}",
                            getattr(launch, name))
      if reason is not None:
        raise ValueError(reason)
    if launch.num_warps not in (1, 2, 4, 8, 16, 32):
      raise ValueError(f"LaunchConfig.{kernel}.num_warps must be a power of "
                       f"two from 1 to 32, got {launch.num_warps}.")
    if launch.num_stages < 1:
      raise ValueError(f"LaunchConfig.{kernel}.num_stages must be >= 1, got "
                       f"{launch.num_stages}.")


def launch_config(head_dim: int, block_sizes: BlockSizes | None = None,
                  causal: bool = False, capability: float | None = None
                  ) -> LaunchConfig:
  """The default launches with the user's `fa.BlockSizes` applied."""
  config = default_launch_config(head_dim, causal, capability)
  if block_sizes is None:
    return config

  def override(launch: Launch, q_field: str, k_field: str) -> Launch:
    block_q = getattr(block_sizes, q_field) or launch.block_q
    block_k = getattr(block_sizes, k_field) or launch.block_k
    check_block_size(q_field, block_q)
    check_block_size(k_field, block_k)
    if (block_q, block_k) == (launch.block_q, launch.block_k):
      return launch
    return Launch(block_q, block_k, _warps_for(block_q, block_k, head_dim),
                  launch.num_stages)

  return dataclasses.replace(
      config, fwd=override(config.fwd, "block_q", "block_k"),
      dkv=override(config.dkv, "block_q_dkv", "block_k_dkv"),
      dq=override(config.dq, "block_q_dq", "block_k_dq"))


def mosaic_launch(head_dim: int) -> Launch:
  """The Mosaic GPU forward's fixed launch at a padded head size: its
  tiles, the 8 warps of its two consumer warpgroups (a producer warpgroup
  runs beside them) and its shared-memory slots as stages."""
  return Launch(mosaic_common.BLOCK_Q, mosaic_common.block_k(head_dim),
                4 * mosaic_common.CONSUMERS, mosaic_common.STAGES)


def mosaic_dkv_launch(head_dim: int, *, fused: bool = False,
                      mods: bool = False) -> Launch:
  """The Mosaic GPU dK/dV kernel's fixed launch at a padded head size, as
  `mosaic_launch`'s; `fused` and `mods` as `mosaic_common.dkv_block_q`'s."""
  return Launch(mosaic_common.dkv_block_q(head_dim, fused=fused, mods=mods),
                mosaic_common.dkv_block_k(head_dim),
                4 * mosaic_common.CONSUMERS, mosaic_common.STAGES)


def mosaic_dq_launch(head_dim: int) -> Launch:
  """The Mosaic GPU dQ kernel's fixed launch at a padded head size, as
  `mosaic_launch`'s: `BLOCK_Q` query rows, `dq_block_k(Dp)` keys."""
  return Launch(mosaic_common.BLOCK_Q, mosaic_common.dq_block_k(head_dim),
                4 * mosaic_common.CONSUMERS, mosaic_common.STAGES)


DQ_PATHS = ("triton", "mosaic", "fused")  # `hopper_launch_config`'s dq.


def hopper_launch_config(head_dim: int, causal: bool = False, *,
                         dq: str = "triton",
                         deterministic_dq: bool = True) -> LaunchConfig:
  """Launches that pin the Mosaic GPU kernels (Hopper), each with its fixed
  launch: the forward, the dK/dV kernel and dQ by `dq`: `"triton"` (the
  Triton dQ kernel: the split backward), `"mosaic"` (the Mosaic dQ kernel,
  padded D of 64 or 128) or `"fused"` (inside the dK/dV kernel,
  `atomic_dq=True`, padded D of 64 or 128; `deterministic_dq` as
  `LaunchConfig`'s). Passed as `launch=`, a call these kernels cannot
  serve is an error saying why (`choose_launch`), never a Triton kernel in
  their place; the default launches choose per call instead.

  Args:
    head_dim: Dp, the padded head size (64, 128 or 256).
    causal: whether the calls are causal (the Triton dQ kernel's tiles).
    dq: one of `DQ_PATHS`.
    deterministic_dq: with `dq="fused"`, dQ's adds in int32 fixed point
      (bitwise reproducible) rather than float32 in any order.

  Returns:
    The `LaunchConfig`.
  """
  if dq not in DQ_PATHS:
    raise ValueError(f"flash: dq must be one of {DQ_PATHS}, got {dq!r}.")
  launch = dataclasses.replace(
      default_launch_config(head_dim, causal, 9.0),
      fwd=mosaic_launch(head_dim), fwd_backend="mosaic",
      dkv=mosaic_dkv_launch(head_dim, fused=dq == "fused"),
      dkv_backend="mosaic", atomic_dq=dq == "fused",
      deterministic_dq=deterministic_dq)
  if dq == "mosaic":
    launch = dataclasses.replace(launch, dq=mosaic_dq_launch(head_dim),
                                 dq_backend="mosaic")
  return launch


def _mosaic_by_default(capability: float | None, reason: str | None,
                       user_tiles: bool, q_len: int, kv_len: int,
                       launch: Launch) -> bool:
  """Whether the default launches take a Mosaic kernel (its fixed `launch`):
  on Hopper (no `wgmma` elsewhere), for a call it serves that spans one of
  its tiles each way, unless the user set that kernel's tiles (which are
  Triton's)."""
  return (capability is not None and 9.0 <= capability < 10.0
          and reason is None and not user_tiles
          and q_len >= launch.block_q and kv_len >= launch.block_k)


def _check_mosaic_launch(kernel: str, launch: Launch, want: Launch,
                         head_dim: int, reason: str | None):
  """Raises `ValueError` unless a Mosaic kernel (`"fwd"`, `"dkv"`, `"dq"`)
  can serve the call with the given launch: its own, fixed one (`want`),
  so that no tile, warp or stage count passed is left unused."""
  if reason is not None:
    raise ValueError(f"flash: {kernel}_backend='mosaic' cannot serve this "
                     f"call: {reason}.")
  if launch != want:
    raise ValueError(
        f"flash: {kernel}_backend='mosaic' takes {kernel} tiles "
        f"{want.block_q} x {want.block_k} with {want.num_warps} warps and "
        f"{want.num_stages} stages at padded head size {head_dim} (its fixed "
        f"launch), got {launch}.")


def _clip(launch: Launch, q_len: int, kv_len: int) -> Launch:
  """Shrinks tiles to the (power-of-two rounded) sequence lengths."""
  fit = lambda block, n: min(block, max(MIN_BLOCK, next_power_of_2(n)))
  return dataclasses.replace(launch, block_q=fit(launch.block_q, q_len),
                             block_k=fit(launch.block_k, kv_len))


TRITON_SHARED_MEMORY = 200 * 1024  # The estimate's budget (227 KiB a
# block on Hopper, less Triton's own buffers).


def _triton_shared_memory(kernel: str, launch: Launch, head_dim: int,
                          itemsize: int, pair_bytes: int = 0) -> int:
  """A Triton kernel's shared memory, estimated: its resident tiles (fwd: q;
  dkv: k, v; dq: q, dO), `num_stages` copies of the streamed ones (fwd, dq:
  k, v; dkv: q, dO) and `num_stages - 1` copies of the `[block_q, block_k]`
  dense tiles (bias, mask) of `pair_bytes` bytes a (query, key) pair.

  The dense tiles' count is measured: on an H200 (jax 0.11.2) the forward
  at D = 256 with tiles 64 x 64 and 3 stages asked for 246784 bytes with a
  bfloat16 bias and 238592 with an int8 mask, two buffers of each tile
  over the 230400 of the plain kernel (1 KiB over this estimate's 229376),
  and so over the 232448 a block may have."""
  resident, streamed = ((launch.block_q, 2 * launch.block_k)
                        if kernel == "fwd" else
                        (2 * launch.block_k, 2 * launch.block_q)
                        if kernel == "dkv" else
                        (2 * launch.block_q, 2 * launch.block_k))
  dense = (launch.num_stages - 1) * launch.block_q * launch.block_k
  return ((resident + launch.num_stages * streamed) * head_dim * itemsize
          + dense * pair_bytes)


def fit_shared_memory(kernel: str, launch: Launch, head_dim: int,
                      itemsize: int, pair_bytes: int = 0) -> Launch:
  """A default Triton launch shrunk until its estimated shared memory
  (`_triton_shared_memory`) is at most what the same launch needs in 16
  bits without dense tiles (the measured defaults, which run) or
  `TRITON_SHARED_MEMORY`: at most 2 stages, then the streamed tile halved,
  then the resident one, then 1 stage, never under `MIN_BLOCK`. 16-bit
  launches without a bias or mask are kept as they are; float32 inputs
  (twice the bytes) and the dense tiles (`pair_bytes` a (query, key) pair)
  shrink them where the sum would not fit."""
  limit = max(TRITON_SHARED_MEMORY,
              _triton_shared_memory(kernel, launch, head_dim, 2))
  size = lambda launch: _triton_shared_memory(kernel, launch, head_dim,
                                              itemsize, pair_bytes)
  streamed = "block_k" if kernel in ("fwd", "dq") else "block_q"
  resident = "block_q" if streamed == "block_k" else "block_k"
  steps = [("num_stages", 2), (streamed, None), (resident, None),
           ("num_stages", 1)]
  for field, value in steps:
    while size(launch) > limit:
      current = getattr(launch, field)
      new = value if value is not None else max(MIN_BLOCK, current // 2)
      if new >= current:
        break
      launch = dataclasses.replace(launch, **{field: new})
  return launch


def check_result_dtype(name: str, dtype, launch: LaunchConfig, kernel: str,
                       inputs_dtype):
  """Raises `ValueError` when `kernel`'s (`"fwd"`, `"dkv"`, `"dq"`) Mosaic
  backend would have to write `dtype`: it writes the inputs' dtype only
  (`choose_launch`'s `float32_results` keeps such calls on Triton)."""
  if getattr(launch, f"{kernel}_backend") != "mosaic":
    return
  if dtype is not None and jnp.dtype(dtype) != jnp.dtype(inputs_dtype):
    raise ValueError(
        f"flash: the Mosaic GPU kernels write {jnp.dtype(inputs_dtype)}, not "
        f"{name}={jnp.dtype(dtype)}; prepare the call with "
        f"float32_results=True (which keeps it on the Triton kernels).")


def choose_launch(*, dtype, head_dim: int, value_dim: int, q_len: int,
                  kv_len: int, causal: bool, bias: bool, mask: bool,
                  precision, interpret: bool,
                  block_sizes: BlockSizes | None,
                  launch: LaunchConfig | None,
                  float32_results: bool,
                  groups: int, mods=None, bias_dtype=None) -> LaunchConfig:
  """The launches that serve a call: the user's `launch` (checked), or the
  defaults for the GPU with the user's tiles and, on Hopper, the Mosaic
  kernels wherever they serve the call; Triton tiles clipped to the call.

  Args:
    dtype: the inputs' dtype.
    head_dim, value_dim: Dp and Dvp, the padded head sizes.
    q_len, kv_len: Sq and Sk.
    causal, bias, mask: whether the call has them (dropout and sinks,
      which every kernel serves, change no launch).
    precision: the matmul precision asked for, or None.
    interpret: Pallas' interpreter (Triton kernels only).
    block_sizes: the user's `fa.BlockSizes`, or None.
    launch: the user's `LaunchConfig`, or None.
    float32_results: the caller wants float32 outputs and gradients.
    mods: the call's score_mod / mask_mod as the kernels read them
      (`mod_lowering.KernelMods`), or None. The Triton kernels evaluate
      any (`mod_lowering`); the Mosaic forward those whose `mod_args`
      reads are per program (`mosaic_mods.unsupported_reason`: ALiBi,
      prefix-LM, mask_mods without mod_args...), and so do the Mosaic dQ
      kernel and, at padded head sizes below 256, the Mosaic dK/dV kernel
      (`mosaic_common.dkv_mods_reason`), which then computes `mod_args`'
      gradients (the backward reads the forward's log-sum-exp only, so the
      Mosaic and Triton kernels mix); with dQ too where the mods' shared
      memory fits (`mosaic_mod_rows.fused_mods_reason`).
    bias_dtype: the bias' dtype (default: `dtype`), whose tiles the Triton
      kernels stream beside the mask's (int8) ones (`fit_shared_memory`).
    groups: G, query heads per KV head (required: the fused backward keeps
      the mods' program values of a group's heads in shared memory, so
      whether they fit depends on it).

  Returns:
    The `LaunchConfig` the call runs with.
  """
  mosaic_reason = mosaic_common.unsupported_reason(
      dtype=dtype, head_dim=head_dim, value_dim=value_dim, bias=bias,
      mask=mask, interpret=interpret, precision=precision)
  if float32_results and jnp.dtype(dtype) != jnp.float32:
    mosaic_reason = (
        f"it writes the inputs' {jnp.dtype(dtype)}, and the caller wants "
        f"float32 results")
  # The kernels with a Mosaic GPU version: its fixed launch, and the
  # `fa.BlockSizes` fields of the kernel's (Triton) tiles.
  mosaic = {"fwd": (mosaic_launch(head_dim), ("block_q", "block_k")),
            "dkv": (mosaic_dkv_launch(
                head_dim, fused=launch is not None and launch.atomic_dq,
                mods=mods is not None),
                    ("block_q_dkv", "block_k_dkv")),
            "dq": (mosaic_dq_launch(head_dim), ("block_q_dq", "block_k_dq"))}
  mods_reason = mosaic_mods.unsupported_reason(mods)
  dkv_mods = mods is not None and mods_reason is None
  reasons = {"fwd": mosaic_reason or mods_reason,
             "dkv": mosaic_reason or mods_reason or (
                 mosaic_common.dkv_mods_reason(head_dim) if dkv_mods
                 else None),
             "dq": mosaic_reason or mods_reason
                   or mosaic_common.dq_reason(head_dim)}
  user_launch = launch is not None
  if launch is not None:
    check_launch_config(launch, block_sizes)
    if launch.atomic_dq and launch.dq_backend == "mosaic":
      raise ValueError(
          "flash: dq_backend='mosaic' cannot serve a launch with "
          "atomic_dq=True, whose dK/dV kernel computes dQ (the dq kernel is "
          "not launched); use one or the other.")
    if launch.atomic_dq and reasons["dkv"] is None:  # The fused backward.
      reasons["dkv"] = mosaic_common.fused_dq_reason(head_dim)
    for kernel, (fixed, _) in mosaic.items():
      if getattr(launch, f"{kernel}_backend") == "mosaic":
        _check_mosaic_launch(kernel, getattr(launch, kernel), fixed,
                             head_dim, reasons[kernel])
  else:
    capability = None if interpret else gpu.compute_capability()
    launch = triton = launch_config(max(head_dim, value_dim), block_sizes,
                                    causal, capability)
    user_tiles = {kernel: block_sizes is not None and any(
        getattr(block_sizes, field) is not None for field in fields)
                  for kernel, (_, fields) in mosaic.items()}
    for kernel, (fixed, _) in mosaic.items():
      if kernel == "dq" and kv_len < MOSAIC_DQ_MIN_KV_LEN:
        continue  # Triton's dQ measured faster there.
      if _mosaic_by_default(capability, reasons[kernel], user_tiles[kernel],
                            q_len, kv_len, fixed):
        launch = dataclasses.replace(
            launch, **{kernel: fixed, f"{kernel}_backend": "mosaic"})
    if (launch.dkv_backend == "mosaic" and head_dim == FUSED_DQ_HEAD_DIM
        and FUSED_DQ_MIN_KV_LEN <= kv_len
        <= FUSED_DQ_MAX_KV_LEN.get(jnp.dtype(dtype), 0)
        and not user_tiles["dq"] and not (
            dkv_mods and mosaic_mod_rows.fused_mods_reason(
                mods, head_dim, groups))):
      # The fused backward measured faster there, with mods too where their
      # shared memory fits: no dQ kernel (its launch, unused, stays
      # Triton's default).
      launch = dataclasses.replace(
          launch, atomic_dq=True, dq=triton.dq, dq_backend="triton",
          dkv=mosaic_dkv_launch(head_dim, fused=True, mods=mods is not None),
          rotate_dq=kv_len >= ROTATE_DQ_MIN_KV_LEN)
  # Triton tiles shrink to short calls (and the defaults to the shared
  # memory of wider dtypes); a Mosaic kernel's launch is fixed.
  itemsize = jnp.dtype(dtype).itemsize
  pair_bytes = (jnp.dtype(bias_dtype or dtype).itemsize if bias else 0) + (
      1 if mask else 0)
  triton = lambda kernel: getattr(launch, f"{kernel}_backend",
                                  "triton") != "mosaic"
  fitted = lambda kernel, x: (x if user_launch else fit_shared_memory(
      kernel, x, max(head_dim, value_dim), itemsize, pair_bytes))
  return dataclasses.replace(launch, **{
      kernel: fitted(kernel, _clip(getattr(launch, kernel), q_len, kv_len))
      if triton(kernel) else getattr(launch, kernel)
      for kernel in ("fwd", "dkv", "dq")})


def choose_decode_backend(backend: str | None, *, mosaic_reason: str | None,
                          triton_fields: bool, mosaic_fields: bool,
                          interpret: bool) -> str:
  """The backend of a decode call: the user's `backend` (checked), or
  Mosaic GPU on Hopper wherever it serves the call and no Triton launch
  field is set, else Triton.

  Args:
    backend: `"triton"`, `"mosaic"` or None (the policy).
    mosaic_reason: why the Mosaic kernel cannot serve the call, or None.
    triton_fields, mosaic_fields: whether the caller set launch fields only
      the Triton (`pages_per_block`, `num_warps`, `num_stages`) or only the
      Mosaic kernel (`block_tokens`, `stages`, `producers`) reads.
    interpret: Pallas' interpreter (Triton only).

  Returns:
    `"triton"` or `"mosaic"`.

  Raises:
    ValueError: for an unknown backend, a Mosaic kernel that cannot serve
      the call, or launch fields of the other backend.
  """
  if backend is None:
    capability = None if interpret else gpu.compute_capability()
    hopper = capability is not None and 9.0 <= capability < 10.0
    backend = ("mosaic" if mosaic_fields or (
        hopper and mosaic_reason is None and not triton_fields) else "triton")
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got "
                     f"{backend!r}.")
  if backend == "mosaic" and mosaic_reason is not None:
    raise ValueError(f"flash decode: the Mosaic GPU kernel cannot serve this "
                     f"call: {mosaic_reason}.")
  if (backend == "mosaic" and triton_fields) or (
      backend == "triton" and mosaic_fields):
    raise ValueError(
        "flash decode: pages_per_block, num_warps and num_stages are the "
        "Triton kernel's launch fields and block_tokens, stages, producers "
        f"the Mosaic kernel's; the call runs backend={backend!r}, so the "
        "other's fields would be unused.")
  return backend
