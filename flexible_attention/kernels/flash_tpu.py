"""Flash attention on TPU: JAX's Pallas TPU kernel behind the library's record.

`flash_attention` maps an `AttentionInputs` onto
`jax.experimental.pallas.ops.tpu.flash_attention.flash_attention` (forward
and backward Pallas TPU kernels with their own `custom_vjp`). That kernel
offers an additive bias `ab` (with its gradient), segment ids, a causal mask
aligned top-left, `sm_scale` and tile sizes that must be multiples of 128
dividing the sequences; it has no grouped-query heads, windows, soft cap,
dropout or positions. The mapping:

- layout: `[B, S, H, D]` -> the kernel's `[B, H, S, D]`;
- grouped-query heads without causal: the `G` query heads of a KV head are
  folded into the query sequence (`[B, Hkv, G * Sq, D]`), so K/V are never
  repeated; with causal the fold would shift the row index the causal mask
  reads, so `mechanisms/flash.py` refuses that combination on TPU;
- causal: top-left equals the library's bottom-right alignment only when
  Sq == Sk (other lengths are refused);
- kv lengths and padded keys: segment ids in which invalid keys get id -1
  (user segment ids are first renumbered to dense ranks >= 0,
  `segment_ids_with_valid_keys`);
- sequences are padded to whole tiles and head sizes above 128 to a
  multiple of 128 (zeros: q.k and p.v are unchanged; Dv != D is padded to
  the larger of the two), and the padding is sliced away;
- the bias is broadcast to `[B, H, Sq, Sk]` (the kernel reads full tiles of
  it) and, because the kernel adds `ab` before scaling, the queries are
  scaled first and the kernel's `sm_scale` is 1;
- queries that see no key: the kernel's additive mask leaves them a softmax
  over masked keys, so their rows are zeroed from the structure
  (`rows_see_a_key`), as the semantics say.

The helpers for padding and for key validity as segment ids are shared with
`kernels/splash_tpu.py`.

On CPU the kernel runs under `pltpu.force_tpu_interpret_mode()` (tests);
the mechanism selects it when the call's platform is "tpu".

Glossary of shapes:
- B: batch size.
- Sq, Sk: query and key lengths; Sqp, Skp: padded to whole tiles.
- H, Hkv: query and key/value heads; G = H // Hkv.
- D, Dv: query/key and value head sizes; Dp: the padded common head size.
"""

from __future__ import annotations

import math

import jax
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
import jax.numpy as jnp

from flexible_attention.core.inputs import AttentionInputs
from flexible_attention.core.masks import Visibility
from flexible_attention.core.types import BlockSizes
from flexible_attention.core.types import KernelOutput
from flexible_attention.kernels.flash.structure import pad_axis
from flexible_attention.kernels.flash.structure import round_up

LANES = 128  # TPU vector lanes: tiles and head sizes are multiples of it.
DEFAULT_BLOCK = 128  # JAX's default for every tile of this kernel.


# --- Helpers shared with splash_tpu -------------------------------------------


def padded_length(length: int, blocks) -> int:
  """`length` rounded up to a multiple of every tile size in `blocks`."""
  return round_up(length, math.lcm(LANES, *blocks))


def check_block(name: str, value: int | None) -> str | None:
  """Why a tile size cannot serve the TPU kernels (None when it can)."""
  if value is not None and value % LANES:
    return (f"BlockSizes.{name} must be a multiple of {LANES} for the TPU "
            f"kernels, got {value}.")
  return None


def _dense_ranks(q_ids, kv_ids):
  """Renumbers `[B, Sq]`, `[B, Sk]` ids to ranks >= 0, keeping equalities."""
  table = jnp.sort(jnp.concatenate([q_ids, kv_ids], axis=1), axis=1)
  rank = jax.vmap(lambda t, x: jnp.searchsorted(t, x).astype(jnp.int32))
  return rank(table, q_ids), rank(table, kv_ids)


