"""Flash attention's forward and dK/dV kernels for Hopper, in Mosaic GPU.

`forward` computes the same function as `flash_triton`'s forward kernel
(same inputs, padding, structure vectors and tile-skipping bounds; same
`out` and natural-log `lse`), written for sm_90 the way FlashAttention-3
describes it (Shah et al., 2024, https://arxiv.org/abs/2407.08608) rather
than through Triton:

- three warpgroups per program: a producer that streams K, V (and the keys'
  structure vectors) into a ring of shared-memory slots with TMA, and two
  consumers of 64 query rows each (one `wgmma` M tile);
- the consumers run `q k^T` and `p v` as asynchronous `wgmma`s on operands
  in shared memory and ping-pong through a named barrier, so one
  warpgroup's softmax overlaps the other's matmuls;
- the softmax keeps the raw logits and the row maxima in base 2, one FMA
  per element (as the Triton kernel does).

It serves the calls `unsupported_reason` accepts (bf16 / fp16, padded head
sizes 64, 128 or 256 with D == Dv, no bias, dense mask or dropout); the
Triton kernel serves every other one.

`dkdv` is the backward's dK/dV kernel in the same style, for the same
calls: a producer streams query-side tiles; at Dp <= 128 two consumers own
64 keys each and accumulate their dK and dV with `wgmma`; at Dp = 256,
where those accumulators fill both consumers' registers, the consumers
share 64 keys and split dK's and dV's columns, exchanging `p`, `dp - delta`
and `ds` through shared memory (FlashAttention-3's hdim-256 layout). dQ
stays Triton's.
Mosaic GPU has no interpreter that runs such a kernel on CPU, so CI checks
that it lowers for every structure it serves and the GPU machine runs the
conformance battery through it (benchmarks/flash_notes.md).

Glossary of shapes:
- B: batch size; H, Hkv: query and key/value heads; G = H // Hkv.
- Sqp, Skp: query and key lengths padded to whole tiles (`BLOCK_Q`, bk).
- Dp: the padded head size (64, 128 or 256).
- Nq, Nk: the number of query / key structure vectors (`vectors`).
- nq: Sqp // BLOCK_Q, the number of query tiles of the forward.
- bk: the forward's key tile (`block_k`); the dK/dV kernel's tiles are
  `dkv_block_k(Dp)` keys by `DKV_BLOCK_Q` queries.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from flexible_attention.core import masks

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
ROWS = 64  # Query rows per consumer warpgroup: wgmma's M.
CONSUMERS = 2
BLOCK_Q = ROWS * CONSUMERS
STAGES = 2  # Shared-memory slots of K and V.
HEAD_DIMS = (64, 128, 256)
_SWIZZLE = 128  # Bytes; a row of 64 bf16 / fp16 values.
_BOUNDS = 32  # Each tile's 4 bounds, padded: TMA copies 128-byte multiples.
_LOAD_TAKES_INDEX = (
    inspect.signature(plgpu.load).parameters["idx"].default
    is inspect.Parameter.empty)


def block_k(head_dim: int) -> int:
  """The key tile per padded head size: 256, 128 and 64 at Dp = 64, 128 and
  256. Measured on an H200 (benchmarks/flash_notes.md): at Dp = 64, 256 is
  12% faster than 128; at Dp = 128, 128 is 22% faster than 64. Q, and K
  and V in `STAGES` slots, fill 80-160 KiB of the 227 KiB of shared memory
  a block has; three slots of 128-key tiles at Dp = 128 do not fit.
  """
  return {64: 256, 128: 128}.get(head_dim, 64)


def _load_vector(ref, layout):
  """`ref`'s vector in registers (jax 0.10 takes an index argument)."""
  if _LOAD_TAKES_INDEX:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def unsupported_reason(*, dtype, head_dim: int, value_dim: int,
                       bias: bool, mask: bool, dropout: bool,
                       interpret: bool, precision: Any) -> str | None:
  """Why this kernel cannot serve a call (padded head sizes), or None."""
  if interpret:
    return "it has no interpreter (interpret=True)"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"it takes bfloat16 or float16 inputs, not {jnp.dtype(dtype)}"
  if head_dim != value_dim or head_dim not in HEAD_DIMS:
    return (f"it takes padded head sizes D == Dv in {HEAD_DIMS}, got D = "
            f"{head_dim}, Dv = {value_dim}")
  if bias or mask or dropout:
    return "it takes no bias, dense mask or dropout"
  if precision is not None:
    return "it has one matmul precision (the inputs' type, float32 sums)"
  return None


