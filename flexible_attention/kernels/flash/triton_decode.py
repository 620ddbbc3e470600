"""flash's decode kernel in Pallas, lowered through Triton: split-KV over pages.

Attention of a few new queries per row against a paged KV cache
(flash-decoding: Dao et al., 2023, https://crfm.stanford.edu/2023/10/12/
flashdecoding.html). Grid `(B, Hkv, S)`: program `(b, h, s)` holds ALL the
query rows of KV head `h` in row `b` (`R = G * Sq` rows, padded to a power of
two >= 16 for the dots), so each key and value is read once per KV head, and
walks the pages of its split `s` of the row's page table, `n` pages at a
time: it loads the block's `n` page indices from the table, gathers those
pages' keys and values of head `h` (`ref[page_ids]`, `[n * ps, D]`: no dense
copy of the cache is ever made), and runs the online softmax of `triton_fwd`
(base 2, the row maximum folded into one FMA with the scale). Blocks outside
the keys the program's rows can see (past the row's length, after the last
query under causal, outside the window) are never loaded. Each program writes
its split's float32 partial output and natural log-sum-exp; `decode.py`
merges the splits (`core.merge.merge_stacked`).

Every block is masked with the library's rule (`masks.pair_visible`): token
`t` of the block is visible to row `r` iff the row is a real query,
`t < length` and causal / window hold for `(q_pos[r], t)`. A split, or a whole
row, with no visible key writes out 0 and lse -inf.

Page indices read from the table are clamped to `[0, P)`: an entry past the
row's length (unassigned, or the table's padding) is read as some page and
masked; an out-of-range entry for a valid token cannot fault, but its keys
are then another page's (`decode.decode_attention` checks the table when it
is concrete; under `jit` it cannot).

Glossary of shapes:
- B: batch size; Sq: new queries per row.
- H, Hkv: query and key/value heads; G = H // Hkv.
- R: query rows of one program, `G * Sq` padded to a power of two >= 16.
- P: pages in the pool; ps: tokens per page; M: page-table entries per row
  (padded to `S * pages_per_split`).
- D, Dv: query/key and value head sizes (powers of two, 16..256).
- S: key splits; n: pages per block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from flexible_attention.core import masks
from flexible_attention.core.reference import MASK_VALUE
from flexible_attention.kernels.flash.structure import LN2
from flexible_attention.kernels.flash.structure import DecodeStatic
from flexible_attention.kernels.flash.triton_common import compiler_params
from flexible_attention.kernels.flash.triton_common import exp2
from flexible_attention.kernels.flash.triton_common import scores


@dataclasses.dataclass(frozen=True)
class DecodeLaunch:
  """The launch of the decode kernel (all fields resolved).

  Attributes:
    pages_per_block: n, pages gathered per loop step (a power of two;
      `n * page_size >= 16`).
    num_splits: S, the key splits of each row's page table.
    pages_per_split: table entries per split (a multiple of n).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages of the page loop.
  """

  pages_per_block: int
  num_splits: int
  pages_per_split: int
  num_warps: int = 4
  num_stages: int = 2


def _decode_kernel(q_ref, k_ref, v_ref, table_ref, row_pos_ref, row_ok_ref,
                   info_ref, out_ref, lse_ref, *, st: DecodeStatic,
                   num_pages: int):
  launch = st.launch
  n, pages_per_split = launch.pages_per_block, launch.pages_per_split
  page_size = k_ref.shape[1]
  block_k = n * page_size
  split = pl.program_id(2)
  q = q_ref[...]  # [R, D]
  row_pos = row_pos_ref[...]  # [R]
  row_ok = row_ok_ref[...] != 0  # [R]
  length, lo_token, hi_token = info_ref[0], info_ref[1], info_ref[2]
  # The blocks of this split that may hold a visible key (none if lo >= hi).
  split_start = split * pages_per_split
  lo_page = jnp.maximum(split_start, lo_token // page_size)
  hi_page = jnp.minimum(split_start + pages_per_split,
                        (hi_token + page_size - 1) // page_size)
  lo_block = lo_page // n
  hi_block = jnp.where(hi_page > lo_page, (hi_page + n - 1) // n, lo_block)
  slots = jnp.arange(block_k, dtype=jnp.int32)  # [n * ps]

  def body(j, carry):
    acc, m, l = carry
    first = pl.multiple_of(j * n, n)
    ids = jnp.clip(table_ref[pl.ds(first, n)], 0, num_pages - 1)  # [n]
    k = k_ref[ids].reshape(block_k, k_ref.shape[-1])  # [n * ps, D]
    s, scale, _ = scores(st, q, k, None)  # [R, n * ps]
    tokens = j * block_k + slots
    vis = masks.pair_visible(
        row_ok[:, None] & (tokens < length)[None, :], row_pos[:, None],
        tokens[None, :], causal=st.causal, window=st.window)
    s = jnp.where(vis, s, MASK_VALUE)
    # `m` and `m_new` are in base 2 (scaled), as in `triton_fwd`.
    m_new = jnp.maximum(m, jnp.max(s, axis=1) * scale)
    alpha = jnp.exp2(m - m_new)
    p = jnp.where(vis, exp2(s, scale, m_new[:, None]), 0.0)
    l = l * alpha + jnp.sum(p, axis=1)
    v = v_ref[ids].reshape(block_k, v_ref.shape[-1])  # [n * ps, Dv]
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         precision=st.precision,
                         preferred_element_type=jnp.float32)
    return acc * alpha[:, None] + pv, m_new, l

  rows, dv = q.shape[0], v_ref.shape[-1]
  init = (jnp.zeros((rows, dv), jnp.float32),
          jnp.full((rows,), MASK_VALUE, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(lo_block, hi_block, body, init)
  nonempty = l > 0.0
  safe_l = jnp.where(nonempty, l, 1.0)
  out_ref[...] = acc / safe_l[:, None]
  lse_ref[...] = jnp.where(nonempty, m * LN2 + jnp.log(safe_l), -jnp.inf)


def decode_partials(st: DecodeStatic, q, key_pages, value_pages, page_table,
                    row_pos, row_ok, info):
  """The decode kernel: each split's partial attention.

  Args:
    st: the call's static record.
    q: `[B, Hkv, R, D]`, row `r` of KV head `h` the query head
      `h * G + r % G` of new token `r // G` (rows past `G * Sq` padding).
    key_pages: `[P, ps, Hkv, D]`.
    value_pages: `[P, ps, Hkv, Dv]`.
    page_table: `[B, M]` int32, `M = S * pages_per_split`.
    row_pos: `[B, R]` int32, each row's query position.
    row_ok: `[B, R]` int32, 1 for a real query row.
    info: `[B, 4]` int32: the row's key count (at most `M * ps`), and the
      token range `[lo, hi)` outside which none of its queries sees a key.

  Returns:
    `(out [S, B, Hkv, R, Dv] float32, lse [S, B, Hkv, R] float32)`: each
    split's normalised output and natural log-sum-exp (0 and -inf where the
    split holds no visible key).
  """
  launch = st.launch
  batch, num_kv_heads, rows, head_dim = q.shape
  num_pages, page_size, _, value_dim = value_pages.shape
  splits, table_len = launch.num_splits, page_table.shape[1]
  grid = (batch, num_kv_heads, splits)
  in_specs = [
      pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
      pl.BlockSpec((num_pages, page_size, None, head_dim),
                   lambda b, h, s: (0, 0, h, 0)),
      pl.BlockSpec((num_pages, page_size, None, value_dim),
                   lambda b, h, s: (0, 0, h, 0)),
      pl.BlockSpec((None, table_len), lambda b, h, s: (b, 0)),
      pl.BlockSpec((None, rows), lambda b, h, s: (b, 0)),
      pl.BlockSpec((None, rows), lambda b, h, s: (b, 0)),
      pl.BlockSpec((None, 4), lambda b, h, s: (b, 0)),
  ]
  out_specs = [
      pl.BlockSpec((None, None, None, rows, value_dim),
                   lambda b, h, s: (s, b, h, 0, 0)),
      pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((splits, batch, num_kv_heads, rows, value_dim),
                           jnp.float32),
      jax.ShapeDtypeStruct((splits, batch, num_kv_heads, rows), jnp.float32),
  ]
  kernel = functools.partial(_decode_kernel, st=st, num_pages=num_pages)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compiler_params(launch, st.interpret),
      interpret=st.interpret, name="flash_decode")(
          q, key_pages, value_pages, page_table, row_pos, row_ok, info)