def segment_ids_with_valid_keys(vis: Visibility, q_len_padded: int,
                                kv_len_padded: int, *,
                                mask_padded_keys: bool):
  """Segment ids that also carry key validity, for kernels with only ids.

  A key is invalid when `kv_lengths` excludes it or, with
  `mask_padded_keys`, when it is a padding slot past Sk; invalid keys get id
  -1, which no query has (user ids are renumbered to dense ranks >= 0
  first). Padded query rows get id 0 (their outputs are sliced away).

  Args:
    vis: the record's visibility (segment ids, kv lengths, kv indices).
    q_len_padded: Sqp.
    kv_len_padded: Skp.
    mask_padded_keys: whether padded keys must be made invisible by the ids
      (False when the static mask already hides them from real queries).

  Returns:
    `(q_ids [B, Sqp], kv_ids [B, Skp])` int32, or `None` when the call
    needs neither segments nor key validity.
  """
  batch, q_len = vis.q_positions.shape
  kv_len = vis.kv_indices.shape[0]
  needs_validity = vis.kv_lengths is not None or (
      mask_padded_keys and kv_len_padded > kv_len)
  if not vis.has_segments and not needs_validity:
    return None
  if vis.has_segments:
    q_ids, kv_ids = vis.q_segment_ids, vis.kv_segment_ids
    if needs_validity:
      q_ids, kv_ids = _dense_ranks(q_ids, kv_ids)
  else:
    q_ids = jnp.zeros((batch, q_len), jnp.int32)
    kv_ids = jnp.zeros((batch, kv_len), jnp.int32)
  q_ids = pad_axis(q_ids, 1, q_len_padded)
  kv_ids = pad_axis(kv_ids, 1, kv_len_padded)
  if needs_validity:
    # [1, Skp]
    index = pad_axis(vis.kv_indices, 0, kv_len_padded, value=-1)[None]
    valid = index >= 0
    if vis.kv_lengths is not None:
      valid = valid & (index < vis.kv_lengths[:, None])
    kv_ids = jnp.where(valid, kv_ids, -1)
  return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def rows_see_a_key(q_ids, kv_ids, last_key=None):
  """bool `[B, Sq]`: whether query `i` has a key `j <= last_key[i]` with the
  same id (`kv_ids [B, Sk]`; `last_key [Sq]` or None for all keys).

  O((Sq + Sk) log Sk): a stable sort of the key ids finds, for each query,
  the first key of its id, which is visible iff it is not past `last_key`.
  """
  kv_len = kv_ids.shape[1]

  def one_row(q, kv):
    order = jnp.argsort(kv, stable=True)
    sorted_ids = kv[order]
    at = jnp.searchsorted(sorted_ids, q)
    clipped = jnp.minimum(at, kv_len - 1)
    found = (at < kv_len) & (sorted_ids[clipped] == q)
    if last_key is not None:
      found = found & (order[clipped] <= last_key)
    return found

  return jax.vmap(one_row)(q_ids, kv_ids)


# --- The kernel ---------------------------------------------------------------


def _tpu_block_sizes(block_sizes: BlockSizes | None, q_len: int, kv_len: int):
  """The kernel's `BlockSizes` and the padded lengths `(Sqp, Skp)`."""
  block_sizes = block_sizes or BlockSizes()
  for field in ("block_q", "block_k", "block_q_dkv", "block_k_dkv",
                "block_q_dq", "block_k_dq"):
    reason = check_block(field, getattr(block_sizes, field))
    if reason is not None:
      raise ValueError(f"flash on TPU: {reason}")
  pick = lambda value: DEFAULT_BLOCK if value is None else value
  bq, bq_dkv, bq_dq = (pick(block_sizes.block_q), pick(block_sizes.block_q_dkv),
                       pick(block_sizes.block_q_dq))
  bk, bk_dkv, bk_dq = (pick(block_sizes.block_k), pick(block_sizes.block_k_dkv),
                       pick(block_sizes.block_k_dq))
  q_len_padded = padded_length(q_len, (bq, bq_dkv, bq_dq))
  kv_len_padded = padded_length(kv_len, (bk, bk_dkv, bk_dq))
  blocks = tpu_flash.BlockSizes(
      block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
      block_q_major_dkv=bq_dkv, block_k_major_dkv=bk_dkv, block_k_dkv=bk_dkv,
      block_q_dkv=bq_dkv, block_k_major_dq=bk_dq, block_k_dq=bk_dq,
      block_q_dq=bq_dq)
  return blocks, q_len_padded, kv_len_padded


