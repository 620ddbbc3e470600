"""KV-cache calls on TPU: JAX's ragged paged attention kernel behind the record.

`ragged_paged_attention` serves a cache call (the canonical record a module
builds from a dense `fa.KVCache` or a `fa.PagedKVCache`) with
`jax.experimental.pallas.ops.tpu.ragged_paged_attention` (the same kernel
source in jax 0.10.x and 0.11.x). That kernel takes a ragged list of query
tokens (`[T, H, D]`, sequence s owning tokens `cu_q_lens[s]:cu_q_lens[s+1]`),
one pool of pages holding keys AND values, a page table, kv lengths and the
number of sequences. It is always causal, aligned bottom-right (sequence s's
last query sits at its last key, `kv_lens[s] - 1`), with an optional sliding
window and logit soft cap, grouped-query heads, no bias, mask, dropout or
segments, and forward only (no log-sum-exp, no backward). The mapping:

- pages: the kernel wants `[P, page_size, 2 * Hkv, Dp]` with the key of KV
  head h at `2h` and its value at `2h + 1` (one DMA per page brings both),
  and `Dp` a multiple of 128 (its softmax statistics are 128 lanes wide).
  The project's `PagedKVCache` keeps keys and values in separate pools
  (`[P, page_size, Hkv, D]` and `[..., Dv]`), which is what the cache write
  and every other kernel read; the kernel's layout cannot be held by it. So
  **each call makes a fused copy of the whole pool** (`fuse_pages`: K and V
  interleaved, head sizes zero-padded to `Dp = roundup(max(D, Dv), 128)`;
  zeros change neither q.k nor p.v), which the kernel then reads through
  the table. That copy reads and writes the pool once more per call: on a
  decode step it costs more HBM traffic than the attention itself. A dense
  cache `[B, L, Hkv, D]` is fused the same way into pages of
  `min(128, roundup(L, 8))` tokens (row b owns pages `b * M ... b * M + M -
  1`, L padded to whole pages in the copy);
- the table: entries are clamped into `[0, P)` (a copy of the small table):
  the kernel DMAs every page up to a row's length, and an `UNASSIGNED` (-1)
  entry is only ever reached by a row that `cache.write` flags as
  overflowing, whose output the module replaces by NaN;
- queries: the valid query slots of `[B, Sq, H, D]` (slot i of row b holds
  a token iff `q_positions[b, i] < kv_lengths[b]`, i.e. `i < q_lengths[b]`)
  are packed into the kernel's token list, padded slots are *excluded*
  (the kernel's bottom-right alignment counts a sequence's tokens, so a
  padded slot inside the list would shift the valid ones), and rows without
  new tokens are left out of the sequence list (the kernel then never reads
  their pages); the output is gathered back, padded slots give zeros;
- causal: a cache call's queries are the last tokens of each row (slot i of
  row b is token `lengths[b] + i`), exactly the kernel's alignment. Without
  causal, one new token per row is the same function (it sees every key);
  several are served by making each query token its own sequence whose
  kv length is the row's (it sees all the row's keys), which reads the
  row's pages once per token;
- sliding window `(l, r)` with causal: visible iff `q_pos - l <= kv_pos <=
  q_pos`, the kernel's `sliding_window = l + 1` (it hides `kv_pos <= q_pos
  - sliding_window`); without causal only with one new token (same
  argument); a non-causal window over several new tokens is refused;
- soft cap: the kernel's `soft_cap` (applied after `sm_scale`, as the
  semantics say); `sm_scale` is the kernel's;
- tiles: `BlockSizes.block_q` is the kernel's queries per block,
  `block_k` its KV tokens per block (rounded down to whole pages, at least
  one); with neither, on a TPU the kernel's own tuned table picks them.
- Hkv: the kernel tiles `2 * Hkv` KV heads; counts it cannot tile (e.g.
  Hkv = 3 in float32, Hkv = 6 in bfloat16) are refused (`unsupported_reason`,
  which asks the kernel's own rule).

No log-sum-exp: the kernel keeps its statistics in VMEM (`flash` on TPU
refuses `return_lse`). No backward: differentiating the call raises.

Interpret mode (`interpret=True`, tests on CPU): the kernel runs under
`pltpu.force_tpu_interpret_mode()`, JAX's TPU simulator (grid, scalar
prefetch, page DMAs through the table, semaphores, double buffering). In
jax 0.10.2 and 0.11.2 that simulator cannot evaluate two memory operations
of this kernel: a strided read through a reshaped (and, in bfloat16,
bitcast) VMEM buffer, and masked stores whose mask spans more rows than
the slice's second axis (a bug in its bounds check). `_interpretable`
replaces exactly those two, for the duration of the trace, by plain reads
and read-modify-writes of the same elements; everything else is JAX's
kernel as it runs on TPU.

Glossary of shapes:
- B: batch size; Sq: query slots (new tokens) per row.
- H, Hkv: query and key/value heads.
- D, Dv: query/key and value head sizes; Dp: both padded to 128 lanes.
- P: pages in the pool; ps: tokens per page; M: page-table slots per row.
- L: a dense cache's length; T: the kernel's token list (B * Sq slots).
- N: the kernel's sequences (B, or B * Sq without causal).
"""