@dataclasses.dataclass(frozen=True)
class Structure:
  """The static structure of a call, as the kernel evaluates it.

  Attributes:
    sm_scale: the softmax scale.
    softcap: logits soft cap, or None.
    causal: `kv_pos <= q_pos`.
    window: `(left, right)` around `q_pos`, or None.
    segments: segment ids must match.
    groups: G, query heads per key/value head.
  """

  sm_scale: float
  softcap: float | None
  causal: bool
  window: tuple[int, int] | None
  segments: bool
  groups: int

  def vectors(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names of the query and key vectors the masked tiles read."""
    positions = self.causal or self.window is not None
    q_names = (("q_pos",) if positions else ()) + (
        ("q_seg",) if self.segments else ())
    kv_names = ("kv_ok",) + (("kv_pos",) if positions else ()) + (
        ("kv_seg",) if self.segments else ())
    return q_names, kv_names


# --- Pieces both kernels use --------------------------------------------------


def _swizzled(dtype) -> tuple[Any, ...]:
  """The shared-memory transforms of a `wgmma` operand: `[8, 64]` tiles of
  16-bit values, 128-byte swizzle."""
  return (plgpu.TilingTransform((8, _SWIZZLE // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(_SWIZZLE))


def _pad_bounds(bounds):
  """`[B, n, 4]` -> `[B, n, _BOUNDS]`: rows TMA can copy."""
  return jnp.pad(bounds, ((0, 0), (0, 0), (0, _BOUNDS - bounds.shape[-1])))


def _tile_bounds(gmem_row, smem_row, ready):
  """This program's `(lo, flo, fhi, hi)`, read by a warpgroup through its
  own shared-memory row."""
  plgpu.copy_gmem_to_smem(gmem_row, smem_row, ready)
  plgpu.barrier_wait(ready)
  return tuple(smem_row[i] for i in range(4))


def _visible(st: Structure, q_vec: dict, kv_vec: dict):
  """The structured mask of a tile from its vectors, each broadcast to the
  tile's shape (`Structure.vectors` names them)."""
  return masks.pair_visible(
      kv_vec["kv_ok"] != 0, q_vec.get("q_pos"), kv_vec.get("kv_pos"),
      causal=st.causal, window=st.window, q_seg=q_vec.get("q_seg"),
      kv_seg=kv_vec.get("kv_seg"))


# --- Forward ------------------------------------------------------------------


def _kernel(q_ref, k_ref, v_ref, bounds_ref, qvec_ref, kvvec_ref, out_ref,
            lse_ref, scratch, *, st: Structure, bk: int, nq: int):
  """One program: `BLOCK_Q` query rows of one (batch, head) pair."""
  (q_smem, k_smem, v_smem, qvec_smem, kvvec_smem, bounds_smem, lse_smem,
   ready, free, sched) = scratch
  (q_ready, qvec_ready, k_ready, v_ready, kvvec_ready, bounds_ready) = ready
  k_free, v_free = free
  dtype = q_ref.dtype
  q_names, kv_names = st.vectors()
  tile = nq - 1 - lax.axis_index("q")  # Heavy causal rows first.
  batch, head = lax.axis_index("b"), lax.axis_index("h")
  wg = lax.axis_index("wg")

  # Every warpgroup reads the tile's bounds through shared memory.
  lo, flo, fhi, hi = _tile_bounds(bounds_ref.at[batch, tile],
                                  bounds_smem.at[wg], bounds_ready.at[wg])

  def sync():  # Both consumers meet: the ping-pong of FlashAttention-3.
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)

  @pl.when(wg < CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    rows = tile * BLOCK_Q + wg * ROWS
    q_tile = q_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(rows, ROWS), head], q_tile,
                            q_ready.at[wg])
    q_vec = {}
    if q_names:
      plgpu.copy_gmem_to_smem(qvec_ref.at[batch, :, pl.ds(rows, ROWS)],
                              qvec_smem.at[wg], qvec_ready.at[wg])
      plgpu.barrier_wait(qvec_ready.at[wg])
      for n, name in enumerate(q_names):
        vec = _load_vector(qvec_smem.at[wg, n], plgpu.Layout.WGMMA.reduce(1))
        q_vec[name] = lax.broadcast_in_dim(vec, (ROWS, bk), [0])
    plgpu.barrier_wait(q_ready.at[wg])

    scale = st.sm_scale * LOG2E if st.softcap is None else 1.0

    def step(t, carry, masked: bool):
      acc, m, l = carry
      slot = lax.rem(t - lo, STAGES)
      plgpu.barrier_wait(k_ready.at[slot])

      def scores(acc_ref):
        plgpu.wgmma(acc_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
        sync()  # The other consumer's matmuls go next.
        return acc_ref[...]

      s = pl.run_scoped(scores, plgpu.ACC((ROWS, bk), jnp.float32))
      plgpu.barrier_wait(kvvec_ready.at[slot])
      vis = None
      if masked:
        kv = {name: lax.broadcast_in_dim(
            _load_vector(kvvec_smem.at[slot, n], plgpu.Layout.WGMMA.reduce(0)),
            (ROWS, bk), [1]) for n, name in enumerate(kv_names)}
        vis = _visible(st, q_vec, kv)
      plgpu.barrier_arrive(k_free.at[slot])
      if st.softcap is not None:
        s = s * st.sm_scale
        s = (st.softcap * LOG2E) * jnp.tanh(s * (1.0 / st.softcap))
      if masked:
        s = jnp.where(vis, s, -jnp.inf)
      # Row maxima in base 2; `masked` rows of a tile may all be -inf.
      m_new = jnp.maximum(m, s.max(axis=1) * scale)
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      alpha = jnp.exp2(m - m_safe)
      p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_safe, s.shape, [0]))
      l = l * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      p = p.astype(dtype)
      plgpu.barrier_arrive(sched)  # Softmax done.
      plgpu.barrier_wait(v_ready.at[slot])
      plgpu.barrier_wait(sched)  # The tensor cores are ours again.

      def values(acc_ref):
        plgpu.wgmma(acc_ref, p, v_smem.at[slot])

      acc = pl.run_state(values)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    reduced = plgpu.Layout.WGMMA.reduce(1)
    carry = (plgpu.layout_cast(jnp.zeros((ROWS, v_ref.shape[-1]), jnp.float32),
                               plgpu.Layout.WGMMA),
             plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32),
                               reduced),
             plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), reduced))
    pl.when(wg == 1)(sync)  # Consumer 1 starts one phase behind.
    masked = functools.partial(step, masked=True)
    carry = lax.fori_loop(lo, flo, masked, carry)
    carry = lax.fori_loop(flo, fhi, functools.partial(step, masked=False),
                          carry)
    acc, m, l = lax.fori_loop(fhi, hi, masked, carry)
    pl.when(wg == 0)(sync)

    nonempty = l > 0.0
    inv_l = 1.0 / jnp.where(nonempty, l, 1.0)
    acc = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
    q_tile[...] = acc.astype(dtype)  # The query tile is spent: reuse it.
    lse_smem.at[wg][...] = jnp.where(
        nonempty, m * LN2 + jnp.log(jnp.where(nonempty, l, 1.0)), -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, out_ref.at[batch, pl.ds(rows, ROWS), head])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg],
                            lse_ref.at[batch, head, pl.ds(rows, ROWS)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == CONSUMERS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(head, jnp.array(st.groups, head.dtype))

    def load(t, slot):
      keys = pl.ds(t * bk, bk)
      plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], k_smem.at[slot],
                              k_ready.at[slot])
      plgpu.copy_gmem_to_smem(kvvec_ref.at[batch, :, keys],
                              kvvec_smem.at[slot], kvvec_ready.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], v_smem.at[slot],
                              v_ready.at[slot])

    for slot in range(STAGES):
      pl.when(lo + slot < hi)(functools.partial(load, lo + slot, slot))

    def refill(t, _):
      slot = lax.rem(t - lo, STAGES)
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])
      load(t, slot)

    lax.fori_loop(lo + STAGES, hi, refill, None)