def flash_attention(inputs: AttentionInputs, dropout=None, *, sm_scale: float,
                    block_sizes: BlockSizes | None = None) -> KernelOutput:
  """Attention through JAX's Pallas TPU flash kernel (a pure function).

  Args:
    inputs: the canonical record; its visibility may use causal (Sq == Sk),
      segment ids and kv lengths (default positions), plus an optional bias;
      grouped-query heads only without causal (`mechanisms/flash.py` refuses
      the rest before this is called).
    dropout: must be `None`.
    sm_scale: the softmax scale.
    block_sizes: `fa.BlockSizes`; `block_q`/`block_k` tile the forward pass,
      `block_q_dkv`/`block_k_dkv` the dK/dV pass and `block_q_dq`/
      `block_k_dq` the dQ pass (multiples of 128; default 128).

  Returns:
    `KernelOutput(out [B, Sq, H, Dv], None, None)`: the kernel keeps its
    log-sum-exp to itself.
  """
  if dropout is not None:
    raise NotImplementedError("flash on TPU: dropout is not supported.")
  vis = inputs.visibility
  dims = inputs.dims
  if vis.window is not None or vis.mask is not None:
    raise NotImplementedError("flash on TPU: sliding windows and dense masks "
                              "are not supported.")
  if vis.causal and (dims.q_len != dims.kv_len or dims.groups > 1):
    raise NotImplementedError("flash on TPU: causal needs Sq == Sk and no "
                              "grouped-query heads.")
  b, sq, sk = dims.batch, dims.q_len, dims.kv_len
  hkv, g = dims.num_kv_heads, dims.groups
  head = max(dims.head_dim, dims.value_dim)
  head = head if head <= LANES else round_up(head, LANES)
  # Fold each KV head's G query heads into its query sequence.
  folded = g * sq
  blocks, q_len_padded, kv_len_padded = _tpu_block_sizes(block_sizes, folded,
                                                         sk)

  def layout(x, length, heads):  # [B, S, heads, d] -> [B, heads, Sp, Dp].
    x = jnp.swapaxes(x, 1, 2)
    if heads != x.shape[1]:  # Query heads grouped: [B, Hkv, G * Sq, D].
      x = x.reshape(b, heads, -1, x.shape[-1])
    return pad_axis(pad_axis(x, 2, length), 3, head)

  query = inputs.query
  bias = inputs.bias
  kernel_scale = sm_scale
  if bias is not None:
    # The kernel adds `ab` before scaling: scale the queries instead.
    query = (query.astype(jnp.float32) * sm_scale).astype(query.dtype)
    kernel_scale = 1.0
    bias = jnp.broadcast_to(bias, (b, dims.num_heads, sq, sk))
    bias = bias.reshape(b, hkv, folded, sk)
    bias = pad_axis(pad_axis(bias, 2, q_len_padded), 3, kv_len_padded)
  q = layout(query, q_len_padded, hkv)  # [B, Hkv, Sqp, Dp]
  k = layout(inputs.key, kv_len_padded, hkv)  # [B, Hkv, Skp, Dp]
  v = layout(inputs.value, kv_len_padded, hkv)  # [B, Hkv, Skp, Dp]

  # Padded keys are hidden from real queries by causal (Sq == Sk); without
  # causal, by the segment ids.
  ids = segment_ids_with_valid_keys(vis, sq, kv_len_padded,
                                    mask_padded_keys=not vis.causal)
  kernel_ids = None
  if ids is not None:
    q_ids, kv_ids = ids  # [B, Sq], [B, Skp]
    kernel_ids = tpu_flash.SegmentIds(
        q=pad_axis(jnp.tile(q_ids, (1, g)), 1, q_len_padded), kv=kv_ids)

  out = tpu_flash.flash_attention(
      q, k, v, bias, kernel_ids, causal=vis.causal, sm_scale=kernel_scale,
      block_sizes=blocks)  # [B, Hkv, Sqp, Dp]
  out = out[:, :, :folded].reshape(b, dims.num_heads, sq, head)
  out = jnp.swapaxes(out, 1, 2)[..., :dims.value_dim]  # [B, Sq, H, Dv]
  if vis.has_segments or vis.kv_lengths is not None:
    # Queries that see no key get zeros (the kernel would average V over
    # masked keys there).
    last_key = jnp.arange(sq) if vis.causal else None
    seen = rows_see_a_key(q_ids, kv_ids[:, :sk], last_key)  # [B, Sq]
    out = jnp.where(seen[:, :, None, None], out, 0).astype(out.dtype)
  return KernelOutput(out, None, None)