from __future__ import annotations

import contextlib
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import ragged_paged_attention as rpa
import jax.numpy as jnp

from flexible_attention.core.inputs import AttentionDims
from flexible_attention.core.inputs import AttentionInputs
from flexible_attention.core.types import BlockSizes
from flexible_attention.core.types import KernelOutput
from flexible_attention.kernels.flash.structure import round_up

# JAX's kernel module (`_interpretable` patches two of its names).
_kernel_module = rpa.kernel

LANES = 128  # Dp is a multiple of it.
BLOCK_FIELDS = ("block_q", "block_k")  # The BlockSizes fields it reads.
DEFAULT_QUERIES_PER_BLOCK = 32  # The kernel's untuned default.
DEFAULT_KV_TOKENS_PER_BLOCK = 2048  # 128 pages of 16, the kernel's default.
DENSE_PAGE_SIZE = 128  # The largest page a dense cache is cut into.


def unsupported_reason(dims: AttentionDims, dtype, *, causal: bool,
                       window: tuple[int, int] | None) -> str | None:
  """Why the kernel cannot serve a cache call of these sizes and structure
  (None when it can); the features (no bias, mask, dropout, lse, ...) are
  `flash`'s TPU cache record."""
  if window is not None and not causal and dims.q_len > 1:
    return ("a sliding window on a cache call needs causal=True or one new "
            f"token per call (got Sq = {dims.q_len} without causal): JAX's "
            "ragged paged attention kernel measures the window from the "
            "row's last key")
  try:
    _kernel_module.get_min_heads_per_blk(dims.num_heads,
                                         2 * dims.num_kv_heads,
                                         jnp.dtype(dtype), jnp.dtype(dtype))
  except (ValueError, AssertionError):
    return (f"JAX's ragged paged attention kernel cannot tile Hkv = "
            f"{dims.num_kv_heads} KV heads (2 * Hkv interleaved K/V heads) "
            f"in {jnp.dtype(dtype).name}; Hkv in (1, 2, 4) or a multiple of "
            "4 (float32), in (1, 2, 4, 8) or a multiple of 8 (bfloat16)")
  return None


def fuse_pages(key_pages, value_pages, head: int):
  """The kernel's page pool: a copy of the two pools, K and V interleaved.

  Args:
    key_pages: `[P, ps, Hkv, D]`.
    value_pages: `[P, ps, Hkv, Dv]`.
    head: Dp >= max(D, Dv); head sizes are zero-padded to it.

  Returns:
    `[P, ps, 2 * Hkv, Dp]`: index `2h` is KV head h's key, `2h + 1` its
    value.
  """
  pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, head - x.shape[-1])])
  fused = jnp.stack([pad(key_pages), pad(value_pages)], axis=3)
  return fused.reshape(fused.shape[:2] + (-1, head))


