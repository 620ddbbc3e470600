"""flash's forward kernel in Pallas, lowered through Triton.

Grid `(Sq / bq, B, H)`: one query tile against the key tiles it can see,
with an online softmax (FlashAttention-2); writes the output and the float32
log-sum-exp, the only residuals besides q, k and v. Attention sinks join
each row's final normalisation (one more key: logit `sinks[h]`, value 0),
so the log-sum-exp counts them and the backward kernels need no change.
Score and mask mods are evaluated on each tile (`mod_lowering`). See
`triton_common` for what the Triton kernels share.

Glossary of shapes: as `triton_common`'s.
"""

from __future__ import annotations

from jax.experimental import pallas as pl
import jax.numpy as jnp

from flexible_attention.core.reference import MASK_VALUE
from flexible_attention.kernels.flash.mod_lowering import TileMods
from flexible_attention.kernels.flash.structure import LN2
from flexible_attention.kernels.flash.structure import LOG2E
from flexible_attention.kernels.flash.structure import Static
from flexible_attention.kernels.flash.triton_common import dot
from flexible_attention.kernels.flash.triton_common import exp2
from flexible_attention.kernels.flash.triton_common import keep_mask
from flexible_attention.kernels.flash.triton_common import loops
from flexible_attention.kernels.flash.triton_common import query_grid_call
from flexible_attention.kernels.flash.triton_common import scores
from flexible_attention.kernels.flash.triton_common import tile_of
from flexible_attention.kernels.flash.triton_common import visible


def _forward_kernel(*refs, names, st: Static, num_q_blocks: int):
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
  tm = TileMods(st.mods, r, b, h, False) if st.mods is not None else None

  def body(j, carry, masked):
    acc, m, l = carry
    ks = pl.multiple_of(j * bk, bk)
    kv = pl.ds(ks, bk)
    k = r["k"][kv, :]  # [bk, Dp]
    bias = tile_of(r["bias"], q_rows, kv) if "bias" in r else None
    s, scale, _ = scores(st, q, k, bias)  # [bq, bk]
    kv_pos = r["kv_pos"][kv]
    if st.score_mod:
      s = tm.score(s, q_pos, kv_pos)
    if masked:
      vis = visible(st, s.shape, q_pos, kv_pos, r["kv_ok"][kv], q_seg,
                     r["kv_seg"][kv] if st.segments else None,
                     tile_of(r["mask"], q_rows, kv) if st.mask else None,
                     mods=tm)
      s = jnp.where(vis, s, MASK_VALUE)
    # The running maximum `m` is in base 2 (scaled), as are `lse` and `m_new`.
    m_new = jnp.maximum(m, jnp.max(s, axis=1) * scale)
    alpha = jnp.exp2(m - m_new)
    p = exp2(s, scale, m_new[:, None])
    if masked:
      p = jnp.where(vis, p, 0.0)
    l = l * alpha + jnp.sum(p, axis=1)
    if st.dropout_rate is not None:
      keep = keep_mask(st, r["seed"], b, h, q_pos, kv_pos)
      p = jnp.where(keep, p * (1.0 / (1.0 - st.dropout_rate)), 0.0)
    v = r["v"][kv, :]  # [bk, Dvp]
    pv = dot(p.astype(v.dtype), v, st)
    return acc * alpha[:, None] + pv, m_new, l

  init = (jnp.zeros((bq, dv_pad), jnp.float32),
          jnp.full((bq,), MASK_VALUE, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = loops(r["bounds"], i, body, init)
  if "sink" in r:  # The sink's logit, in base 2 like `m`.
    sink = r["sink"][...]  # [bq]
    m_new = jnp.maximum(m, sink)
    alpha = jnp.exp2(m - m_new)
    acc = acc * alpha[:, None]
    l = l * alpha + jnp.exp2(sink - m_new)
    m = m_new
  nonempty = l > 0.0
  safe_l = jnp.where(nonempty, l, 1.0)
  r["out"][...] = (acc / safe_l[:, None]).astype(r["out"].dtype)
  r["lse"][...] = jnp.where(nonempty, m * LN2 + jnp.log(safe_l), -jnp.inf)



def forward(st: Static, q, k, v, bias, aux, out_dtype=None, sinks=None):
  """The forward on padded operands.

  Args:
    st: the call's static record.
    q: `[B, Sqp, H, Dp]`.
    k: `[B, Skp, Hkv, Dp]`.
    v: `[B, Skp, Hkv, Dvp]`.
    bias: `[B|1, H|1, Sqp|1, Skp|1]` or None.
    aux: the structure vectors, dense mask, seed and `bounds_fwd`
      (`structure.structure_vectors`, `structure.tile_bounds`).
    out_dtype: the output's dtype (default q's).
    sinks: `[H]` float32 sink logits, or None.

  Returns:
    `(out [B, Sqp, H, Dvp], lse [B, H, Sqp] float32)`: natural log, -inf
    (and out 0) for rows that see no key (with sinks: the sink's logit).
  """
  batch, q_len, num_heads, _ = q.shape
  dv_pad = v.shape[-1]
  bq = st.launch.fwd.block_q
  nq = q_len // bq
  call, qi = query_grid_call(st, q, k, v, bias, aux, bq, "bounds_fwd")
  if sinks is not None:
    # Per head, broadcast over the rows (a tile-shaped load), in base 2.
    rows = jnp.broadcast_to((sinks.astype(jnp.float32) * LOG2E)[:, None],
                            (num_heads, q_len))
    call.input("sink", rows, (None, bq), lambda i, b, h: (h, qi(i)))
  call.output("out", (batch, q_len, num_heads, dv_pad), out_dtype or q.dtype,
              (None, bq, None, dv_pad), lambda i, b, h: (b, qi(i), h, 0))
  call.output("lse", (batch, num_heads, q_len), jnp.float32,
              (None, None, bq), lambda i, b, h: (b, h, qi(i)))
  out, lse = call(_forward_kernel, (nq, batch, num_heads), st.launch.fwd,
                  st.interpret, "flash_forward", st=st, num_q_blocks=nq)
  return out, lse


