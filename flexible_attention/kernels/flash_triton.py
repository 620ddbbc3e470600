"""Fused flash attention written in Pallas and lowered through Triton (GPU).

Three kernels, FlashAttention-2 style (Dao, 2023,
https://arxiv.org/abs/2307.08691):

- forward, grid `(Sq / bq, B, H)`: one query tile against the key tiles it
  can see, with an online softmax; writes the output and the float32
  log-sum-exp (the only residuals besides q, k, v);
- dK/dV, grid `(Sk / bk, B, Hkv)`: one key tile against the query tiles that
  can see it, for every query head of its group (grouped-query attention
  never repeats K/V: the group's heads are a loop inside the program);
- dQ, grid `(Sq / bq, B, H)`: one query tile against its key tiles.

`delta = rowsum(dO * O)` is computed once by XLA before the backward kernels.
The bias gradient, when one is asked for, comes from a fourth launch (the dQ
kernel writing `d(loss)/d(logits)` tiles), so XLA drops it when nobody needs
it.

The structured mask stays structured: each program loads the position /
segment / key-validity vectors of its tiles and evaluates causal, window,
segment and kv-length visibility in registers. A dense mask or bias is read
tile by tile only when the caller passed one. Block skipping: XLA computes,
per batch row and tile, the range of tiles of the other sequence that may be
visible (from per-tile minima and maxima of positions, segment ids and key
validity) and, inside it, a run of tiles that are certainly fully visible;
the kernel walks `[lo, flo)` and `[fhi, hi)` with masking and `[flo, fhi)`
without, and never touches tiles outside `[lo, hi)`.

Dropout calls the library's hash (`core/dropout.py`) on the tile's
coordinates, so the keep mask is bit-identical to every other mechanism.

Sequences of any length and head sizes up to 256 work: q/k/v are padded (by
XLA, outside the kernels) to whole tiles and to a power-of-two head size, as
Triton needs; padded keys are invisible and padded rows are sliced away.

`interpret=True` runs the same kernels through Pallas' interpreter, on any
backend (CPU tests).

On Hopper the forward and the dK/dV kernel may run through `flash_hopper`
(Mosaic GPU) instead: `LaunchConfig.fwd_backend` and `dkv_backend`, chosen
in `prepare`; they take the same padded operands, structure vectors and
skipping bounds and return the same `out` and `lse`, dK and dV, so the
custom VJP and the dQ kernel are shared.

Glossary of shapes:
- B: batch size.
- Sq, Sk: query and key lengths; Sqp, Skp: padded to whole tiles.
- H, Hkv: query and key/value heads; G = H // Hkv.
- D, Dv: query/key and value head sizes; Dp, Dvp: padded to powers of two.
- bq, bk: tile sizes along queries and keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from flexible_attention.core import dropout as dropout_lib
from flexible_attention.core import masks
from flexible_attention.core import reference
from flexible_attention.core.inputs import AttentionInputs
from flexible_attention.core.types import BlockSizes
from flexible_attention.core.types import KernelOutput
from flexible_attention.kernels import flash_hopper
from flexible_attention.kernels import gpu

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MASK_VALUE = reference.MASK_VALUE
MAX_HEAD_DIM = 256
MIN_BLOCK = 16  # Triton's smallest dot operand side.
# The `fa.BlockSizes` fields the kernels read: (q, k) tiles of each kernel.
TILE_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv",
               "block_q_dq", "block_k_dq")
BACKENDS = ("triton", "mosaic")  # Of the forward and dK/dV kernels.


# --- Launch configuration -------------------------------------------------


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
  each tile pair's share of dQ (`ds^T k`) into a float32 buffer with atomic
  adds, as FlashAttention-2's CUDA backward does, so `dq` (its launch then
  unused) is not launched: 5 matmuls per tile pair instead of the split
  backward's 7. The float32 sums then run in the order the GPU schedules
  the programs, so dQ is not bitwise reproducible from run to run (within
  float32 rounding of the same sum). Off by default: on an H200 it is 2.7x
  slower than the split backward at D = 128 (its float32 atomics are
  acquire-release, with fences; benchmarks/flash_notes.md).

  `fwd_backend` picks the forward kernel: `"triton"` (this module's), or
  `"mosaic"`, the Hopper kernel of `flash_hopper` (Mosaic GPU: TMA, warp
  specialisation, asynchronous `wgmma`), for the calls it serves
  (`flash_hopper.unsupported_reason`; an error otherwise), with
  `fwd=mosaic_launch(Dp)`, its fixed launch (another is an error). On
  Hopper the default launches use `"mosaic"` wherever it serves the call
  and the forward tiles are not the user's (`prepare`).

  `dkv_backend="mosaic"` likewise runs the dK/dV kernel through
  `flash_hopper.dkdv` (the calls the forward serves;
  `dkv=mosaic_dkv_launch(Dp)`; not with `atomic_dq`), and the default
  launches use it on Hopper wherever it serves the call and the dK/dV
  tiles are not the user's. dQ is always Triton's.

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
  if not isinstance(config.atomic_dq, bool):
    raise TypeError(
        f"LaunchConfig.atomic_dq must be a bool, got {config.atomic_dq!r}.")
  for field in ("fwd_backend", "dkv_backend"):
    if getattr(config, field) not in BACKENDS:
      raise ValueError(f"LaunchConfig.{field} must be one of {BACKENDS}, "
                       f"got {getattr(config, field)!r}.")
  if config.dkv_backend == "mosaic" and config.atomic_dq:
    raise ValueError("LaunchConfig: dkv_backend='mosaic' has no atomic_dq.")
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
  return Launch(flash_hopper.BLOCK_Q, flash_hopper.block_k(head_dim),
                4 * flash_hopper.CONSUMERS, flash_hopper.STAGES)


def mosaic_dkv_launch(head_dim: int) -> Launch:
  """The Mosaic GPU dK/dV kernel's fixed launch at a padded head size, as
  `mosaic_launch`'s."""
  return Launch(flash_hopper.DKV_BLOCK_Q, flash_hopper.dkv_block_k(head_dim),
                4 * flash_hopper.CONSUMERS, flash_hopper.STAGES)


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
  """Raises `ValueError` unless a Mosaic kernel (`"fwd"` or `"dkv"`) can
  serve the call with the given launch: its own, fixed one (`want`), so
  that no tile, warp or stage count passed is left unused."""
  if reason is not None:
    raise ValueError(f"flash: {kernel}_backend='mosaic' cannot serve this "
                     f"call: {reason}.")
  if launch != want:
    raise ValueError(
        f"flash: {kernel}_backend='mosaic' takes {kernel} tiles "
        f"{want.block_q} x {want.block_k} with {want.num_warps} warps and "
        f"{want.num_stages} stages at padded head size {head_dim} (its fixed "
        f"launch), got {launch}.")