def forward(st: Structure, q, k, v, bounds, q_vectors, kv_vectors):
  """The forward kernel on padded operands.

  Args:
    st: the call's static structure.
    q: `[B, Sqp, H, Dp]`, bf16 or fp16, Sqp a multiple of `BLOCK_Q`.
    k: `[B, Skp, Hkv, Dp]`, Skp a multiple of `block_k(Dp)`.
    v: `[B, Skp, Hkv, Dp]`.
    bounds: int32 `[B, nq, 4]`, per query tile the key tiles `[lo, hi)` that
      may be visible and, inside, `[flo, fhi)` that are fully visible
      (`flash_triton._bounds` for tiles `BLOCK_Q x block_k(Dp)`).
    q_vectors: int32 `[B, Nq, Sqp]` (`st.vectors()[0]`, in order; a zero
      `[B, 1, Sqp]` when Nq = 0).
    kv_vectors: int32 `[B, Nk, Skp]` (`st.vectors()[1]`; `kv_ok` first).

  Returns:
    `(out [B, Sqp, H, Dp] in q's dtype, lse [B, H, Sqp] float32)`: natural
    log, -inf (and out 0) for rows that see no key.
  """
  batch, q_len, heads, d = q.shape
  kv_len = k.shape[1]
  bk = block_k(d)
  nq = q_len // BLOCK_Q
  if q_len % BLOCK_Q or kv_len % bk:
    raise ValueError(f"flash (Mosaic GPU): Sqp = {q_len} and Skp = {kv_len} "
                     f"must be multiples of {BLOCK_Q} and {bk}.")
  swizzled = _swizzled(q.dtype)
  nqv, nkv = q_vectors.shape[1], kv_vectors.shape[1]
  bounds = _pad_bounds(bounds)

  def body(q_ref, k_ref, v_ref, bounds_ref, qvec_ref, kvvec_ref, out_ref,
           lse_ref):
    smem = (
        plgpu.SMEM((CONSUMERS, ROWS, d), q.dtype, transforms=swizzled),
        plgpu.SMEM((STAGES, bk, d), k.dtype, transforms=swizzled),
        plgpu.SMEM((STAGES, bk, d), v.dtype, transforms=swizzled),
        plgpu.SMEM((CONSUMERS, nqv, ROWS), jnp.int32),
        plgpu.SMEM((STAGES, nkv, bk), jnp.int32),
        plgpu.SMEM((CONSUMERS + 1, _BOUNDS), jnp.int32),
        plgpu.SMEM((CONSUMERS, ROWS), jnp.float32),
    )
    ready = (plgpu.Barrier(num_barriers=CONSUMERS),
             plgpu.Barrier(num_barriers=CONSUMERS),
             plgpu.Barrier(num_barriers=STAGES),
             plgpu.Barrier(num_barriers=STAGES),
             plgpu.Barrier(num_barriers=STAGES),
             plgpu.Barrier(num_barriers=CONSUMERS + 1))
    free = (plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=STAGES),) * 2
    sched = plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=1)

    def scoped(*scratch):
      (smem_refs, ready_refs, free_refs, sched_ref) = scratch
      _kernel(q_ref, k_ref, v_ref, bounds_ref, qvec_ref, kvvec_ref, out_ref,
              lse_ref, (*smem_refs, ready_refs, free_refs, sched_ref),
              st=st, bk=bk, nq=nq)

    pl.run_scoped(scoped, smem, ready, free, sched, collective_axes="wg")

  out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32))
  return plgpu.kernel(
      body, out_type=out_type, grid=(nq, batch, heads),
      grid_names=("q", "b", "h"), num_threads=CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, bounds, q_vectors, kv_vectors)


