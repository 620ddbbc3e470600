"""Exact number formats of flash's Mosaic GPU kernels, in plain jnp.

- The fused backward's int32 fixed point (`LaunchConfig.deterministic_dq`):
  each query row's power-of-two scale (`fixed_point_scales`), computed by
  XLA before the kernel, and the kernel's conversion of a dQ share to
  int32 (`to_fixed_point`, by `round_to_int32`), whose sums do not depend
  on the order the programs' adds land in.
- Integer-to-float conversion without a conversion instruction for small
  integers (`small_int_to_float`: a split score_mod's key positions).

Each replaces a `cvt` (a quarter-rate instruction on sm_90, on the unit
that also runs the softmax's exp2) by a few full-rate float32 and int32
operations with the same result, bit for bit
(`tests/test_flash_fused_backward.py`).

Glossary of shapes:
- B: batch size; H, Hkv: query and key/value heads.
- Sqp, Skp: query and key lengths padded to whole tiles.
- Dp: the padded head size (64, 128 or 256).
"""

from __future__ import annotations

from jax import lax
import jax.numpy as jnp


# |every partial sum of a dQ row| * s <= 2^FIXED_POINT_BITS / MARGIN, under
# int32's 2^31 - 1; the margin covers the kernel's rounding of p and ds to
# 16 bits (a factor 1 + 2^-8 at most) and of its float32 sums.
FIXED_POINT_BITS = 31
FIXED_POINT_MARGIN = 17 / 16


def fixed_point_scales(k, v, do, delta, *, sm_scale: float, groups: int,
                       dropout_rate: float | None = None):
  """s, per query row a power of two that makes the fused backward's dQ
  sums exact in int32 (`LaunchConfig.deterministic_dq`).

  Each step of the fused backward adds its `[bq, Dp / 2]` share of dQ into
  an int32 dQ as `trunc(x s)` (TMA reduce-adds; integer addition is
  associative, so the bits do not depend on the order the programs land
  them), and dQ is the sum over `s`. For row i every partial sum over a
  set of keys J is bounded by

      B_i = sm_scale * max|k| * (||dO_i|| * max_j ||v_j|| / (1 - rate)
                                 + |delta_i|)

  (`|ds_ij| <= sm_scale p_ij (|dO_i . v_j| + |delta_i|)`, the soft cap's
  factor at most 1, `sum_j p_ij <= 1`; max over the row's KV head). With s
  = 2^(FIXED_POINT_BITS - ceil(log2 (FIXED_POINT_MARGIN B_i))) every sum
  stays within 2^31 / FIXED_POINT_MARGIN, inside int32, and the n
  truncations of a row's n steps cost at most `n / s`, under `n 2^-29
  B_i` (about `sqrt(n) 2^-30 B_i` in practice: their signs follow the
  shares'). B_i is loose where attention is diffuse (Cauchy-Schwarz on
  `dO_i . v_j`, and no cancellation between keys): on random rows, D =
  128, it is ~4000x the row's largest |dQ| at 16k keys, ~8500x at 64k, so
  the fixed point's summation error relative to the row's largest entry
  is ~5e-5 at 16k keys and ~4e-4 at 128k (growing about linearly with
  Sk), against ~1e-6 for float32 sums and 2^-9 ~ 2e-3 for bf16's rounding
  of dQ (`tests/test_flash_fused_backward.py::
  test_fixed_point_sums_stay_near_float32s`). A row whose bound is 0 gets
  s = 1 (its dQ is 0); one whose bound is not finite gets s = 0 (XLA then
  gives its dQ as NaN, as float32 sums of a non-finite term would).

  Args:
    k, v: `[B, Skp, Hkv, Dp]`.
    do: `[B, Sqp, H, Dp]`.
    delta: float32 `[B, H, Sqp]`, the backward's `rowsum(dO O)` (less the
      lse's cotangent).
    sm_scale: the softmax scale.
    groups: G = H // Hkv.
    dropout_rate: the dropout rate, or None.

  Returns:
    float32 `[B, H, Sqp]`: powers of two in `[2^-96, 2^127]`, or 0.
  """
  f32 = lambda x: x.astype(jnp.float32)
  k_max = jnp.max(jnp.abs(f32(k)), axis=(1, 3))  # [B, Hkv]
  v_norm = jnp.max(jnp.sqrt(jnp.sum(jnp.square(f32(v)), axis=-1)), axis=1)
  do_norm = jnp.sqrt(jnp.sum(jnp.square(f32(do)), axis=-1))  # [B, Sqp, H]
  per_head = lambda x: jnp.repeat(x, groups, axis=1)[..., None]  # [B, H, 1]
  keep = 1.0 - (dropout_rate or 0.0)
  bound = sm_scale * per_head(k_max) * (
      jnp.swapaxes(do_norm, 1, 2) * per_head(v_norm) / keep + jnp.abs(delta))
  exponent = jnp.clip(jnp.ceil(jnp.log2(FIXED_POINT_MARGIN * bound)), -96.0,
                      127.0)
  scale = jnp.exp2(FIXED_POINT_BITS - exponent)
  scale = jnp.where(bound > 0.0, scale, 1.0)
  return jnp.where(jnp.isfinite(bound), scale, 0.0)