def _compiler_params(launch: Launch, interpret: bool):
  if interpret:
    return None
  # jax >= 0.6 spells it `CompilerParams`; older ones `TritonCompilerParams`.
  cls = getattr(plgpu, "CompilerParams", None) or getattr(
      plgpu, "TritonCompilerParams")
  return cls(num_warps=launch.num_warps, num_stages=launch.num_stages)


def _clip(launch: Launch, q_len: int, kv_len: int) -> Launch:
  """Shrinks tiles to the (power-of-two rounded) sequence lengths."""
  fit = lambda block, n: min(block, max(MIN_BLOCK, _next_power_of_2(n)))
  return dataclasses.replace(launch, block_q=fit(launch.block_q, q_len),
                             block_k=fit(launch.block_k, kv_len))


# --- Static description of a call -------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about a call (the custom_vjp's non-diff argument)."""

  sm_scale: float
  softcap: float | None
  precision: Any
  causal: bool
  window: tuple[int, int] | None
  segments: bool
  mask: bool
  dropout_rate: float | None
  groups: int
  launch: LaunchConfig
  interpret: bool


def _next_power_of_2(n: int) -> int:
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pad_dim(d: int) -> int:
  return max(MIN_BLOCK, _next_power_of_2(d))


def _pad_axis(x, axis: int, size: int, mode: str = "constant", value=0):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  if mode == "edge":
    return jnp.pad(x, widths, mode="edge")
  return jnp.pad(x, widths, constant_values=value)


# --- Block skipping tables (XLA, O(B * S)) ------------------------------------