# --- dK / dV ------------------------------------------------------------------

DKV_BLOCK_Q = 64  # Query rows per step: `[64, 64]` score tiles.
_SPLIT_HEAD_DIM = 256  # From here on the consumers split dK/dV's columns.


def dkv_block_k(head_dim: int) -> int:
  """Keys per program of the dK/dV kernel at a padded head size.

  At Dp <= 128 each consumer owns 64 keys (two `[64, Dp]` float32
  accumulators fit its registers): 128 keys. At Dp = 256 those accumulators
  take both consumers' registers, so a program owns 64 keys and each
  consumer half of dK's and dV's columns.
  """
  return ROWS if head_dim >= _SPLIT_HEAD_DIM else BLOCK_Q


def _probabilities(st: Structure, s, lse, visible):
  """`(p, dcap)` of a transposed score tile: `p = exp(s - lse)`, 0 where
  not `visible` (None: all are), and the soft cap's derivative `dcap` (None
  without a cap). `lse` is in base 2, broadcast to the tile."""
  dcap = None
  scale = st.sm_scale * LOG2E
  if st.softcap is not None:
    t = jnp.tanh(s * (st.sm_scale / st.softcap))
    s, scale = (st.softcap * LOG2E) * t, 1.0
    dcap = 1.0 - t * t
  p = jnp.exp2(s * scale - lse)
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  return p, dcap


def _score_grads(st: Structure, p, dcap, dp_minus_delta, dtype):
  """`ds` of a tile in `dtype`: `p (dp - delta)`, through the soft cap,
  times the softmax scale."""
  ds = p * dp_minus_delta
  if dcap is not None:
    ds = ds * dcap
  return (ds * st.sm_scale).astype(dtype)


