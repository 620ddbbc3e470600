"""Combining attentions over disjoint key sets through their log-sum-exps.

If `out_i` and `lse_i` are the attention of the same queries over key sets
`K_i` that share no key, then over their union

  lse = log(sum_i exp(lse_i)),  out = sum_i exp(lse_i - lse) * out_i,

which equals one call over the concatenated keys (a row with no visible key
in any set keeps out 0 and lse -inf). The ring's steps, the decode kernels'
key splits and `fa.merge_attention` (cascade decoding, a shared prefix kept
once) all merge this one way.

Attention sinks (semantics step 6) are one more part of the same kind: a
key with logit `sinks[h]` and a zero value, i.e. out 0 and lse `sinks[h]`
(`merge_sinks`), merged once; `sink_gradient` is its gradient.

Glossary of shapes:
- B: batch size; Sq: queries; H: query heads; Dv: value head size.
- N: the number of partial results merged.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def part_weights(lses, total):
  """`exp(lse_i - total)`, 0 where `lse_i` is -inf (a set with no visible
  key), with `total` -inf-safe: the weight of a part in the merged result
  (its softmax weights scale by it too)."""
  safe = jnp.where(jnp.isneginf(total), 0.0, total)
  return jnp.where(jnp.isneginf(lses), 0.0, jnp.exp(lses - safe))


@jax.custom_jvp
def merge_stacked(outs: jax.Array, lses: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Merges partial results stacked on a leading axis, in float32.

  A row whose sets all hold no visible key (every lse -inf) keeps out 0 and
  lse -inf, and gets no gradient; a NaN part (a row that overflowed) makes
  the row NaN.

  The value takes two reductions over the parts, which XLA runs as one
  kernel each: a variadic one carrying each row's running `(max, sum of
  exponentials)` (the pair's combination is the merge's rule), then the
  weighted sum of the outputs. A reduction with its own combination has no
  derivative rule, so the derivative is that of the same merge written
  with `logsumexp` (`_merge_formula`).

  Args:
    outs: `[N, B, Sq, H, Dv]`.
    lses: `[N, B, H, Sq]`, natural log, -inf where a set has no visible key.

  Returns:
    `(out [B, Sq, H, Dv] float32, lse [B, H, Sq] float32)`.
  """
  lses = lses.astype(jnp.float32)

  def combine(a, b):
    (m1, s1), (m2, s2) = a, b
    m = jnp.maximum(m1, m2)
    safe = jnp.where(jnp.isneginf(m), 0.0, m)
    return m, s1 * jnp.exp(m1 - safe) + s2 * jnp.exp(m2 - safe)

  m, s = jax.lax.reduce((lses, jnp.ones_like(lses)),
                        (jnp.float32(-jnp.inf), jnp.float32(0.0)), combine,
                        (0,))
  total = jnp.where(s == 0.0, -jnp.inf, m + jnp.log(s))  # NaN stays NaN.
  return _weighted_sum(outs, lses, total), total


@merge_stacked.defjvp
def _merge_stacked_jvp(primals, tangents):
  return jax.jvp(_merge_formula, primals, tangents)


def _weighted_sum(outs, lses, total):
  """`sum_i exp(lse_i - total) out_i`: `[B, Sq, H, Dv]` float32."""
  weights = jnp.swapaxes(part_weights(lses, total[None]), 2, 3)[..., None]
  return jnp.sum(outs.astype(jnp.float32) * weights, axis=0)


def _merge_formula(outs, lses):
  """`merge_stacked` with `logsumexp`, differentiable: its derivative. The
  log-sum-exp of a row with no visible key is taken over zeros instead,
  then discarded, so no `log(0)` reaches the derivative."""
  lses = lses.astype(jnp.float32)
  empty = jnp.all(jnp.isneginf(lses), axis=0)
  total = jax.nn.logsumexp(jnp.where(empty[None], 0.0, lses), axis=0)
  total = jnp.where(empty, -jnp.inf, total)
  return _weighted_sum(outs, lses, total), total


