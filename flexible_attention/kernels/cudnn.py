"""cuDNN fused attention through `jax.nn.dot_product_attention`.

Maps the structured mask onto cuDNN's native arguments (causal, a left
sliding window, kv lengths, grouped-query heads) instead of materialising a
dense bias. cuDNN aligns its causal mask and window top-left, which equals the
library's bottom-right alignment only when Sq == Sk, so the mechanism accepts
those features only then (`mechanisms/cudnn.py` checks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flexible_attention.core.inputs import AttentionInputs
from flexible_attention.core.types import KernelOutput


def _nonempty_rows(inputs: AttentionInputs, is_causal: bool, window):
  """`[B, Sq]` bool: whether query `i` sees at least one key.

  Under the structures cuDNN is given (Sq == Sk when causal or windowed)
  query `i` sees keys `[lo, hi]` clipped to `[0, kv_length)`.
  """
  dims = inputs.dims
  i = jnp.arange(dims.q_len)[None, :]
  lo = i - window[0] if window is not None else jnp.zeros_like(i)
  if is_causal:
    hi = i
  elif window is not None:
    hi = i + window[1]
  else:
    hi = jnp.full_like(i, dims.kv_len - 1)
  length = inputs.visibility.kv_lengths
  length = (jnp.full((dims.batch,), dims.kv_len) if length is None else
            length)[:, None]
  return jnp.maximum(lo, 0) <= jnp.minimum(hi, jnp.minimum(length,
                                                            dims.kv_len) - 1)


def cudnn_attention(inputs: AttentionInputs, dropout=None, *,
                    sm_scale: float) -> KernelOutput:
  """Attention through cuDNN's fused kernel (a pure function).

  Args:
    inputs: the canonical record (`query [B, Sq, H, D]`, `key [B, Sk, Hkv,
      D]`, `value [B, Sk, Hkv, D]`, optional bias); its visibility may use
      causal, a window with no right extent unless causal, and kv lengths.
    dropout: must be `None` (cuDNN's dropout is not the library's hash).
    sm_scale: the softmax scale.

  Returns:
    `KernelOutput(out [B, Sq, H, D], None, None)`: cuDNN reports no float32
    log-sum-exp.
  """
  if dropout is not None:
    raise NotImplementedError("cudnn: dropout is not supported.")
  vis = inputs.visibility
  dims = inputs.dims
  window = vis.window
  # A window with no right extent implies causal; cuDNN wants both flags.
  is_causal = vis.causal or (window is not None and window[1] == 0)
  bias = inputs.bias
  if bias is not None:
    bias = jnp.broadcast_to(bias, bias.shape[:2] + (dims.q_len, dims.kv_len))
  out = jax.nn.dot_product_attention(
      inputs.query, inputs.key, inputs.value, bias=bias, scale=sm_scale,
      is_causal=is_causal, key_value_seq_lengths=vis.kv_lengths,
      local_window_size=None if window is None else (window[0], 0),
      implementation="cudnn")
  if vis.kv_lengths is not None or window is not None:
    # cuDNN leaves rows that see no key undefined; the semantics say zeros.
    nonempty = _nonempty_rows(inputs, is_causal, window)
    out = jnp.where(nonempty[:, :, None, None], out, 0).astype(out.dtype)
  return KernelOutput(out, None, None)