class _DkdvRefs:
  """The operands, outputs and scratch of one dK/dV program, and what
  every warpgroup reads the same way."""

  def __init__(self, st: Structure, bq: int, operands, scratch):
    (self.q, self.k, self.v, self.do, self.stats, self.bounds, self.qvec,
     self.kvvec, self.dk, self.dv) = operands
    (self.k_smem, self.v_smem, self.kvvec_smem, self.q_smem, self.do_smem,
     self.stats_smem, self.qvec_smem, self.bounds_smem, self.exchange,
     own_ready, ready, self.free) = scratch
    (self.k_ready, self.v_ready, self.kvvec_ready,
     self.bounds_ready) = own_ready
    (self.q_ready, self.do_ready, self.stats_ready,
     self.qvec_ready) = ready
    self.st, self.bq = st, bq
    self.dtype = self.q.dtype
    self.q_names, self.kv_names = st.vectors()
    self.tile, self.batch, self.kv_head = (
        lax.axis_index("k"), lax.axis_index("b"), lax.axis_index("h"))
    self.wg = lax.axis_index("wg")

  def column(self, ref):
    """A per-query `[bq]` vector in shared memory, across a `[64, bq]`
    transposed tile."""
    return lax.broadcast_in_dim(
        _load_vector(ref, plgpu.Layout.WGMMA.reduce(0)), (ROWS, self.bq), [1])

  def key_vectors(self, smem):
    """The keys' structure vectors, across a `[64, bq]` transposed tile."""
    return {name: lax.broadcast_in_dim(
        _load_vector(smem.at[n], plgpu.Layout.WGMMA.reduce(1)),
        (ROWS, self.bq), [0]) for n, name in enumerate(self.kv_names)}

  def visible(self, slot, kv_vec):
    """The structured mask of step `slot`'s transposed tile."""
    q_vec = {name: self.column(self.qvec_smem.at[slot, n])
             for n, name in enumerate(self.q_names)}
    return _visible(self.st, q_vec, kv_vec)

  def loop(self, lo, flo, fhi, hi, step, carry):
    """Runs `step(i, carry, masked, base)` over every query head's tiles
    `[lo, hi)`, those outside `[flo, fhi)` masked; returns the carry."""
    steps = hi - lo

    def head(g, carry):
      base = g * steps
      masked = functools.partial(step, masked=True, base=base)
      carry = lax.fori_loop(lo, flo, masked, carry)
      carry = lax.fori_loop(
          flo, fhi, functools.partial(step, masked=False, base=base), carry)
      return lax.fori_loop(fhi, hi, masked, carry)

    return lax.fori_loop(0, self.st.groups, head, carry)

  def produce(self, lo, hi):
    """The producer warpgroup: streams every step's q, dO, stats and query
    vectors into the `STAGES` slots."""
    plgpu.set_max_registers(40, action="decrease")
    steps = hi - lo
    per_head = jnp.maximum(steps, 1)
    bq = self.bq

    def load(n, slot):  # The n-th step: query head g, query tile i.
      g, i = lax.div(n, per_head), lo + lax.rem(n, per_head)
      head = self.kv_head * self.st.groups + g
      rows = pl.ds(i * bq, bq)
      plgpu.copy_gmem_to_smem(self.q.at[self.batch, rows, head],
                              self.q_smem.at[slot], self.q_ready.at[slot])
      plgpu.copy_gmem_to_smem(self.do.at[self.batch, rows, head],
                              self.do_smem.at[slot], self.do_ready.at[slot])
      plgpu.copy_gmem_to_smem(self.stats.at[self.batch, head, :, rows],
                              self.stats_smem.at[slot],
                              self.stats_ready.at[slot])
      plgpu.copy_gmem_to_smem(self.qvec.at[self.batch, :, rows],
                              self.qvec_smem.at[slot],
                              self.qvec_ready.at[slot])

    total = self.st.groups * steps
    for slot in range(STAGES):
      pl.when(slot < total)(functools.partial(load, slot, slot))

    def refill(n, _):
      slot = lax.rem(n, STAGES)
      plgpu.barrier_wait(self.free.at[slot])
      load(n, slot)

    lax.fori_loop(STAGES, total, refill, None)


def _zeros(cols: int):
  """A zero `[64, cols]` float32 accumulator in the `wgmma` layout."""
  return plgpu.layout_cast(jnp.zeros((ROWS, cols), jnp.float32),
                           plgpu.Layout.WGMMA)


