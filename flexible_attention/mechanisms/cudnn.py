"""`cudnn`: NVIDIA cuDNN fused attention (GPU only)."""

from __future__ import annotations

import functools

from flexible_attention.kernels import cudnn as cudnn_kernel
from flexible_attention.kernels import gpu
from flexible_attention.mechanisms import base
from flexible_attention.mechanisms import registry


def _max_head_dim() -> int:
  """cuDNN's head-size limit: 256 from Hopper (compute capability 9.0) on."""
  capability = gpu.compute_capability()
  return 256 if capability is not None and capability >= 9.0 else 128


@registry.register_mechanism("cudnn")
class CudnnAttention(base.AttentionModule):
  """cuDNN flash attention via `jax.nn.dot_product_attention(implementation=
  "cudnn")`.

  Causal, sliding window, kv lengths and grouped-query heads go to cuDNN as
  native arguments, never as a dense bias. Refused with a clear error:
  float32, head sizes cuDNN rejects (D a multiple of 8, at most 256 on
  Hopper, 128 before; Dv == D), dropout (cuDNN's random numbers are not the
  library's hash), soft cap, segment ids, explicit positions and caches,
  dense masks (cuDNN turns them into a bias, under which a fully-masked row
  averages V instead of giving zeros), causal or windows when Sq != Sk
  (cuDNN aligns them top-left), windows with a right extent without causal,
  odd sequence lengths, `precision`, and non-GPU platforms.
  """

  capabilities = registry.Capabilities(
      platforms=("gpu",), dtypes=("bfloat16", "float16"), segments=False,
      positions=False, mask=False, softcap=False, dropout=False, lse=False,
      cache=False, precision=False,
      notes="causal/window need Sq == Sk; D % 8 == 0, D <= 256 (Hopper).")

  @classmethod
  def unsupported_reason(cls, request):
    reason = super().unsupported_reason(request)
    if reason is not None:
      return reason
    dims, features = request.dims, request.features
    if dims.head_dim % 8 or dims.head_dim > _max_head_dim():
      return (f"mechanism 'cudnn' needs a head size D that is a multiple of 8 "
              f"and at most {_max_head_dim()}, got D = {dims.head_dim}.")
    if dims.value_dim != dims.head_dim:
      return (f"mechanism 'cudnn' needs Dv == D, got D = {dims.head_dim}, "
              f"Dv = {dims.value_dim}.")
    if dims.q_len != dims.kv_len and features & {"causal", "window"}:
      return ("mechanism 'cudnn' aligns causal masks and windows top-left, "
              "which matches the library's bottom-right alignment only when "
              f"Sq == Sk; got Sq = {dims.q_len}, Sk = {dims.kv_len}.")
    window = request.window
    if window is not None and window[1] > 0 and "causal" not in features:
      return ("mechanism 'cudnn' supports a sliding window with a right "
              f"extent only together with causal, got window {window}.")
    if dims.q_len % 2 or dims.kv_len % 2:
      # Seen on H200 with jax 0.11.2: the fused backward rejects odd lengths
      # ("Unsupported sequence length"), with or without a bias.
      return ("mechanism 'cudnn' needs even sequence lengths (cuDNN's fused "
              f"backward rejects odd ones), got Sq = {dims.q_len}, Sk = "
              f"{dims.kv_len}.")
    return None

  @classmethod
  def make_kernel(cls, config, request):
    return functools.partial(cudnn_kernel.cudnn_attention,
                             sm_scale=config.scale)
