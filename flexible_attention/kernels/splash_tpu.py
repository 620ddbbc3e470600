"""Splash attention: JAX's block-sparse Pallas TPU kernel behind the record.

`splash_attention` maps an `AttentionInputs` onto
`jax.experimental.pallas.ops.tpu.splash_attention` (forward, dQ and dK/dV
Pallas TPU kernels with their own `custom_vjp`). Splash takes one sequence
per call (`[H, S, D]`; vmapped here over the batch), a static mask object
from which it precomputes, per tile, whether the tile is empty (skipped),
full, or partial (masked in the kernel), optional segment ids (arrays), a
logit soft cap, grouped-query heads (`make_splash_mha` with fewer KV heads;
`make_splash_mqa` for one) and attention sinks. The mapping:

- static structure -> mask classes, with the library's bottom-right
  alignment as the classes' `offset = Sk - Sq` (query `i` sits at position
  `i + Sk - Sq`): causal -> `CausalMask`; a window `(l, r)` -> `LocalMask`
  (`(l, 0)` with causal); neither -> `FullMask`; one mask for every head
  (`MultiHeadMask`);
- segment ids -> `SegmentIds`; kv lengths and padded keys -> segment ids in
  which invalid keys get id -1 (`flash_tpu.segment_ids_with_valid_keys`);
- soft cap -> `attn_logits_soft_cap`; splash does not scale the logits, so
  the queries are multiplied by `sm_scale` first;
- sequences are padded to whole tiles (multiples of 128): padded queries
  are sliced away, padded keys hidden by causal or by the segment ids;
- queries that see no key: splash's masked logits are a finite mask value,
  so such a row would average V (or divide 0 by 0 when all its tiles are
  skipped). Every head gets a sink logit of half the mask value: it is
  exactly invisible (`exp` underflows to 0) next to any real logit, above
  every masked one, and its value is zero, so a row with no visible key
  comes out as 0 -- in the forward pass and in the gradients -- as the
  semantics say;
- the call's attention sinks (semantics step 6) are splash's own: passed
  in place of that sink logit (raised to it at least, which no real sink
  logit is below), they give the semantics' denominator and an empty row
  still comes out as 0; splash's backward gives their gradient.

The kernels need tiles that are multiples of 128 along both sequences;
head sizes are passed as they are (splash's own tests use 128 and 256).

Glossary of shapes:
- B: batch size.
- Sq, Sk: query and key lengths; Sqp, Skp: padded to whole tiles.
- H, Hkv: query and key/value heads.
- D, Dv: query/key and value head sizes.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask)
import jax.numpy as jnp

from flexible_attention.core.inputs import AttentionInputs
from flexible_attention.core.types import BlockSizes
from flexible_attention.core.types import KernelOutput
from flexible_attention.kernels.flash_tpu import check_block
from flexible_attention.kernels.flash_tpu import padded_length
from flexible_attention.kernels.flash_tpu import segment_ids_with_valid_keys
from flexible_attention.kernels.flash.structure import pad_axis

# The fa.BlockSizes fields splash reads, and the splash field of each.
BLOCK_FIELDS = {"block_q": "block_q", "block_k": "block_kv",
                "block_q_dkv": "block_q_dkv", "block_k_dkv": "block_kv_dkv",
                "block_q_dq": "block_q_dq", "block_k_dq": "block_kv_dq"}
_Q_FIELDS = ("block_q", "block_q_dkv", "block_q_dq")
_KV_FIELDS = ("block_k", "block_k_dkv", "block_k_dq")
# Default tile: the largest of these dividing the padded sequence.
DEFAULT_BLOCKS = (512, 256, 128)
MASK_VALUE = splash_kernel.DEFAULT_MASK_VALUE
# The sink logit: above every masked logit, invisible next to a real one.
SINK_VALUE = MASK_VALUE / 2


def check_block_sizes(block_sizes: BlockSizes):
  """Raises `ValueError` for tile sizes splash cannot use."""
  for field in BLOCK_FIELDS:
    reason = check_block(field, getattr(block_sizes, field))
    if reason is not None:
      raise ValueError(f"splash: {reason}")


def _plan(block_sizes: BlockSizes | None, q_len: int, kv_len: int):
  """The splash `BlockSizes` and the padded lengths `(Sqp, Skp)`."""
  block_sizes = block_sizes or BlockSizes()
  chosen = {}
  lengths = []
  for fields, length in ((_Q_FIELDS, q_len), (_KV_FIELDS, kv_len)):
    given = [getattr(block_sizes, f) for f in fields]
    padded = padded_length(length, [b for b in given if b is not None])
    default = next(b for b in DEFAULT_BLOCKS if padded % b == 0)
    for field, value in zip(fields, given):
      chosen[BLOCK_FIELDS[field]] = default if value is None else value
    lengths.append(padded)
  return splash_kernel.BlockSizes(**chosen), lengths[0], lengths[1]


def static_mask(q_len: int, kv_len: int, padded_shape: tuple[int, int],
                causal: bool, window: tuple[int, int] | None):
  """The splash mask object of the static structure (one head).

  Args:
    q_len, kv_len: the real Sq, Sk (they set the bottom-right offset).
    padded_shape: `(Sqp, Skp)`, the mask's shape.
    causal: the record's causal flag.
    window: the record's `(left, right)` window or `None`.

  Returns:
    A `CausalMask`, `LocalMask` or `FullMask` in which query `i` sits at
    position `i + Sk - Sq`.
  """
  offset = kv_len - q_len
  if window is not None:
    left, right = window
    return splash_mask.LocalMask(padded_shape,
                                 (left, 0 if causal else right), offset)
  if causal:
    return splash_mask.CausalMask(padded_shape, offset=offset)
  return splash_mask.FullMask(padded_shape)


@functools.lru_cache(maxsize=64)
def _make_kernel(q_len, kv_len, padded_shape, causal, window, num_heads,
                 mqa, blocks, softcap, interpret):
  """Splash's kernel object for one static configuration.

  Cached, because building it walks the mask tile by tile in numpy; its
  tile tables are made as concrete arrays even when called under a trace
  (`ensure_compile_time_eval`), so the cached object never holds a tracer.
  """
  mask = static_mask(q_len, kv_len, padded_shape, causal, window)
  make = splash_kernel.make_splash_mqa if mqa else splash_kernel.make_splash_mha
  with jax.ensure_compile_time_eval():
    return make(splash_mask.MultiHeadMask([mask] * num_heads),
                block_sizes=blocks, head_shards=1, q_seq_shards=1,
                attn_logits_soft_cap=softcap, mask_value=MASK_VALUE,
                interpret=interpret)


def splash_attention(inputs: AttentionInputs, dropout=None, *,
                     sm_scale: float, softcap: float | None = None,
                     block_sizes: BlockSizes | None = None,
                     interpret: bool = False) -> KernelOutput:
  """Attention through JAX's splash kernel (a pure function).

  Args:
    inputs: the canonical record; its visibility may use causal, a window,
      segment ids and kv lengths (default positions); no bias or dense mask
      (`mechanisms/splash.py` refuses them before this is called); its
      `sinks [H]`, if any, differentiable.
    dropout: must be `None`.
    sm_scale: the softmax scale.
    softcap: `c` of `c * tanh(s / c)`, or `None`.
    block_sizes: `fa.BlockSizes`; `block_q`/`block_k` tile the forward
      pass, `block_q_dkv`/`block_k_dkv` the dK/dV pass and `block_q_dq`/
      `block_k_dq` the dQ pass (multiples of 128; default: the largest of
      512, 256, 128 that divides the padded sequence).
    interpret: run the kernels in Pallas' interpreter (any backend).

  Returns:
    `KernelOutput(out [B, Sq, H, Dv], None, None)`: the log-sum-exp is
    splash's residual only.
  """
  vis = inputs.visibility
  if dropout is not None or inputs.bias is not None or vis.mask is not None:
    raise NotImplementedError("splash: dropout, bias and dense masks are not "
                              "supported.")
  dims = inputs.dims
  sq, sk = dims.q_len, dims.kv_len
  blocks, q_len_padded, kv_len_padded = _plan(block_sizes, sq, sk)
  mqa = dims.num_kv_heads == 1
  kernel = _make_kernel(sq, sk, (q_len_padded, kv_len_padded), vis.causal,
                        vis.window, dims.num_heads, mqa, blocks, softcap,
                        interpret)

  # Splash does not scale the logits: scale the queries.
  query = (inputs.query.astype(jnp.float32) * sm_scale).astype(
      inputs.query.dtype)
  q = pad_axis(jnp.swapaxes(query, 1, 2), 2, q_len_padded)  # [B, H, Sqp, D]

  def kv_layout(x):  # [B, Sk, Hkv, d] -> [B, Hkv, Skp, d] or [B, Skp, d].
    x = pad_axis(jnp.swapaxes(x, 1, 2), 2, kv_len_padded)
    return x[:, 0] if mqa else x

  k, v = kv_layout(inputs.key), kv_layout(inputs.value)
  # Causal (and a causal window) hides the padded keys from real queries.
  ids = segment_ids_with_valid_keys(vis, q_len_padded, kv_len_padded,
                                    mask_padded_keys=not vis.causal)
  segment_ids = None if ids is None else splash_kernel.SegmentIds(*ids)
  sinks = jnp.full((dims.num_heads,), SINK_VALUE, jnp.float32)
  if inputs.sinks is not None:  # [H] logits: splash's own sinks.
    sinks = jnp.maximum(inputs.sinks.astype(jnp.float32), sinks)

  def one_row(q, k, v, segment_ids):
    return kernel(q, k, v, segment_ids=segment_ids, sinks=sinks)

  out = jax.vmap(one_row)(q, k, v, segment_ids)  # [B, H, Sqp, Dv]
  out = jnp.swapaxes(out[:, :, :sq], 1, 2)  # [B, Sq, H, Dv]
  return KernelOutput(out, None, None)