def _dense_pages(keys, values, head: int):
  """A dense cache's fused pages and table: `([B * M, ps, 2 * Hkv, Dp],
  [B, M])`, L padded to `M * ps` in the copy."""
  batch, length = keys.shape[:2]
  page_size = min(DENSE_PAGE_SIZE, round_up(length, 8))
  pages = -(-length // page_size)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, pages * page_size - length), (0, 0),
                              (0, 0)])
  fused = fuse_pages(pad(keys), pad(values), head)  # [B, M * ps, 2Hkv, Dp]
  fused = fused.reshape((batch * pages, page_size) + fused.shape[2:])
  table = jnp.arange(batch * pages, dtype=jnp.int32).reshape(batch, pages)
  return fused, table


# --- Interpret mode -----------------------------------------------------------


class _FlatKV:
  """The kernel's `buf.reshape(n * ps * C, Dp)` of a VMEM buffer ref `[n,
  ps, C, Dp]` (C = 2 * KV heads of the block), read only as the kernel reads
  it: rows `c::C` (one K or V head), or, after `.bitcast(uint32)` of a
  16-bit buffer, rows `c/2::C/2` packing heads c (low half) and c + 1."""

  def __init__(self, buf, packing: int = 1):
    self._buf, self._packing = buf, packing
    n, ps, c, d = buf.shape
    self.dtype = buf.dtype if packing == 1 else jnp.dtype(jnp.uint32)
    self.shape = (n * ps * c // packing, d)

  def bitcast(self, dtype):
    if jnp.dtype(dtype) != jnp.uint32 or self._packing != 1:
      raise NotImplementedError(f"interpret mode: bitcast to {dtype}")
    return _FlatKV(self._buf, 4 // jnp.dtype(self._buf.dtype).itemsize)

  def __getitem__(self, index):
    rows, cols = index
    n, ps, c, d = self._buf.shape
    if (cols != slice(None) or rows.stop is not None or
        rows.step * self._packing != c):
      raise NotImplementedError(f"interpret mode: the read {index}")
    head = rows.start * self._packing
    if self._packing == 1:
      return self._buf[:, :, head, :].reshape(n * ps, d)
    if self._packing != 2:
      raise NotImplementedError("interpret mode: 8-bit pages")
    pair = self._buf[:, :, pl.ds(head, 2), :]  # [n, ps, 2, Dp]
    pair = jnp.moveaxis(pair, 2, 3)  # Head c in the low half.
    return lax.bitcast_convert_type(pair, jnp.uint32).reshape(n * ps, d)


class _Reshapeable:

  def __init__(self, buf):
    self._buf = buf

  def reshape(self, *shape):
    del shape  # Always the kernel's flattening (checked by the reads).
    return _FlatKV(self._buf)


class _InterpretablePageCopies(_kernel_module.MultiPageAsyncCopyDescriptor):
  """JAX's page-copy descriptor whose waited buffer reads as `_FlatKV`."""

  def wait(self):
    return _Reshapeable(super().wait())


class _InterpretablePltpu:
  """`pltpu` with masked stores as read-modify-writes."""

  def __getattr__(self, name):
    return getattr(pltpu, name)

  @staticmethod
  def store(ref, val, *, mask=None):
    ref[...] = val if mask is None else jnp.where(mask, val, ref[...])


@contextlib.contextmanager
def _interpretable():
  """Runs JAX's kernel under TPU interpret mode, with the two memory
  operations the simulator cannot evaluate replaced (module docstring)."""
  names = ("MultiPageAsyncCopyDescriptor", "pltpu")
  saved = tuple(getattr(_kernel_module, name, None) for name in names)
  if None in saved:
    raise NotImplementedError(
        "interpret mode: this jax's ragged paged attention kernel module "
        f"lacks {names}; run on a TPU.")
  _kernel_module.MultiPageAsyncCopyDescriptor = _InterpretablePageCopies
  _kernel_module.pltpu = _InterpretablePltpu()
  try:
    with pltpu.force_tpu_interpret_mode():
      yield
  finally:
    for name, value in zip(names, saved):
      setattr(_kernel_module, name, value)


# --- The kernel ---------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attend(queries, kv_pages, kv_lens, table, cu_q_lens, num_seqs, static):
  """The kernel on `[T, H, Dp]` queries (zeros when no sequence has a
  token: the kernel would leave its first page copy unwaited)."""
  options = dict(static)

  def run(args):
    return rpa.ragged_paged_attention(*args, **options)

  args = (queries, kv_pages, kv_lens, table, cu_q_lens, num_seqs)
  return lax.cond(num_seqs[0] > 0, run, lambda a: jnp.zeros_like(a[0]), args)


def _attend_fwd(queries, kv_pages, kv_lens, table, cu_q_lens, num_seqs,
                static):
  return _attend(queries, kv_pages, kv_lens, table, cu_q_lens, num_seqs,
                 static), None


def _attend_bwd(static, residuals, cotangent):
  del static, residuals, cotangent
  raise NotImplementedError(
      "flash on TPU serves KV-cache calls with JAX's ragged paged attention "
      "kernel, which has no backward pass: decode without gradients, or use "
      "mechanism 'vanilla' or 'blockwise' for a cache call to differentiate.")


_attend.defvjp(_attend_fwd, _attend_bwd)


def _tiles(block_sizes: BlockSizes | None, tokens: int, page_size: int,
           pages_per_seq: int, tuned: bool):
  """`(queries per block, KV pages per block)`, or `(None, None)` for the
  kernel's tuned table (on a TPU, with neither `block_q` nor `block_k`)."""
  block_sizes = block_sizes or BlockSizes()
  block_q, block_k = block_sizes.block_q, block_sizes.block_k
  if tuned and block_q is None and block_k is None:
    return None, None
  queries = min(block_q or DEFAULT_QUERIES_PER_BLOCK, tokens)
  kv_tokens = block_k or DEFAULT_KV_TOKENS_PER_BLOCK
  return queries, min(max(1, kv_tokens // page_size), pages_per_seq)


def ragged_paged_attention(inputs: AttentionInputs, dropout=None, *,
                           sm_scale: float, softcap: float | None = None,
                           block_sizes: BlockSizes | None = None,
                           interpret: bool = False) -> KernelOutput:
  """A KV-cache call through JAX's TPU ragged paged attention kernel.

  Args:
    inputs: the record of a cache call: `query [B, Sq, H, D]`, the cache's
      dense view as `key [B, L, Hkv, D]` / `value [B, L, Hkv, Dv]`, its
      `pages` (a `PagedKVCache`, or None for a dense cache), the
      visibility of a cache (kv lengths = the rows' new lengths, query
      positions = token indices, key positions `arange(L)`), causal and a
      window; no bias, mask or segments.
    dropout: must be None.
    sm_scale: the softmax scale.
    softcap: the logit soft cap, or None.
    block_sizes: `block_q` (queries per kernel block) and `block_k` (KV
      tokens per block, whole pages); None: the kernel's tuned values on a
      TPU, `DEFAULT_*` elsewhere.
    interpret: run the kernel in JAX's TPU interpreter (any backend; for
      tests on CPU; module docstring).

  Returns:
    `KernelOutput(out [B, Sq, H, Dv], None, None)`; padded query slots are
    zeros.
  """
  vis, dims = inputs.visibility, inputs.dims
  if dropout is not None or inputs.bias is not None or vis.mask is not None:
    raise NotImplementedError("ragged paged attention (TPU): no dropout, "
                              "bias or dense mask.")
  if vis.has_segments or vis.kv_lengths is None:
    raise NotImplementedError("ragged paged attention (TPU) serves KV-cache "
                              "calls (kv lengths, no segment ids).")
  if inputs.key_shard:
    raise NotImplementedError(
        "ragged paged attention (TPU) reads a whole cache, not one device's "
        "shard of its keys (a sequence mesh whose axis does not divide the "
        "new tokens).")
  reason = unsupported_reason(dims, inputs.query.dtype, causal=vis.causal,
                              window=vis.window)
  if reason is not None:
    raise NotImplementedError(f"ragged paged attention (TPU): {reason}.")
  on_tpu = jax.devices()[0].platform == "tpu"
  if not (interpret or on_tpu):
    raise ValueError("ragged paged attention (TPU) runs on a TPU; pass "
                     "interpret=True elsewhere.")
  b, sq, h = dims.batch, dims.q_len, dims.num_heads
  head = round_up(max(dims.head_dim, dims.value_dim), LANES)  # Dp.
  if inputs.pages is not None:
    kv_pages = fuse_pages(inputs.pages.key_pages, inputs.pages.value_pages,
                          head)  # [P, ps, 2Hkv, Dp]: a copy of the pool.
    table = inputs.pages.page_table.astype(jnp.int32)  # [B, M]
  else:
    kv_pages, table = _dense_pages(inputs.key, inputs.value, head)
  table = jnp.clip(table, 0, kv_pages.shape[0] - 1)
  page_size, pages_per_seq = kv_pages.shape[1], table.shape[1]

  kv_lens = vis.kv_lengths.astype(jnp.int32)  # [B]
  q_lens = jnp.clip(kv_lens - vis.q_positions[:, 0], 0, sq)  # [B]
  slots = jnp.arange(sq, dtype=jnp.int32)
  valid = slots[None, :] < q_lens[:, None]  # [B, Sq]
  if vis.causal or sq == 1:  # One sequence per row.
    seq_row = jnp.arange(b, dtype=jnp.int32)  # [N]
    seq_q_lens = q_lens
    seq_of_slot = jnp.broadcast_to(seq_row[:, None], (b, sq))
    offset = jnp.broadcast_to(slots[None, :], (b, sq))
  else:  # One sequence per query token: each sees the whole row.
    seq_row = jnp.repeat(jnp.arange(b, dtype=jnp.int32), sq)  # [N]
    seq_q_lens = valid.reshape(-1).astype(jnp.int32)
    seq_of_slot = jnp.arange(b * sq, dtype=jnp.int32).reshape(b, sq)
    offset = jnp.zeros((b, sq), jnp.int32)
  # Sequences with tokens first (the kernel reads the first num_seqs).
  order = jnp.argsort(seq_q_lens == 0, stable=True)  # [N]
  cu_q_lens = jnp.concatenate([
      jnp.zeros((1,), jnp.int32),
      jnp.cumsum(seq_q_lens[order], dtype=jnp.int32)])  # [N + 1]
  first = jnp.zeros_like(seq_q_lens).at[order].set(cu_q_lens[:-1])  # [N]
  token = first[seq_of_slot] + offset  # [B, Sq]: each slot's list index.
  num_seqs = jnp.sum(seq_q_lens > 0, dtype=jnp.int32)[None]  # [1]

  queries_per_block, pages_per_block = _tiles(
      block_sizes, b * sq, page_size, pages_per_seq,
      tuned=on_tpu and not interpret)
  tokens = round_up(b * sq, queries_per_block or 1)  # T.
  query = jnp.pad(inputs.query,
                  [(0, 0)] * 3 + [(0, head - dims.head_dim)])  # [B, Sq, H, Dp]
  packed = jnp.zeros((tokens, h, head), query.dtype).at[
      jnp.where(valid, token, tokens)].set(query, mode="drop")  # [T, H, Dp]
  static = (("sm_scale", float(sm_scale)),
            ("sliding_window", None if vis.window is None else
             int(vis.window[0]) + 1),
            ("soft_cap", None if softcap is None else float(softcap)),
            ("num_queries_per_block", queries_per_block),
            ("num_kv_pages_per_block", pages_per_block))
  with _interpretable() if interpret else contextlib.nullcontext():
    out = _attend(packed, kv_pages, kv_lens[seq_row][order],
                  table[seq_row][order], cu_q_lens, num_seqs, static)
  out = out[jnp.clip(token, 0, tokens - 1)]  # [B, Sq, H, Dp]
  out = jnp.where(valid[:, :, None, None], out, 0)[..., :dims.value_dim]
  return KernelOutput(out.astype(inputs.query.dtype), None, None)

