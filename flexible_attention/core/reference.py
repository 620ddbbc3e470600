"""The semantics as dense code: logits, masked softmax and the reference.

`logits` and `masked_softmax` are the two steps every XLA-level kernel shares
(the dense kernel here, the blockwise kernel per tile). `dense_attention`
composes them over the whole problem; `reference_attention` is the same
function in float32 at the highest matmul precision: the oracle of every test
and of `fa.compare_attentions`, and (at the caller's dtype) the body of the
`vanilla` mechanism.

Glossary of shapes:
- B: batch size.
- Sq, Sk: query and key sequence lengths.
- H, Hkv: query heads and key/value heads; G = H // Hkv.
- D, Dv: query/key and value head sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flexible_attention.core import dropout as dropout_lib
from flexible_attention.core import masks
from flexible_attention.core import mods as mods_lib
from flexible_attention.core.types import KernelOutput

# A finite stand-in for -inf: masked logits use it so that no NaN can appear,
# neither in the forward pass nor in gradients.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def accumulation_dtype(dtype, softmax_dtype=jnp.float32):
  """The dtype logits, softmax statistics and outputs accumulate in:
  `softmax_dtype` (float32), or float64 for float64 inputs (with
  `jax_enable_x64`), which float32 would round."""
  return jnp.promote_types(dtype, softmax_dtype)


def logits(q, k, bias, *, sm_scale: float, softcap: float | None, precision,
           softmax_dtype):
  """Scaled, soft-capped and biased logits (semantics steps 1-3).

  Args:
    q: `[B, Sq, Hkv, G, D]` queries in the grouped layout.
    k: `[B, Sk, Hkv, D]`.
    bias: `[B|1, Hkv|1, G|1, Sq|1, Sk|1]` or `None`.
    sm_scale: the softmax scale.
    softcap: `c` of `c * tanh(s / c)`, or `None`.
    precision: matmul precision.
    softmax_dtype: accumulation dtype (float32; float64 for float64 inputs,
      `accumulation_dtype`).

  Returns:
    `(s, dcap)`: logits `[B, Hkv, G, Sq, Sk]` in the accumulation dtype, and the
    derivative of the soft cap with respect to its input (`None` without a
    soft cap), which backward passes need.
  """
  acc = accumulation_dtype(q.dtype, softmax_dtype)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, precision=precision,
                 preferred_element_type=acc)
  s = s * jnp.asarray(sm_scale, acc)
  dcap = None
  if softcap is not None:
    t = jnp.tanh(s / softcap)
    s = softcap * t
    dcap = 1.0 - t * t
  if bias is not None:
    s = s + bias.astype(acc)
  return s, dcap


def masked_softmax(s, visible, sink=None):
  """Softmax over visible keys; a row with no visible key gives zeros.

  Args:
    s: `[..., Sq, Sk]` logits.
    visible: bool, broadcastable to `s`.
    sink: the sink logit, broadcastable to `[..., 1, 1]`, or None: the
      denominator gains `exp(sink)` (a key with a zero value).

  Returns:
    `(p, lse)`: probabilities like `s` and the log-sum-exp `[..., Sq]`
    (`-inf` for empty rows; with a sink, it counts the sink: the sink's
    logit for empty rows).
  """
  s = jnp.where(visible, s, MASK_VALUE)
  # The shift cancels out of p and lse, so it needs no gradient; stopping it
  # also avoids max's JVP, which divides by the number of entries equal to
  # the maximum: 0 (NaN gradients) when XLA recomputes `s` in two fusions
  # with different rounding.
  m = jnp.maximum(jnp.max(s, axis=-1, keepdims=True), MASK_VALUE)
  if sink is not None:
    m = jnp.maximum(m, sink)
  m = jax.lax.stop_gradient(m)
  e = jnp.where(visible, jnp.exp(s - m), 0.0)
  l = jnp.sum(e, axis=-1, keepdims=True)
  if sink is not None:
    l = l + jnp.exp(sink - m)
  p = e / jnp.where(l > 0, l, 1.0)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  return p, lse[..., 0]


def group_query(q, num_kv_heads: int):
  """`[B, Sq, H, D]` -> `[B, Sq, Hkv, G, D]`."""
  b, sq, h, d = q.shape
  return q.reshape(b, sq, num_kv_heads, h // num_kv_heads, d)


def dense_attention(query, key, value, bias, visibility: masks.Visibility,
                    dropout: dropout_lib.Dropout | None = None, *,
                    sm_scale: float, softcap: float | None = None,
                    precision=None, softmax_dtype=jnp.float32,
                    return_weights: bool = False,
                    sinks=None, mods: mods_lib.Mods | None = None
                   ) -> KernelOutput:
  """Attention over the whole score matrix at once (a pure function).

  Args:
    query: `[B, Sq, H, D]`.
    key: `[B, Sk, Hkv, D]`.
    value: `[B, Sk, Hkv, Dv]`.
    bias: `[B|1, H|1, Sq|1, Sk|1]` or `None`.
    visibility: the structured mask of the call.
    dropout: a `Dropout`, or `None` for none.
    sm_scale, softcap, precision, softmax_dtype: see `logits`.
    return_weights: also return the applied probabilities.
    sinks: `[H]` sink logits, or None: head h's denominator gains
      `exp(sinks[h])` (semantics step 6; the weights then sum to less than
      one, and lse counts the sink).
    mods: the call's `Mods` or None: `score_mod` rewrites the logits after
      soft cap and bias, `mask_mod` and-s into `visibility` (differentiable
      with respect to `mods.args`).

  Returns:
    `KernelOutput(out [B, Sq, H, Dv] in query.dtype, lse [B, H, Sq],
    weights [B, H, Sq, Sk] or None)`; lse and weights in float32 (float64
    for float64 inputs).
  """
  batch, q_len, num_heads, _ = query.shape
  num_kv_heads = key.shape[2]
  groups = num_heads // num_kv_heads
  s, _ = logits(group_query(query, num_kv_heads), key,
                masks.group_heads(bias, num_kv_heads), sm_scale=sm_scale,
                softcap=softcap, precision=precision,
                softmax_dtype=softmax_dtype)  # [B, Hkv, G, Sq, Sk]
  visible = masks.group_heads(visibility.dense(), num_kv_heads)
  if mods is not None:
    positions = (visibility.q_positions, visibility.kv_positions)
    s = mods.score_grouped(s, *positions)
    if mods.mask_mod is not None:
      visible = visible & mods.visible_grouped(batch, num_kv_heads, groups,
                                               *positions)
  sink = None
  if sinks is not None:
    sink = sinks.astype(s.dtype).reshape(num_kv_heads, groups, 1, 1)
  p, lse = masked_softmax(s, visible, sink)
  if dropout is not None:
    keep = dropout_lib.keep_grouped(dropout, visibility.q_positions,
                                    visibility.kv_positions, num_kv_heads,
                                    groups)
    p = jnp.where(keep, p / (1.0 - dropout.rate), 0.0)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(value.dtype), value,
                   precision=precision,
                   preferred_element_type=accumulation_dtype(value.dtype,
                                                             softmax_dtype))
  out = out.reshape(batch, q_len, num_heads, value.shape[-1])
  weights = None
  if return_weights:
    weights = p.reshape(batch, num_heads, q_len, key.shape[1])
  return KernelOutput(out.astype(query.dtype),
                      lse.reshape(batch, num_heads, q_len), weights)


def reference_attention(query, key, value, bias, visibility: masks.Visibility,
                        dropout: dropout_lib.Dropout | None = None, *,
                        sm_scale: float, softcap: float | None = None,
                        return_weights: bool = False,
                        sinks=None, mods=None) -> KernelOutput:
  """The float32 oracle: `dense_attention` on float32 inputs, HIGHEST precision.

  Arguments as `dense_attention`; the outputs are float32 (float64 inputs,
  with `jax_enable_x64`, are kept and computed in float64).
  """
  f32 = lambda x: None if x is None else x.astype(
      accumulation_dtype(x.dtype))
  return dense_attention(
      f32(query), f32(key), f32(value), f32(bias), visibility, dropout,
      sm_scale=sm_scale, softcap=softcap,
      precision=jax.lax.Precision.HIGHEST, softmax_dtype=jnp.float32,
      return_weights=return_weights, sinks=f32(sinks), mods=mods)