def _dkdv_rows_consumer(r: _DkdvRefs, lo, flo, fhi, hi):
  """Dp <= 128: warpgroup w < 2 owns keys `[64 w, 64 w + 64)` of the
  program's 128 and all of their dK and dV columns."""
  wg, batch, kv_head, bq = r.wg, r.batch, r.kv_head, r.bq
  keys = pl.ds(r.tile * BLOCK_Q + wg * ROWS, ROWS)
  k_tile, v_tile = r.k_smem.at[wg], r.v_smem.at[wg]
  plgpu.copy_gmem_to_smem(r.k.at[batch, keys, kv_head], k_tile,
                          r.k_ready.at[wg])
  plgpu.copy_gmem_to_smem(r.v.at[batch, keys, kv_head], v_tile,
                          r.v_ready.at[wg])
  plgpu.copy_gmem_to_smem(r.kvvec.at[batch, :, keys], r.kvvec_smem.at[wg],
                          r.kvvec_ready.at[wg])
  plgpu.barrier_wait(r.kvvec_ready.at[wg])
  kv_vec = r.key_vectors(r.kvvec_smem.at[wg])
  plgpu.barrier_wait(r.k_ready.at[wg])
  plgpu.barrier_wait(r.v_ready.at[wg])

  def step(i, carry, masked: bool, base):
    dk, dv = carry
    slot = lax.rem(base + i - lo, STAGES)
    plgpu.barrier_wait(r.q_ready.at[slot])
    plgpu.barrier_wait(r.do_ready.at[slot])

    def transposed_scores(s_ref, dp_ref):  # s^T = k q^T, dp^T = v do^T.
      plgpu.wgmma(s_ref, k_tile, r.q_smem.at[slot].transpose((1, 0)))
      plgpu.wgmma(dp_ref, v_tile, r.do_smem.at[slot].transpose((1, 0)))
      return s_ref[...], dp_ref[...]

    s, dp = pl.run_scoped(transposed_scores,
                          plgpu.ACC((ROWS, bq), jnp.float32),
                          plgpu.ACC((ROWS, bq), jnp.float32))
    plgpu.barrier_wait(r.stats_ready.at[slot])
    plgpu.barrier_wait(r.qvec_ready.at[slot])
    p, dcap = _probabilities(r.st, s, r.column(r.stats_smem.at[slot, 0]),
                             r.visible(slot, kv_vec) if masked else None)
    ds = _score_grads(r.st, p, dcap, dp - r.column(r.stats_smem.at[slot, 1]),
                      r.dtype)

    def accumulate(refs):  # dv += p^T do, dk += ds^T q (transposed tiles).
      dv_ref, dk_ref = refs
      plgpu.wgmma(dv_ref, p.astype(r.dtype), r.do_smem.at[slot])
      plgpu.wgmma(dk_ref, ds, r.q_smem.at[slot])

    dv, dk = pl.run_state(accumulate)((plgpu.ACC.init(dv),
                                       plgpu.ACC.init(dk)))
    plgpu.barrier_arrive(r.free.at[slot])
    return dk, dv

  dk, dv = r.loop(lo, flo, fhi, hi, step, (_zeros(r.k.shape[-1]),
                                           _zeros(r.v.shape[-1])))
  k_tile[...] = dk.astype(r.dtype)  # K and V are spent: reuse their tiles.
  v_tile[...] = dv.astype(r.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_tile, r.dk.at[batch, keys, kv_head])
  plgpu.copy_smem_to_gmem(v_tile, r.dv.at[batch, keys, kv_head])
  plgpu.wait_smem_to_gmem(0)