def merge_pair(out, lse, other_out, other_lse):
  """Merges two float32 partial results (`[B, Sq, H, Dv]`, `[B, H, Sq]`);
  the ring's step, without stacking. A row empty in both keeps out 0 and
  lse -inf, and gets no gradient (as in `merge_stacked`)."""
  empty = jnp.isneginf(lse) & jnp.isneginf(other_lse)
  safe = lambda x: jnp.where(empty, 0.0, x)
  total = jnp.where(empty, -jnp.inf, jnp.logaddexp(safe(lse),
                                                    safe(other_lse)))
  to_out = lambda w: jnp.swapaxes(w, 1, 2)[..., None]  # [B,H,Sq]->[B,Sq,H,1]
  return (out * to_out(part_weights(lse, total)) +
          other_out * to_out(part_weights(other_lse, total)), total)


def merge_sinks(out, lse, sinks):
  """Merges the sink part (out 0, lse `sinks[h]`) into a result.

  Args:
    out: `[B, Sq, H, Dv]` float32 attention over the keys.
    lse: `[B, H, Sq]` their log-sum-exp (-inf for a row with no key).
    sinks: `[H]` sink logits.

  Returns:
    `(out [B, Sq, H, Dv], lse [B, H, Sq])` with the sink counted: an empty
    row keeps out 0 and gets lse `sinks[h]`. Differentiable.
  """
  sink = jnp.broadcast_to(sinks.astype(lse.dtype)[None, :, None], lse.shape)
  total = jnp.logaddexp(lse, sink)
  weight = part_weights(lse, total)  # [B, H, Sq]
  return out * jnp.swapaxes(weight, 1, 2)[..., None].astype(out.dtype), total


def sink_gradient(sinks, out, lse, dout, dlse=None):
  """The gradient of the sink logits from a call's output and cotangents.

  `dsinks[h] = -sum_{b, q} exp(sinks[h] - lse) * (rowsum(dout * out) -
  dlse)`: the sink's probability times the cotangent of its logit.

  Args:
    sinks: `[H]`.
    out: `[B, Sq, H, Dv]`, the output (sink counted).
    lse: `[B, H, Sq]`, the log-sum-exp (sink counted: finite).
    dout: `[B, Sq, H, Dv]`, the output's cotangent.
    dlse: `[B, H, Sq]`, the log-sum-exp's cotangent, or None.

  Returns:
    `dsinks [H]` in the dtype of `sinks`.
  """
  acc = jnp.promote_types(lse.dtype, jnp.float32)
  delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(acc), out.astype(acc))
  if dlse is not None:
    delta = delta - dlse.astype(acc)
  p_sink = jnp.exp(sinks.astype(acc)[None, :, None] - lse.astype(acc))
  return (-jnp.sum(p_sink * delta, axis=(0, 2))).astype(sinks.dtype)


def merge_attention(outputs: Sequence[jax.Array], lses: Sequence[jax.Array]
                    ) -> tuple[jax.Array, jax.Array]:
  """Combines attentions of the same queries over disjoint key sets.

  The result equals one attention call over the union of the keys (the
  sets must not share a key: a key in two sets counts twice). Each part is
  a mechanism's `attention_outputs` and its `lse` (`return_lse=True`).

  Args:
    outputs: a sequence of `[B, Sq, H, Dv]` arrays.
    lses: the matching sequence of `[B, H, Sq]` float32 log-sum-exps (-inf
      for a row with no visible key in that set).

  Returns:
    `(output [B, Sq, H, Dv], lse [B, H, Sq] float32)`; the output has the
    outputs' (promoted) dtype and is computed in float32.

  Raises:
    ValueError: no parts, a different number of outputs and lses, or
      shapes that do not match.
  """
  outputs, lses = tuple(outputs), tuple(lses)
  if not outputs or len(outputs) != len(lses):
    raise ValueError(
        f"merge_attention needs as many outputs as lses, at least one; got "
        f"{len(outputs)} outputs and {len(lses)} lses.")
  shape = jnp.shape(outputs[0])
  if len(shape) != 4:
    raise ValueError(f"outputs must be [B, Sq, H, Dv], got shape {shape}.")
  lse_shape = (shape[0], shape[2], shape[1])
  for i, (out, lse) in enumerate(zip(outputs, lses)):
    if jnp.shape(out) != shape:
      raise ValueError(f"outputs[{i}] has shape {jnp.shape(out)}, outputs[0] "
                       f"{shape}.")
    if jnp.shape(lse) != lse_shape:
      raise ValueError(f"lses[{i}] must be [B, H, Sq] = {lse_shape}, got "
                       f"{jnp.shape(lse)}.")
  dtype = jnp.result_type(*outputs)
  out, lse = merge_stacked(jnp.stack(outputs), jnp.stack(lses))
  return out.astype(dtype), lse