_ROUNDING = 1.5 * 2.0**32  # x + it lies in [2^32, 2^33): a multiple of 2^9.
_MAGIC = 1.5 * 2.0**23  # n + it, for an integer |n| < 2^22, has n's bits.
_MAGIC_BITS = 0x4B400000  # _MAGIC's bits as an int32.


def round_to_int32(y):
  """`y` (float32, |y| < 2^31 - 2^9) rounded to the nearest int32 (ties to
  even), in five float32 and two int32 operations instead of one
  float-to-int conversion (16 a clock on sm_90 against 128 float32
  operations, and beside the step's exponentials on the same unit).

  `hi`, y rounded to a multiple of 2^9 (adding `_ROUNDING` and taking it
  off again, kept apart by an optimization barrier so that no compiler
  folds them), and `lo = y - hi` (exact, |lo| <= 2^8) each become an
  integer below 2^22 in magnitude (`hi 2^-9` and `round(lo)`) whose bits,
  added to `_MAGIC`, are `_MAGIC_BITS` plus it; the result is `2^9
  hi_int + lo_int`, computed in int32 (the products wrap; the result
  fits)."""
  hi = lax.optimization_barrier(y + jnp.float32(_ROUNDING)) - jnp.float32(
      _ROUNDING)
  lo = y - hi
  bits = lambda x: lax.bitcast_convert_type(x + jnp.float32(_MAGIC),
                                            jnp.int32)
  offset = (_MAGIC_BITS * 513 + 2**31) % 2**32 - 2**31  # As an int32.
  return (bits(hi * jnp.float32(2.0**-9)) * 512 + bits(lo)
          - jnp.int32(offset))


def to_fixed_point(x, scale):
  """The fused backward's int32 share of a dQ partial sum: `x * scale`
  (`scale` a row's power of two, `fixed_point_scales`) rounded to the
  nearest int32 (`round_to_int32`). `mosaic_bwd` calls it once
  (`benchmarks/fused_bwd_probe.py --fixed_point=fma` puts another in its
  place there)."""
  return round_to_int32(x * scale)


SMALL_INT = 2**22  # `small_int_to_float` is exact below it in magnitude.


def small_int_to_float(n):
  """int32 `n` (|n| < `SMALL_INT`) as float32, exactly, in one int32 and one
  float32 operation instead of a conversion (`cvt`, a quarter-rate
  instruction on sm_90, on the unit that also runs exp2): the bits of
  `n + _MAGIC_BITS` are those of the float `_MAGIC + n`."""
  return (lax.bitcast_convert_type(n + jnp.int32(_MAGIC_BITS), jnp.float32)
          - jnp.float32(_MAGIC))