def _tile_min_max(x, valid, block: int):
  """Per-tile min and max of `x [B, S]` over `valid [B, S]` entries."""
  b, s = x.shape
  x = x.reshape(b, s // block, block)
  valid = valid.reshape(b, s // block, block)
  big = jnp.iinfo(jnp.int32).max
  lo = jnp.min(jnp.where(valid, x, big), axis=-1)
  hi = jnp.max(jnp.where(valid, x, -big), axis=-1)
  return lo, hi


def _tile_tables(st: _Static, aux, block_q: int, block_k: int):
  """`(maybe, full)`, bool `[B, nq, nk]`: whether tile (i, j) may hold a
  visible pair / certainly holds only visible pairs."""
  q_pos, kv_pos, kv_ok = aux["q_pos"], aux["kv_pos"], aux["kv_ok"] != 0
  q_all = jnp.ones(q_pos.shape, bool)
  qmin, qmax = _tile_min_max(q_pos, q_all, block_q)  # [B, nq]
  kmin, kmax = _tile_min_max(kv_pos, kv_ok, block_k)  # [B, nk]
  b, sk = kv_ok.shape
  ok = kv_ok.reshape(b, sk // block_k, block_k)
  k_any, k_all = jnp.any(ok, -1), jnp.all(ok, -1)
  qmin, qmax = qmin[:, :, None], qmax[:, :, None]
  kmin, kmax = kmin[:, None, :], kmax[:, None, :]
  maybe = jnp.broadcast_to(k_any[:, None, :], (b, qmin.shape[1],
                                               kmin.shape[2]))
  full = maybe & k_all[:, None, :]
  if st.causal:
    maybe &= kmin <= qmax
    full &= kmax <= qmin
  if st.window is not None:
    left, right = st.window
    maybe &= (kmax >= qmin - left) & (kmin <= qmax + right)
    full &= (kmin >= qmax - left) & (kmax <= qmin + right)
  if st.segments:
    sqmin, sqmax = _tile_min_max(aux["q_seg"], q_all, block_q)
    skmin, skmax = _tile_min_max(aux["kv_seg"], kv_ok, block_k)
    sqmin, sqmax = sqmin[:, :, None], sqmax[:, :, None]
    skmin, skmax = skmin[:, None, :], skmax[:, None, :]
    maybe &= (skmax >= sqmin) & (skmin <= sqmax)
    full &= (sqmin == sqmax) & (skmin == skmax) & (sqmin == skmin)
  if st.mask:
    full = jnp.zeros_like(full)
  return maybe, full & maybe


def _bounds(maybe, full):
  """`[B, n, m]` tables -> int32 `[B, n, 4]`: `(lo, flo, fhi, hi)` per row.

  Tiles `[lo, hi)` of the last axis may be visible; `[flo, fhi)` (inside it)
  are certainly fully visible and need no mask.
  """
  m = maybe.shape[-1]
  idx = jnp.arange(m)
  any_maybe = jnp.any(maybe, -1)
  lo = jnp.where(any_maybe, jnp.argmax(maybe, -1), 0)
  hi = jnp.where(any_maybe, m - jnp.argmax(maybe[..., ::-1], -1), 0)
  any_full = jnp.any(full, -1)
  flo = jnp.where(any_full, jnp.argmax(full, -1), hi)
  after = (idx >= flo[..., None]) & ~full
  fhi = jnp.where(jnp.any(after, -1), jnp.argmax(after, -1), m)
  fhi = jnp.where(any_full, fhi, hi)
  flo = jnp.clip(flo, lo, hi)
  fhi = jnp.clip(fhi, flo, hi)
  return jnp.stack([lo, flo, fhi, hi], -1).astype(jnp.int32)


# --- In-kernel helpers ------------------------------------------------------


def _dot(a, b, st: _Static, *, trans_a: bool = False, trans_b: bool = False):
  """A 2-D matmul with float32 accumulation (`a^T` / `b^T` when asked)."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=st.precision,
                         preferred_element_type=jnp.float32)


def _scores(st: _Static, q, k, bias, transposed: bool = False):
  """A tile's logits as `(s, scale, dcap)`: `s * scale` are the logits in
  base 2 (`logits * log2(e)`), `dcap` the soft cap's derivative (or None);
  `[bq, bk]`, or `[bk, bq]` when `transposed` (then `bias` must be
  transposed too).

  Without soft cap and bias, `s` is the raw `q k^T` and `scale` folds the
  softmax scale: the callers apply it in `_exp2`, one FMA with the
  subtraction of the row maximum or log-sum-exp, not a multiply of its own
  per element (`scale > 0`, so row maxima of `s` scale too).
  """
  if transposed:
    s = _dot(k, q, st, trans_b=True)  # [bk, bq] f32
  else:
    s = _dot(q, k, st, trans_b=True)  # [bq, bk] f32
  if st.softcap is None and bias is None:
    return s, st.sm_scale * LOG2E, None
  s = s * st.sm_scale
  dcap = None
  if st.softcap is not None:
    t = jnp.tanh(s * (1.0 / st.softcap))
    s = st.softcap * t
    dcap = 1.0 - t * t
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  return s * LOG2E, 1.0, dcap


def _exp2(s, scale: float, shift):
  """`2 ** (s * scale - shift)`, the multiply and subtraction one FMA."""
  return jnp.exp2(s * scale - shift if scale != 1.0 else s - shift)


def _outer(q_vec, kv_vec, transposed: bool):
  """`(q[:, None], kv[None, :])`, or the transposed pair."""
  if transposed:
    return q_vec[None, :], kv_vec[:, None]
  return q_vec[:, None], kv_vec[None, :]


def _visible(st: _Static, shape, q_pos, kv_pos, kv_ok, q_seg, kv_seg,
             mask, transposed: bool = False):
  """Bool `[bq, bk]` (`[bk, bq]` if `transposed`, with `mask` transposed
  too): the structured mask of a tile."""
  qp, kp = _outer(q_pos, kv_pos, transposed)
  qs = ks = None
  if st.segments:
    qs, ks = _outer(q_seg, kv_seg, transposed)
  vis = masks.pair_visible(_outer(q_pos, kv_ok, transposed)[1] != 0, qp, kp,
                           causal=st.causal, window=st.window, q_seg=qs,
                           kv_seg=ks)
  if mask is not None:
    vis = vis & (mask != 0)
  return jnp.broadcast_to(vis, shape)


def _keep(st: _Static, seed_ref, batch, head, q_pos, kv_pos,
          transposed: bool = False):
  """The library's dropout keep mask `[bq, bk]` (or `[bk, bq]`) of a tile."""
  seed = (seed_ref[0], seed_ref[1])
  batch = batch.astype(jnp.uint32) + seed_ref[2]
  head = head.astype(jnp.uint32) + seed_ref[3]
  qp, kp = _outer(q_pos, kv_pos, transposed)
  return dropout_lib.dropout_keep(seed, batch, head, qp, kp,
                                  st.dropout_rate)


def _tile_of(ref, q_slice, k_slice, head=None):
  """Loads the `[bq|1, bk|1]` tile of a broadcastable bias/mask block."""
  q_index = q_slice if ref.shape[-2] > 1 else slice(None)
  k_index = k_slice if ref.shape[-1] > 1 else slice(None)
  if head is None:
    return ref[q_index, k_index]
  return ref[head, q_index, k_index]


def _loops(bounds_ref, row, body, carry):
  """Runs `body(index, carry, masked)` over `[lo, flo)` and `[fhi, hi)`
  with masking and over `[flo, fhi)` without."""
  lo, flo = bounds_ref[row, 0], bounds_ref[row, 1]
  fhi, hi = bounds_ref[row, 2], bounds_ref[row, 3]
  masked = functools.partial(body, masked=True)
  carry = lax.fori_loop(lo, flo, masked, carry)
  carry = lax.fori_loop(flo, fhi, functools.partial(body, masked=False),
                        carry)
  return lax.fori_loop(fhi, hi, masked, carry)


# --- Kernels ------------------------------------------------------------------


def _forward_kernel(*refs, names, st: _Static, num_q_blocks: int):
  r = dict(zip(names, refs))
  launch = st.launch.fwd
  bq, bk = launch.block_q, launch.block_k
  i = num_q_blocks - 1 - pl.program_id(0)  # Heavy causal rows first.
  b, h = pl.program_id(1), pl.program_id(2)
  q = r["q"][...]  # [bq, Dp]
  q_pos = r["q_pos"][...]  # [bq]
  q_seg = r["q_seg"][...] if st.segments else None
  q_rows = pl.ds(0, bq)
  dv_pad = r["v"].shape[-1]

  def body(j, carry, masked):
    acc, m, l = carry
    ks = pl.multiple_of(j * bk, bk)
    kv = pl.ds(ks, bk)
    k = r["k"][kv, :]  # [bk, Dp]
    bias = _tile_of(r["bias"], q_rows, kv) if "bias" in r else None
    s, scale, _ = _scores(st, q, k, bias)  # [bq, bk]
    kv_pos = r["kv_pos"][kv]
    if masked:
      vis = _visible(st, s.shape, q_pos, kv_pos, r["kv_ok"][kv], q_seg,
                     r["kv_seg"][kv] if st.segments else None,
                     _tile_of(r["mask"], q_rows, kv) if st.mask else None)
      s = jnp.where(vis, s, MASK_VALUE)
    # The running maximum `m` is in base 2 (scaled), as are `lse` and `m_new`.
    m_new = jnp.maximum(m, jnp.max(s, axis=1) * scale)
    alpha = jnp.exp2(m - m_new)
    p = _exp2(s, scale, m_new[:, None])
    if masked:
      p = jnp.where(vis, p, 0.0)
    l = l * alpha + jnp.sum(p, axis=1)
    if st.dropout_rate is not None:
      keep = _keep(st, r["seed"], b, h, q_pos, kv_pos)
      p = jnp.where(keep, p * (1.0 / (1.0 - st.dropout_rate)), 0.0)
    v = r["v"][kv, :]  # [bk, Dvp]
    pv = _dot(p.astype(v.dtype), v, st)
    return acc * alpha[:, None] + pv, m_new, l

  init = (jnp.zeros((bq, dv_pad), jnp.float32),
          jnp.full((bq,), MASK_VALUE, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = _loops(r["bounds"], i, body, init)
  nonempty = l > 0.0
  safe_l = jnp.where(nonempty, l, 1.0)
  r["out"][...] = (acc / safe_l[:, None]).astype(r["out"].dtype)
  r["lse"][...] = jnp.where(nonempty, m * LN2 + jnp.log(safe_l), -jnp.inf)


def _dkdv_kernel(*refs, names, st: _Static):
  r = dict(zip(names, refs))
  launch = st.launch.dkv
  bq, bk = launch.block_q, launch.block_k
  j, b, hkv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k = r["k"][...]  # [bk, Dp]
  v = r["v"][...]  # [bk, Dvp]
  kv_pos = r["kv_pos"][...]
  kv_ok = r["kv_ok"][...]
  kv_seg = r["kv_seg"][...] if st.segments else None
  kv_cols = pl.ds(0, bk)

  def head(g, carry):
    h = hkv * st.groups + g
    bias_head = g if "bias" in r and r["bias"].shape[0] > 1 else 0
    mask_head = g if st.mask and r["mask"].shape[0] > 1 else 0

    def body(i, carry, masked):
      # Transposed tiles ([bk, bq]): every matmul takes loaded operands in
      # the layout it needs, no register tile is transposed.
      dk, dv = carry
      qs = pl.multiple_of(i * bq, bq)
      rows = pl.ds(qs, bq)
      q = r["q"][rows, g, :]  # [bq, Dp]
      do = r["do"][rows, g, :]  # [bq, Dvp]
      lse = r["lse"][g, rows]  # [bq], base 2
      delta = r["delta"][g, rows]
      q_pos = r["q_pos"][rows]
      bias = (_tile_of(r["bias"], rows, kv_cols, bias_head).T
              if "bias" in r else None)
      s, scale, dcap = _scores(st, q, k, bias, transposed=True)  # [bk, bq]
      p = _exp2(s, scale, lse[None, :])
      if masked:
        vis = _visible(st, s.shape, q_pos, kv_pos, kv_ok,
                       r["q_seg"][rows] if st.segments else None, kv_seg,
                       _tile_of(r["mask"], rows, kv_cols, mask_head).T
                       if st.mask else None, transposed=True)
        p = jnp.where(vis, p, 0.0)
      dp = _dot(v, do, st, trans_b=True)  # [bk, bq]
      p_applied = p
      if st.dropout_rate is not None:
        inv = 1.0 / (1.0 - st.dropout_rate)
        keep = _keep(st, r["seed"], b, h, q_pos, kv_pos, transposed=True)
        p_applied = jnp.where(keep, p * inv, 0.0)
        dp = jnp.where(keep, dp * inv, 0.0)
      dv = dv + _dot(p_applied.astype(do.dtype), do, st)  # [bk, Dvp]
      ds = p * (dp - delta[None, :])
      if dcap is not None:
        ds = ds * dcap
      ds = (ds * st.sm_scale).astype(q.dtype)
      dk = dk + _dot(ds, q, st)  # [bk, Dp]
      if st.launch.atomic_dq:
        plgpu.atomic_add(r["dq"], (rows, jnp.asarray(g, jnp.int32),
                                   slice(None)),
                         _dot(ds, k, st, trans_a=True))  # [bq, Dp]
      return dk, dv

    return _loops(r["bounds"], j, body, carry)

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  if st.groups == 1:
    dk, dv = head(0, init)
  else:
    dk, dv = lax.fori_loop(0, st.groups, head, init)
  r["dk"][...] = dk.astype(r["dk"].dtype)
  r["dv"][...] = dv.astype(r["dv"].dtype)


def _dq_kernel(*refs, names, st: _Static, num_q_blocks: int,
               write_ds: bool):
  """dQ, or (`write_ds`) the logits' gradient tiles for the bias."""
  r = dict(zip(names, refs))
  launch = st.launch.dq
  bq, bk = launch.block_q, launch.block_k
  i = num_q_blocks - 1 - pl.program_id(0)
  b, h = pl.program_id(1), pl.program_id(2)
  q = r["q"][...]
  do = r["do"][...]
  lse = r["lse"][...]
  delta = r["delta"][...]
  q_pos = r["q_pos"][...]
  q_seg = r["q_seg"][...] if st.segments else None
  q_rows = pl.ds(0, bq)

  def body(j, dq, masked):
    ks = pl.multiple_of(j * bk, bk)
    kv = pl.ds(ks, bk)
    k = r["k"][kv, :]
    v = r["v"][kv, :]
    kv_pos = r["kv_pos"][kv]
    bias = _tile_of(r["bias"], q_rows, kv) if "bias" in r else None
    s, scale, dcap = _scores(st, q, k, bias)
    p = _exp2(s, scale, lse[:, None])
    if masked:
      vis = _visible(st, s.shape, q_pos, kv_pos, r["kv_ok"][kv], q_seg,
                     r["kv_seg"][kv] if st.segments else None,
                     _tile_of(r["mask"], q_rows, kv) if st.mask else None)
      p = jnp.where(vis, p, 0.0)
    dp = _dot(do, v, st, trans_b=True)
    if st.dropout_rate is not None:
      keep = _keep(st, r["seed"], b, h, q_pos, kv_pos)
      dp = jnp.where(keep, dp * (1.0 / (1.0 - st.dropout_rate)), 0.0)
    ds = p * (dp - delta[:, None])
    if write_ds:
      r["ds"][:, kv] = ds
      return dq
    if dcap is not None:
      ds = ds * dcap
    ds = (ds * st.sm_scale).astype(k.dtype)
    return dq + _dot(ds, k, st)

  dq = jnp.zeros(q.shape, jnp.float32)
  if write_ds:
    # Every tile is written (invisible ones with zeros): no skipping.
    dq = lax.fori_loop(0, r["k"].shape[0] // bk,
                       functools.partial(body, masked=True), dq)
  else:
    dq = _loops(r["bounds"], i, body, dq)
    r["dq"][...] = dq.astype(r["dq"].dtype)


# --- Launch wrappers ----------------------------------------------------------


class _Call:
  """Collects the named inputs and outputs of one `pallas_call`."""

  def __init__(self):
    self.names, self.arrays, self.specs = [], [], []
    self.out_names, self.out_shapes, self.out_specs = [], [], []
    self.aliases = {}

  def input(self, name, array, block_shape, index_map):
    if array is None:
      return
    self.names.append(name)
    self.arrays.append(array)
    self.specs.append(pl.BlockSpec(block_shape, index_map))

  def output(self, name, shape, dtype, block_shape, index_map):
    self.out_names.append(name)
    self.out_shapes.append(jax.ShapeDtypeStruct(shape, dtype))
    self.out_specs.append(pl.BlockSpec(block_shape, index_map))

  def accumulator(self, name, array, block_shape, index_map):
    """An output that starts as `array` (aliased to it: the kernel adds
    into it); the kernel sees it as `name` (its input as `name + "_in"`)."""
    self.aliases[len(self.arrays)] = len(self.out_names)
    self.input(name + "_in", array, block_shape, index_map)
    self.output(name, array.shape, array.dtype, block_shape, index_map)

  def __call__(self, kernel, grid, launch: Launch, interpret: bool,
               name: str, **kwargs):
    fn = functools.partial(kernel, names=tuple(self.names + self.out_names),
                           **kwargs)
    return pl.pallas_call(
        fn, grid=grid, in_specs=self.specs, out_specs=self.out_specs,
        out_shape=self.out_shapes,
        compiler_params=_compiler_params(launch, interpret),
        input_output_aliases=self.aliases, interpret=interpret,
        name=name)(*self.arrays)


def _broadcast_block(shape, head_block, q_block, k_block, head_squeezed):
  """Block shape of a `[B|1, H|1, Sq|1, Sk|1]` array (bias or mask)."""
  _, hb, sq, sk = shape
  head = (None if head_squeezed else (head_block if hb > 1 else 1))
  return (None, head, q_block if sq > 1 else 1, k_block if sk > 1 else 1)


def _broadcast_index(shape, b, h, i, j):
  return (b if shape[0] > 1 else 0, h if shape[1] > 1 else 0,
          i if shape[2] > 1 else 0, j if shape[3] > 1 else 0)


def _add_structure(call: _Call, aux, st: _Static, q_block: int,
                   k_block: int, q_index, k_index):
  """The position / segment / validity vectors, tiled or whole."""
  call.input("q_pos", aux["q_pos"], (None, q_block), q_index)
  call.input("kv_pos", aux["kv_pos"], (None, k_block), k_index)
  call.input("kv_ok", aux["kv_ok"], (None, k_block), k_index)
  if st.segments:
    call.input("q_seg", aux["q_seg"], (None, q_block), q_index)
    call.input("kv_seg", aux["kv_seg"], (None, k_block), k_index)
  if st.dropout_rate is not None:
    call.input("seed", aux["seed"], (4,), lambda *_: (0,))


def _query_grid_call(st: _Static, q, k, v, bias, aux, bq: int,
                     bounds: str) -> tuple[_Call, Any]:
  """A `_Call` over the grid (query block, batch, head) with the inputs the
  forward and dQ kernels share: a query tile, its KV head's whole K/V, the
  structure vectors, bias and mask tiles and the tile-skipping bounds.

  Returns the call and the query block index map `qi` (heavy causal rows
  first).
  """
  q_len, d_pad = q.shape[1], q.shape[3]
  kv_len, dv_pad = k.shape[1], v.shape[-1]
  nq = q_len // bq
  groups = st.groups
  qi = lambda i: nq - 1 - i
  call = _Call()
  call.input("q", q, (None, bq, None, d_pad),
             lambda i, b, h: (b, qi(i), h, 0))
  call.input("k", k, (None, kv_len, None, d_pad),
             lambda i, b, h: (b, 0, h // groups, 0))
  call.input("v", v, (None, kv_len, None, dv_pad),
             lambda i, b, h: (b, 0, h // groups, 0))
  _add_structure(call, aux, st, bq, kv_len, lambda i, b, h: (b, qi(i)),
                 lambda i, b, h: (b, 0))
  if bias is not None:
    call.input("bias", bias,
               _broadcast_block(bias.shape, 1, bq, kv_len, True),
               lambda i, b, h: _broadcast_index(bias.shape, b, h, qi(i), 0))
  if st.mask:
    mask = aux["mask"]
    call.input("mask", mask,
               _broadcast_block(mask.shape, 1, bq, kv_len, True),
               lambda i, b, h: _broadcast_index(mask.shape, b, h, qi(i), 0))
  call.input("bounds", aux[bounds], (None, nq, 4), lambda i, b, h: (b, 0, 0))
  return call, qi


def _check_mosaic_dtype(name: str, dtype, inputs_dtype):
  """The Mosaic kernels write the inputs' dtype (`prepare`'s
  `float32_results` keeps them out of calls that want others)."""
  if dtype is not None and jnp.dtype(dtype) != jnp.dtype(inputs_dtype):
    raise ValueError(
        f"flash: the Mosaic GPU kernels write {jnp.dtype(inputs_dtype)}, not "
        f"{name}={jnp.dtype(dtype)}; prepare the call with "
        f"float32_results=True (which keeps it on the Triton kernels).")


def _mosaic_operands(st: _Static, q, aux):
  """The Hopper kernels' `Structure` and structure vectors."""
  structure = flash_hopper.Structure(
      sm_scale=st.sm_scale, softcap=st.softcap, causal=st.causal,
      window=st.window, segments=st.segments, groups=st.groups)
  q_names, kv_names = structure.vectors()
  batch, q_len = q.shape[:2]
  q_vectors = (jnp.stack([aux[name] for name in q_names], 1) if q_names
               else jnp.zeros((batch, 1, q_len), jnp.int32))
  kv_vectors = jnp.stack([aux[name] for name in kv_names], 1)
  return structure, q_vectors, kv_vectors


def _mosaic_forward(st: _Static, q, k, v, aux):
  """`_forward` through the Hopper kernel (`fwd_backend="mosaic"`)."""
  structure, q_vectors, kv_vectors = _mosaic_operands(st, q, aux)
  return flash_hopper.forward(structure, q, k, v, aux["bounds_fwd"],
                              q_vectors, kv_vectors)


def _forward(st: _Static, q, k, v, bias, aux, out_dtype=None):
  """`out [B, Sqp, H, Dvp]` (out_dtype, default q's) and natural-log
  `lse [B, H, Sqp]` (float32)."""
  if st.launch.fwd_backend == "mosaic":
    _check_mosaic_dtype("out_dtype", out_dtype, q.dtype)
    return _mosaic_forward(st, q, k, v, aux)
  batch, q_len, num_heads, _ = q.shape
  dv_pad = v.shape[-1]
  bq = st.launch.fwd.block_q
  nq = q_len // bq
  call, qi = _query_grid_call(st, q, k, v, bias, aux, bq, "bounds_fwd")
  call.output("out", (batch, q_len, num_heads, dv_pad), out_dtype or q.dtype,
              (None, bq, None, dv_pad), lambda i, b, h: (b, qi(i), h, 0))
  call.output("lse", (batch, num_heads, q_len), jnp.float32,
              (None, None, bq), lambda i, b, h: (b, h, qi(i)))
  out, lse = call(_forward_kernel, (nq, batch, num_heads), st.launch.fwd,
                  st.interpret, "flash_forward", st=st, num_q_blocks=nq)
  return out, lse


def _dkdv(st: _Static, q, k, v, bias, aux, do, lse2, delta, grad_dtype):
  batch, q_len, num_heads, d_pad = q.shape
  kv_len, num_kv_heads, dv_pad = k.shape[1], k.shape[2], v.shape[-1]
  bq, bk = st.launch.dkv.block_q, st.launch.dkv.block_k
  nk = kv_len // bk
  groups = st.groups
  call = _Call()
  call.input("q", q, (None, q_len, groups, d_pad),
             lambda j, b, hkv: (b, 0, hkv, 0))
  call.input("k", k, (None, bk, None, d_pad), lambda j, b, hkv: (b, j, hkv, 0))
  call.input("v", v, (None, bk, None, dv_pad), lambda j, b, hkv: (b, j, hkv, 0))
  call.input("do", do, (None, q_len, groups, dv_pad),
             lambda j, b, hkv: (b, 0, hkv, 0))
  call.input("lse", lse2, (None, groups, q_len), lambda j, b, hkv: (b, hkv, 0))
  call.input("delta", delta, (None, groups, q_len),
             lambda j, b, hkv: (b, hkv, 0))
  _add_structure(call, aux, st, q_len, bk, lambda j, b, hkv: (b, 0),
                 lambda j, b, hkv: (b, j))
  if bias is not None:
    call.input("bias", bias,
               _broadcast_block(bias.shape, groups, q_len, bk, False),
               lambda j, b, hkv: _broadcast_index(bias.shape, b, hkv, 0, j))
  if st.mask:
    mask = aux["mask"]
    call.input("mask", mask,
               _broadcast_block(mask.shape, groups, q_len, bk, False),
               lambda j, b, hkv: _broadcast_index(mask.shape, b, hkv, 0, j))
  call.input("bounds", aux["bounds_dkv"], (None, nk, 4),
             lambda j, b, hkv: (b, 0, 0))
  call.output("dk", k.shape, grad_dtype or k.dtype, (None, bk, None, d_pad),
              lambda j, b, hkv: (b, j, hkv, 0))
  call.output("dv", v.shape, grad_dtype or v.dtype, (None, bk, None, dv_pad),
              lambda j, b, hkv: (b, j, hkv, 0))
  if st.launch.atomic_dq:
    call.accumulator("dq", jnp.zeros(q.shape, jnp.float32),
                     (None, q_len, groups, d_pad),
                     lambda j, b, hkv: (b, 0, hkv, 0))
  return call(_dkdv_kernel, (nk, batch, num_kv_heads), st.launch.dkv,
              st.interpret, "flash_dkdv", st=st)


def _dq(st: _Static, q, k, v, bias, aux, do, lse2, delta, write_ds: bool,
        grad_dtype=None):
  batch, q_len, num_heads, d_pad = q.shape
  kv_len, dv_pad = k.shape[1], v.shape[-1]
  bq = st.launch.dq.block_q
  nq = q_len // bq
  call, qi = _query_grid_call(st, q, k, v, bias, aux, bq, "bounds_dq")
  call.input("do", do, (None, bq, None, dv_pad),
             lambda i, b, h: (b, qi(i), h, 0))
  call.input("lse", lse2, (None, None, bq), lambda i, b, h: (b, h, qi(i)))
  call.input("delta", delta, (None, None, bq),
             lambda i, b, h: (b, h, qi(i)))
  if write_ds:
    call.output("ds", (batch, num_heads, q_len, kv_len), jnp.float32,
                (None, None, bq, kv_len), lambda i, b, h: (b, h, qi(i), 0))
    name = "flash_dbias"
  else:
    call.output("dq", q.shape, grad_dtype or q.dtype, (None, bq, None, d_pad),
                lambda i, b, h: (b, qi(i), h, 0))
    name = "flash_dq"
  (result,) = call(_dq_kernel, (nq, batch, num_heads), st.launch.dq,
                   st.interpret, name, st=st, num_q_blocks=nq,
                   write_ds=write_ds)
  return result


def _sum_to(x, shape):
  """Sums `x` over the axes where `shape` broadcasts (has size 1)."""
  axes = tuple(a for a, (n, m) in enumerate(zip(x.shape, shape))
               if m == 1 and n != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _backward(st: _Static, q, k, v, bias, aux, out, lse, dout, dlse,
              grad_dtype=None):
  """Gradients of q, k, v (in grad_dtype, default their own) and bias (all
  padded)."""
  # delta = rowsum(dO * O) - dlse: d(loss)/d(logits) = p * (dp - delta).
  # One fused multiply-and-reduce over dO and O.
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32),
                  axis=-1).transpose(0, 2, 1)
  if dlse is not None:
    delta = delta - jnp.where(jnp.isneginf(lse), 0.0, dlse)
  lse2 = jnp.where(jnp.isneginf(lse), 0.0, lse * LOG2E)  # Empty rows: p = 0.
  dout = dout.astype(q.dtype)
  if st.launch.atomic_dq:
    dk, dv, dq = _dkdv(st, q, k, v, bias, aux, dout, lse2, delta, grad_dtype)
    dq = dq.astype(grad_dtype or q.dtype)
  elif st.launch.dkv_backend == "mosaic":
    _check_mosaic_dtype("grad_dtype", grad_dtype, k.dtype)
    structure, q_vectors, kv_vectors = _mosaic_operands(st, q, aux)
    dk, dv = flash_hopper.dkdv(structure, q, k, v, dout, lse2, delta,
                               aux["bounds_dkv"], q_vectors, kv_vectors)
    dq = _dq(st, q, k, v, bias, aux, dout, lse2, delta, write_ds=False,
             grad_dtype=grad_dtype)
  else:
    dk, dv = _dkdv(st, q, k, v, bias, aux, dout, lse2, delta, grad_dtype)
    dq = _dq(st, q, k, v, bias, aux, dout, lse2, delta, write_ds=False,
             grad_dtype=grad_dtype)
  dbias = None
  if bias is not None:
    ds = _dq(st, q, k, v, bias, aux, dout, lse2, delta, write_ds=True)
    dbias = _sum_to(ds, bias.shape).astype(bias.dtype)
  return dq, dk, dv, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, bias, aux):
  return _forward(st, q, k, v, bias, aux)


def _flash_fwd(st, q, k, v, bias, aux):
  out, lse = _forward(st, q, k, v, bias, aux)
  return (out, lse), (q, k, v, bias, aux, out, lse)


def _flash_bwd(st, residuals, cotangents):
  q, k, v, bias, aux, out, lse = residuals
  dout, dlse = cotangents
  dq, dk, dv, dbias = _backward(st, q, k, v, bias, aux, out, lse, dout, dlse)
  return dq, dk, dv, dbias, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --- Public entry points ------------------------------------------------------


class Prepared(NamedTuple):
  """A call made ready for the kernels: padded operands and static settings.

  Attributes:
    static: the call's static description (launches, features, dtype...).
    q: `[B, Sqp, H, Dp]`.
    k: `[B, Skp, Hkv, Dp]`.
    v: `[B, Skp, Hkv, Dvp]`.
    bias: `[B|1, H|1, Sqp|1, Skp|1]` or None.
    aux: the structure vectors (`[B, Sqp]` / `[B, Skp]` int32), dense mask,
      dropout seed and the tile-skipping bounds of each kernel.
    q_len, kv_len, head_dim, value_dim: Sq, Sk, D, Dv before padding.
  """

  static: _Static
  q: Any
  k: Any
  v: Any
  bias: Any
  aux: dict[str, Any]
  q_len: int
  kv_len: int
  head_dim: int
  value_dim: int


def prepare(inputs: AttentionInputs,
            dropout: dropout_lib.Dropout | None = None, *,
            sm_scale: float, softcap: float | None = None, precision=None,
            block_sizes: BlockSizes | None = None,
            launch: LaunchConfig | None = None,
            interpret: bool = False,
            float32_results: bool = False) -> Prepared:
  """Pads a call to whole tiles and builds its structure tables (XLA).

  Arguments as `flash_attention`'s, and `float32_results`: the caller will
  ask `forward_pass` and `backward_pass` for a float32 output and
  gradients (`out_dtype`, `grad_dtype`), which the Mosaic GPU kernels
  cannot write (they are then not chosen, and an error when `launch` asks
  for them). The result feeds `forward_pass` and `backward_pass`, the
  kernels without the `custom_vjp` (for callers that combine blocks
  themselves, like the ring's block kernel).
  """
  q, k, v, bias = inputs.query, inputs.key, inputs.value, inputs.bias
  vis = inputs.visibility
  dims = inputs.dims
  batch, q_len, kv_len = dims.batch, dims.q_len, dims.kv_len
  if not sm_scale > 0:  # The kernels scale row maxima (`_scores`).
    raise ValueError(f"flash: sm_scale must be positive, got {sm_scale!r}.")
  if max(dims.head_dim, dims.value_dim) > MAX_HEAD_DIM:
    raise ValueError(f"flash: head sizes must be at most {MAX_HEAD_DIM}, got "
                     f"D = {dims.head_dim}, Dv = {dims.value_dim}.")
  d_pad, dv_pad = _pad_dim(dims.head_dim), _pad_dim(dims.value_dim)
  call_traits = dict(
      dtype=q.dtype, head_dim=d_pad, value_dim=dv_pad,
      bias=bias is not None, mask=vis.mask is not None,
      dropout=dropout is not None, interpret=interpret, precision=precision)
  mosaic_reason = flash_hopper.unsupported_reason(**call_traits)
  if float32_results and q.dtype != jnp.float32:
    mosaic_reason = (
        f"it writes the inputs' {jnp.dtype(q.dtype)}, and the caller wants "
        f"float32 results")
  # The kernels with a Mosaic GPU version: its fixed launch, and the
  # `fa.BlockSizes` fields of the kernel's (Triton) tiles.
  mosaic = {"fwd": (mosaic_launch(d_pad), ("block_q", "block_k")),
            "dkv": (mosaic_dkv_launch(d_pad), ("block_q_dkv", "block_k_dkv"))}
  if launch is not None:
    check_launch_config(launch, block_sizes)
    for kernel, (fixed, _) in mosaic.items():
      if getattr(launch, f"{kernel}_backend") == "mosaic":
        _check_mosaic_launch(kernel, getattr(launch, kernel), fixed, d_pad,
                             mosaic_reason)
  else:
    capability = None if interpret else gpu.compute_capability()
    launch = launch_config(max(d_pad, dv_pad), block_sizes, vis.causal,
                           capability)
    for kernel, (fixed, fields) in mosaic.items():
      user_tiles = block_sizes is not None and any(
          getattr(block_sizes, field) is not None for field in fields)
      if _mosaic_by_default(capability, mosaic_reason, user_tiles, q_len,
                            kv_len, fixed):
        launch = dataclasses.replace(
            launch, **{kernel: fixed, f"{kernel}_backend": "mosaic"})
  # Triton tiles shrink to short calls; a Mosaic kernel's launch is fixed.
  launch = dataclasses.replace(launch, **{
      kernel: getattr(launch, kernel)
      if getattr(launch, f"{kernel}_backend", "triton") == "mosaic"
      else _clip(getattr(launch, kernel), q_len, kv_len)
      for kernel in ("fwd", "dkv", "dq")})
  q_mult = max(launch.fwd.block_q, launch.dkv.block_q, launch.dq.block_q)
  k_mult = max(launch.fwd.block_k, launch.dkv.block_k, launch.dq.block_k)
  q_pad, kv_pad = _round_up(q_len, q_mult), _round_up(kv_len, k_mult)

  def pad4(x, seq, dim):
    return _pad_axis(_pad_axis(x, 1, seq), 3, dim)

  qp, kp, vp = pad4(q, q_pad, d_pad), pad4(k, kv_pad, d_pad), pad4(
      v, kv_pad, dv_pad)
  if bias is not None:
    bias = masks.pad_broadcastable(bias, q_pad - q_len, kv_pad - kv_len, 0.0)

  # The structure, as O(B * S) vectors. Padded queries repeat the last real
  # one (tighter skipping tables); padded keys are invalid.
  kv_ok = jnp.broadcast_to(vis.kv_indices >= 0, (batch, kv_len))
  if vis.kv_lengths is not None:
    kv_ok = kv_ok & (vis.kv_indices[None, :] < vis.kv_lengths[:, None])
  aux = {
      "q_pos": _pad_axis(vis.q_positions.astype(jnp.int32), 1, q_pad, "edge"),
      "kv_pos": _pad_axis(vis.kv_positions.astype(jnp.int32), 1, kv_pad),
      "kv_ok": _pad_axis(kv_ok.astype(jnp.int32), 1, kv_pad),
  }
  if vis.has_segments:
    aux["q_seg"] = _pad_axis(vis.q_segment_ids.astype(jnp.int32), 1, q_pad,
                             "edge")
    aux["kv_seg"] = _pad_axis(vis.kv_segment_ids.astype(jnp.int32), 1,
                              kv_pad)
  if vis.mask is not None:
    aux["mask"] = masks.pad_broadcastable(vis.mask, q_pad - q_len,
                                          kv_pad - kv_len,
                                          False).astype(jnp.int8)
  if dropout is not None:
    aux["seed"] = jnp.concatenate([
        dropout.seed.astype(jnp.uint32),
        jnp.stack([dropout.batch_offset, dropout.head_offset]).astype(
            jnp.uint32)])
  if precision is not None and not isinstance(precision, lax.Precision):
    precision = lax.Precision(precision)
  st = _Static(
      sm_scale=float(sm_scale),
      softcap=None if softcap is None else float(softcap),
      precision=precision, causal=vis.causal, window=vis.window,
      segments=vis.has_segments, mask=vis.mask is not None,
      dropout_rate=None if dropout is None else float(dropout.rate),
      groups=dims.groups, launch=launch, interpret=bool(interpret))

  fwd_maybe, fwd_full = _tile_tables(st, aux, launch.fwd.block_q,
                                     launch.fwd.block_k)
  aux["bounds_fwd"] = _bounds(fwd_maybe, fwd_full)
  dq_maybe, dq_full = _tile_tables(st, aux, launch.dq.block_q,
                                   launch.dq.block_k)
  aux["bounds_dq"] = _bounds(dq_maybe, dq_full)
  dkv_maybe, dkv_full = _tile_tables(st, aux, launch.dkv.block_q,
                                     launch.dkv.block_k)
  aux["bounds_dkv"] = _bounds(dkv_maybe.swapaxes(1, 2),
                              dkv_full.swapaxes(1, 2))
  return Prepared(st, qp, kp, vp, bias, aux, q_len, kv_len, dims.head_dim,
                  dims.value_dim)


def _pad_rows(call: Prepared, x, axis: int, value=0.0):
  """Pads the query axis of an `[.., Sq, ..]` array to the tiles."""
  return _pad_axis(x, axis, call.q.shape[1], value=value)


def forward_pass(call: Prepared, out_dtype=None) -> KernelOutput:
  """The forward kernel alone (not differentiable).

  Returns:
    `KernelOutput(out [B, Sq, H, Dv] in out_dtype (default: q's), lse [B, H,
    Sq] float32, None)`; rows that see no key have out 0 and lse -inf.
  """
  out, lse = _forward(call.static, call.q, call.k, call.v, call.bias,
                      call.aux, out_dtype)
  return KernelOutput(out[:, :call.q_len, :, :call.value_dim],
                      lse[:, :, :call.q_len], None)


def backward_pass(call: Prepared, out, lse, dout, dlse=None,
                  grad_dtype=None):
  """The backward kernels alone, given the output and log-sum-exp of the
  rows (which may span more keys than this call's: a ring passes those of
  all its blocks, and gets this block's share of dq back).

  Args:
    call: from `prepare`.
    out: `[B, Sq, H, Dv]`, the rows' attention output.
    lse: `[B, H, Sq]` float32, their natural log-sum-exp (-inf if empty).
    dout: `[B, Sq, H, Dv]`, the output's cotangent.
    dlse: `[B, H, Sq]`, the log-sum-exp's cotangent, or None.
    grad_dtype: dtype of the gradients (default: the inputs').

  Returns:
    `(dq [B, Sq, H, D], dk [B, Sk, Hkv, D], dv [B, Sk, Hkv, Dv], dbias)`,
    with dbias None unless the call has a bias.
  """
  pad_q = lambda x: _pad_axis(_pad_rows(call, x, 1), 3, call.v.shape[3])
  out, dout = pad_q(out), pad_q(dout)
  lse = _pad_rows(call, lse, 2, value=-jnp.inf)
  if dlse is not None:
    dlse = _pad_rows(call, dlse, 2)
  dq, dk, dv, dbias = _backward(call.static, call.q, call.k, call.v,
                                call.bias, call.aux, out, lse, dout, dlse,
                                grad_dtype)
  if dbias is not None:
    dbias = dbias[..., :call.q_len if dbias.shape[-2] > 1 else 1,
                  :call.kv_len if dbias.shape[-1] > 1 else 1]
  return (dq[:, :call.q_len, :, :call.head_dim],
          dk[:, :call.kv_len, :, :call.head_dim],
          dv[:, :call.kv_len, :, :call.value_dim], dbias)


def flash_attention(inputs: AttentionInputs,
                    dropout: dropout_lib.Dropout | None = None, *,
                    sm_scale: float, softcap: float | None = None,
                    precision=None, block_sizes: BlockSizes | None = None,
                    launch: LaunchConfig | None = None,
                    interpret: bool = False) -> KernelOutput:
  """Fused attention (Pallas; Triton on GPU): a pure, differentiable function.

  Args:
    inputs: the canonical record: `query [B, Sq, H, D]`, `key [B, Sk, Hkv,
      D]`, `value [B, Sk, Hkv, Dv]`, optional `bias [B|1, H|1, Sq|1, Sk|1]`
      and the `Visibility` (any of causal, window, segments, kv lengths,
      positions, dense mask).
    dropout: a `Dropout` (the library's hash), or `None`.
    sm_scale: the softmax scale (positive).
    softcap: logits soft cap, or `None`.
    precision: matmul precision inside the kernels (`None`: Triton's default,
      TF32 for float32 inputs; `HIGHEST`: exact float32).
    block_sizes: `fa.BlockSizes` (fields `block_q`, `block_k`,
      `block_q_dkv`, `block_k_dkv`, `block_q_dq`, `block_k_dq`; powers of
      two >= 16) over the defaults for the head size.
    launch: a full `LaunchConfig` (tiles, warps, stages, `atomic_dq`) in
      place of the defaults; an error together with tiles in `block_sizes`.
    interpret: run the kernels in Pallas' interpreter (any backend).

  Returns:
    `KernelOutput(out [B, Sq, H, Dv], lse [B, H, Sq] float32, None)`; both
    are differentiable with respect to q, k, v and bias.
  """
  call = prepare(inputs, dropout, sm_scale=sm_scale, softcap=softcap,
                 precision=precision, block_sizes=block_sizes, launch=launch,
                 interpret=interpret)
  out, lse = _flash(call.static, call.q, call.k, call.v, call.bias, call.aux)
  out = out[:, :call.q_len, :, :call.value_dim]
  lse = lse[:, :, :call.q_len]
  return KernelOutput(out, lse, None)


def flash_reference(inputs: AttentionInputs,
                    dropout: dropout_lib.Dropout | None = None, *,
                    sm_scale: float, softcap: float | None = None
                    ) -> KernelOutput:
  """What `flash_attention` computes, as the library's float32 reference."""
  return reference.reference_attention(
      inputs.query, inputs.key, inputs.value, inputs.bias, inputs.visibility,
      dropout, sm_scale=sm_scale, softcap=softcap)