def _dkdv_columns_consumer(r: _DkdvRefs, lo, flo, fhi, hi, *, w: int):
  """Dp = 256: the program's 64 keys; warpgroup w owns dK's and dV's
  columns `[128 w, 128 w + 128)`.

  Per step, warpgroup 0 computes `s^T = k q^T` and
  `p^T`, the other `dp^T = v do^T` and passes `dp^T - delta` to it through
  shared memory; the first forms `ds^T` and passes it and `p^T` back. Each
  then accumulates its columns: `dv_w += p^T do_w`, `dk_w += ds^T q_w`. The
  exchange tiles are single: warpgroup 0 writes `p^T` and `ds^T` once the
  other has read the last ones (`mm_done`).
  """
  scores = w == 0
  (p_smem, x_smem, ds_smem, p_ready, x_ready, ds_ready, mm_done,
   both_done) = r.exchange
  batch, kv_head, bq, dtype = r.batch, r.kv_head, r.bq, r.dtype
  half = r.k.shape[-1] // CONSUMERS
  cols = pl.ds(w * half, half)
  keys = pl.ds(r.tile * ROWS, ROWS)
  k_tile, v_tile = r.k_smem.at[0], r.v_smem.at[0]
  if scores:
    plgpu.copy_gmem_to_smem(r.k.at[batch, keys, kv_head], k_tile,
                            r.k_ready.at[0])
    plgpu.copy_gmem_to_smem(r.kvvec.at[batch, :, keys], r.kvvec_smem.at[0],
                            r.kvvec_ready.at[0])
    plgpu.barrier_wait(r.kvvec_ready.at[0])
    kv_vec = r.key_vectors(r.kvvec_smem.at[0])
    plgpu.barrier_wait(r.k_ready.at[0])
  else:
    plgpu.copy_gmem_to_smem(r.v.at[batch, keys, kv_head], v_tile,
                            r.v_ready.at[0])
    plgpu.barrier_wait(r.v_ready.at[0])
    plgpu.barrier_arrive(mm_done)  # The exchange tiles start free.

  def step(i, carry, masked: bool, base):
    dk, dv = carry
    slot = lax.rem(base + i - lo, STAGES)
    plgpu.barrier_wait(r.q_ready.at[slot])
    plgpu.barrier_wait(r.do_ready.at[slot])
    plgpu.barrier_wait(r.stats_ready.at[slot])
    q_cols, do_cols = r.q_smem.at[slot, :, cols], r.do_smem.at[slot, :, cols]

    def transposed(operand, tile):  # operand @ tile^T, [64, bq].
      def matmul(acc_ref):
        plgpu.wgmma(acc_ref, operand, tile.transpose((1, 0)))
        return acc_ref[...]
      return pl.run_scoped(matmul, plgpu.ACC((ROWS, bq), jnp.float32))

    if scores:
      s = transposed(k_tile, r.q_smem.at[slot])
      plgpu.barrier_wait(r.qvec_ready.at[slot])
      p, dcap = _probabilities(r.st, s, r.column(r.stats_smem.at[slot, 0]),
                               r.visible(slot, kv_vec) if masked else None)
      p_low = p.astype(dtype)
      plgpu.barrier_wait(mm_done)  # The other has read the last p, ds.
      p_smem[...] = p_low
      plgpu.commit_smem()
      plgpu.barrier_arrive(p_ready)

      def accumulate(refs):
        dv_ref, dk_ref = refs
        plgpu.wgmma(dv_ref, p_low, do_cols)
        plgpu.barrier_wait(x_ready)
        x = _load_vector(x_smem, plgpu.Layout.WGMMA).astype(jnp.float32)
        ds = _score_grads(r.st, p, dcap, x, dtype)
        ds_smem[...] = ds
        plgpu.commit_smem()
        plgpu.barrier_arrive(ds_ready)
        plgpu.wgmma(dk_ref, ds, q_cols)
    else:
      dp = transposed(v_tile, r.do_smem.at[slot])
      x_smem[...] = (dp - r.column(r.stats_smem.at[slot, 1])).astype(dtype)
      plgpu.commit_smem()
      plgpu.barrier_arrive(x_ready)

      def accumulate(refs):
        dv_ref, dk_ref = refs
        plgpu.barrier_wait(p_ready)
        plgpu.wgmma(dv_ref, p_smem, do_cols)
        plgpu.barrier_wait(ds_ready)
        plgpu.wgmma(dk_ref, ds_smem, q_cols)

    dv, dk = pl.run_state(accumulate)((plgpu.ACC.init(dv),
                                       plgpu.ACC.init(dk)))
    if not scores:
      plgpu.barrier_arrive(mm_done)
    plgpu.barrier_arrive(r.free.at[slot])
    return dk, dv

  dk, dv = r.loop(lo, flo, fhi, hi, step, (_zeros(half), _zeros(half)))

  def meet():
    plgpu.barrier_arrive(both_done)
    plgpu.barrier_wait(both_done)

  meet()  # K and V are spent: both warpgroups write their columns there.
  k_tile.at[:, cols][...] = dk.astype(dtype)
  v_tile.at[:, cols][...] = dv.astype(dtype)
  plgpu.commit_smem()
  meet()
  out, tile = (r.dk, k_tile) if scores else (r.dv, v_tile)
  plgpu.copy_smem_to_gmem(tile, out.at[batch, keys, kv_head])
  plgpu.wait_smem_to_gmem(0)


def _dkdv_kernel(*refs, st: Structure, bq: int):
  """One program: `dkv_block_k(Dp)` keys of one (batch, KV head), every
  query head of its group."""
  r = _DkdvRefs(st, bq, refs[:10], refs[10])
  lo, flo, fhi, hi = _tile_bounds(r.bounds.at[r.batch, r.tile],
                                  r.bounds_smem.at[r.wg],
                                  r.bounds_ready.at[r.wg])
  columns = r.k.shape[-1] >= _SPLIT_HEAD_DIM

  @pl.when(r.wg < CONSUMERS)
  def _consumers():
    plgpu.set_max_registers(232, action="increase")
    if not columns:
      _dkdv_rows_consumer(r, lo, flo, fhi, hi)
    else:
      for w in range(CONSUMERS):
        pl.when(r.wg == w)(functools.partial(
            _dkdv_columns_consumer, r, lo, flo, fhi, hi, w=w))

  @pl.when(r.wg == CONSUMERS)
  def _producer():
    r.produce(lo, hi)


def dkdv(st: Structure, q, k, v, do, lse2, delta, bounds, q_vectors,
         kv_vectors):
  """dK and dV on padded operands (the Triton dK/dV kernel's function).

  Args:
    st: the call's static structure.
    q: `[B, Sqp, H, Dp]`, bf16 or fp16, Sqp a multiple of `DKV_BLOCK_Q`.
    k: `[B, Skp, Hkv, Dp]`, Skp a multiple of `dkv_block_k(Dp)`.
    v: `[B, Skp, Hkv, Dp]`.
    do: `[B, Sqp, H, Dp]`, the output's cotangent.
    lse2: float32 `[B, H, Sqp]`, the rows' log-sum-exp in base 2 (0 for
      rows that see no key).
    delta: float32 `[B, H, Sqp]`, `rowsum(dO * O)` (less the lse's
      cotangent).
    bounds: int32 `[B, Skp // dkv_block_k(Dp), 4]`, per key tile the query
      tiles (`DKV_BLOCK_Q` rows) that may see it, as `forward`'s.
    q_vectors: int32 `[B, Nq, Sqp]` (a zero `[B, 1, Sqp]` when Nq = 0).
    kv_vectors: int32 `[B, Nk, Skp]`.

  Returns:
    `(dk [B, Skp, Hkv, Dp], dv [B, Skp, Hkv, Dp])` in k's dtype.
  """
  batch, q_len, _, d = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  bq, bk = DKV_BLOCK_Q, dkv_block_k(d)
  if q_len % bq or kv_len % bk:
    raise ValueError(f"flash (Mosaic GPU): Sqp = {q_len} and Skp = {kv_len} "
                     f"must be multiples of {bq} and {bk}.")
  swizzled = _swizzled(q.dtype)
  nqv, nkv = q_vectors.shape[1], kv_vectors.shape[1]
  stats = jnp.stack([lse2, delta], axis=2)  # [B, H, 2, Sqp]
  bounds = _pad_bounds(bounds)
  key_tiles = bk // ROWS  # One per warpgroup of 64 keys.

  def body(*operands):
    smem = (
        plgpu.SMEM((key_tiles, ROWS, d), k.dtype, transforms=swizzled),
        plgpu.SMEM((key_tiles, ROWS, d), v.dtype, transforms=swizzled),
        plgpu.SMEM((key_tiles, nkv, ROWS), jnp.int32),
        plgpu.SMEM((STAGES, bq, d), q.dtype, transforms=swizzled),
        plgpu.SMEM((STAGES, bq, d), do.dtype, transforms=swizzled),
        plgpu.SMEM((STAGES, 2, bq), jnp.float32),
        plgpu.SMEM((STAGES, nqv, bq), jnp.int32),
        plgpu.SMEM((CONSUMERS + 1, _BOUNDS), jnp.int32),
    )
    exchange = ()
    if key_tiles == 1:  # p^T, dp^T - delta and ds^T; the signals.
      exchange = ((plgpu.SMEM((ROWS, bq), q.dtype, transforms=swizzled),) * 3
                  + (plgpu.Barrier(),) * 4
                  + (plgpu.Barrier(num_arrivals=CONSUMERS),))
    own = (plgpu.Barrier(num_barriers=key_tiles),) * 3 + (
        plgpu.Barrier(num_barriers=CONSUMERS + 1),)
    ready = (plgpu.Barrier(num_barriers=STAGES),) * 4
    free = plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=STAGES)

    def scoped(smem_refs, exchange_refs, own_refs, ready_refs, free_ref):
      _dkdv_kernel(*operands, (*smem_refs, exchange_refs, own_refs,
                               ready_refs, free_ref), st=st, bq=bq)

    pl.run_scoped(scoped, smem, exchange, own, ready, free,
                  collective_axes="wg")

  out_type = (jax.ShapeDtypeStruct(k.shape, k.dtype),
              jax.ShapeDtypeStruct(v.shape, v.dtype))
  return plgpu.kernel(
      body, out_type=out_type, grid=(kv_len // bk, batch, kv_heads),
      grid_names=("k", "b", "h"), num_threads=CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, do, stats, bounds, q_vectors, kv_vectors)
