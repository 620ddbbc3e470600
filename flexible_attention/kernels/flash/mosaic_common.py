"""What flash's Mosaic GPU (Hopper) kernels share: tiles, operands, masking.

The forward (`mosaic_fwd`), the dK/dV kernel (`mosaic_bwd`) and the dQ
kernel (`mosaic_dq`) are written for sm_90 the way FlashAttention-3
describes it (Shah et al., 2024, https://arxiv.org/abs/2407.08608): a
producer warpgroup streams tiles into shared memory with TMA, two consumer
warpgroups of `ROWS` rows run asynchronous `wgmma`s. This module holds their
fixed tiles (which the launch policy reads), `unsupported_reason`,
`fused_dq_reason`, `dkv_mods_reason` and `dq_reason` (what they cannot
serve), and the pieces they share: the swizzled shared-memory layout, the
stacked structure vectors and the structured mask of a tile
(`masks.pair_visible`, the library's one mask rule), a score tile's `p`
and `ds`, and what the forward and dQ kernels (both over query tiles) do
alike: the producer that streams K and V (`stream_tiles`), the consumers'
structure vectors and their ping-pong barrier. Which tiles the programs
run, in what order (the bounds table's rows, the persistent forward's
`WorkOrder`), is `mosaic_schedule`'s.

CI checks that the kernels lower for CUDA for every structure they serve
(any jax), runs them in JAX's GPU interpreter on the CPU (jax >= 0.11,
`tests/gpu_interpret.py`), and the GPU machine runs them compiled against
the reference (benchmarks/flash_notes.md).

Glossary of shapes:
- B: batch size.
- Sqp, Skp: query and key lengths padded to whole tiles.
- Dp: the padded head size (64, 128 or 256).
- Nq, Nk: the number of query / key structure vectors (`Static.vectors`).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from flexible_attention.core import dropout as dropout_lib
from flexible_attention.core import masks
from flexible_attention.kernels.flash.structure import LOG2E

ROWS = 64  # Query rows per consumer warpgroup: wgmma's M.
CONSUMERS = 2
BLOCK_Q = ROWS * CONSUMERS
STAGES = 2  # Shared-memory slots of K and V.
# Registers a thread of a consumer warpgroup / of a producer asks for
# (`plgpu.set_max_registers`): two consumers and a producer take 2 * 128 *
# 232 + 128 * 40 = 64512 of a multiprocessor's 65536.
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 40
HEAD_DIMS = (64, 128, 256)
SWIZZLE = 128  # Bytes; a row of 64 bf16 / fp16 values.
BOUNDS_ROW = 32  # A tile's 4 bounds, padded: TMA copies 128-byte rows.
SINK_ROW = 32  # A head's sink logit, padded likewise (the forward's).
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



def load_vector(ref, layout, optimized: bool = True):
  """`ref`'s vector (or tile) in registers, in `layout` (jax 0.10 takes an
  index argument); `optimized=False` lets Mosaic GPU load a layout it has
  no bank-conflict-free plan for (e.g. a `wgmma` tile from an unswizzled
  ref), slower."""
  if _LOAD_TAKES_INDEX:
    return plgpu.load(ref, (), layout=layout, optimized=optimized)
  return plgpu.load(ref, layout=layout, optimized=optimized)



def operands_reason(*, dtype, head_dim: int, value_dim: int,
                    interpret: bool, sizes: str = "head sizes") -> str | None:
  """Why no Mosaic GPU kernel here can take these operands, or None: every
  one is compiled (no interpreter), takes 16-bit floats and D == Dv in
  `HEAD_DIMS` (`sizes` names them in the message)."""
  if interpret:
    return "it has no interpreter (interpret=True)"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"it takes bfloat16 or float16 inputs, not {jnp.dtype(dtype)}"
  if head_dim != value_dim or head_dim not in HEAD_DIMS:
    return (f"it takes {sizes} D == Dv in {HEAD_DIMS}, got D = "
            f"{head_dim}, Dv = {value_dim}")
  return None


def unsupported_reason(*, dtype, head_dim: int, value_dim: int,
                       bias: bool, mask: bool,
                       interpret: bool, precision: Any) -> str | None:
  """Why this kernel cannot serve a call (padded head sizes), or None."""
  reason = operands_reason(dtype=dtype, head_dim=head_dim,
                           value_dim=value_dim, interpret=interpret,
                           sizes="padded head sizes")
  if reason is not None:
    return reason
  if bias or mask:
    return "it takes no bias or dense mask"
  if precision is not None:
    return "it has one matmul precision (the inputs' type, float32 sums)"
  return None



DKV_BLOCK_Q = 64  # Query rows per step: `[64, 64]` score tiles.
SPLIT_HEAD_DIM = 256  # From here on the consumers split dK/dV's columns.
# With WIDE_DKV_STEPS (the default) the split dK/dV kernel at Dp = 64 takes
# steps of WIDE_DKV_BLOCK_Q query rows (`dkv_block_q`): `[64, 128]` score
# tiles, so that each step's waits and barriers serve twice the matmuls,
# whose N reaches the forward's 128 (at Dp = 64 a step's matmuls are half
# those of Dp = 128's; the tiles hold the registers Dp = 128's dK and dV
# take there). On an H100 (jax 0.11.2, bf16, B * S = 16k, H = 32) the
# backward took 0.92-0.97x the 64-row steps' time in each of 8 cells (S =
# 1k to 16k, causal and full; benchmarks/flash_notes.md); False keeps
# 64-row steps, as the fused backward and calls with mods always do.
WIDE_DKV_STEPS = True
WIDE_DKV_BLOCK_Q = 128


def dkv_block_q(head_dim: int, *, fused: bool = False,
                mods: bool = False) -> int:
  """Query rows per step of the dK/dV kernel at a padded head size: 64, or
  with `WIDE_DKV_STEPS` (the default) `WIDE_DKV_BLOCK_Q` at Dp = 64 for
  calls without mods (a split score_mod's key terms are per 64 rows) in
  the split backward (`fused`: the fused one's exchange buffers and dQ
  tiles would not fit twice the rows)."""
  if WIDE_DKV_STEPS and head_dim == 64 and not fused and not mods:
    return WIDE_DKV_BLOCK_Q
  return DKV_BLOCK_Q


def dkv_block_k(head_dim: int) -> int:
  """Keys per program of the dK/dV kernel at a padded head size.

  At Dp <= 128 each consumer owns 64 keys (two `[64, Dp]` float32
  accumulators fit its registers): 128 keys. At Dp = 256 those accumulators
  take both consumers' registers, so a program owns 64 keys and each
  consumer half of dK's and dV's columns.
  """
  return ROWS if head_dim >= SPLIT_HEAD_DIM else BLOCK_Q


def dq_block_k(head_dim: int) -> int:
  """The key tile of the dQ kernel (`mosaic_dq`) per padded head size: 128
  at Dp = 64, 64 above (`wgmma` reads K tiles of at least 64 keys). Its
  consumers hold a float32 `[64, Dp]` dQ and two `[64, bk]` score tiles
  (`s`, `dp`) in registers, the program q and dO beside `STAGES` slots of K
  and V in shared memory (the budget is in `mosaic_dq`'s docstring; not yet
  measured on a GPU)."""
  return 128 if head_dim <= 64 else 64


def dq_reason(head_dim: int) -> str | None:
  """Why the dQ kernel (`mosaic_dq`) cannot serve a padded head size, or
  None: at Dp = 256 q and dO (128 KiB) and two slots of 64-key K and V
  tiles (128 KiB) exceed the 227 KiB of shared memory a block has, and
  dQ, `s` and `dp` 208 of a consumer thread's 232 registers."""
  if head_dim >= SPLIT_HEAD_DIM:
    return (f"its dQ kernel takes padded head sizes below {SPLIT_HEAD_DIM}, "
            f"got {head_dim} (q, dO and two slots of K and V would take 256 "
            f"KiB of the 227 KiB of shared memory a block has); use "
            f"dq_backend='triton' there")
  return None


def dkv_mods_reason(head_dim: int) -> str | None:
  """Why the dK/dV kernel cannot evaluate a call's score_mod / mask_mod
  (one `mosaic_mods` accepts) at a padded head size, or None.

  Only the rows layout (Dp <= 128) evaluates mods: at Dp = 256 (the columns
  layout) warpgroup 0 alone forms `p` and `ds` while the other waits, and
  the mods' values, derivatives and slot sums would join accumulators that
  already take its registers. Those calls keep the Triton dK/dV kernel.
  With its fused dQ (`atomic_dq`) the kernel also needs the mods' shared
  memory to fit in `FUSED_MODS_SMEM[Dp]` (`mosaic_bwd.dkdv` checks it).
  """
  if head_dim >= SPLIT_HEAD_DIM:
    return (f"its dK/dV kernel evaluates score_mod / mask_mod at padded head "
            f"sizes below {SPLIT_HEAD_DIM} (the rows layout), got "
            f"{head_dim}; use dkv_backend='triton' there")
  return None


# The shared memory the fused dK/dV kernel (`atomic_dq`) leaves to score_mod
# / mask_mod, by padded head size: each consumer's rows of the program
# values of the group's query heads, and its gradient sums (`mosaic_bwd.
# dkdv`). Without mods the kernel takes 197 KiB at Dp = 128 and 117 KiB at
# 64 of the 227 KiB a block may have; the rest covers the structure vectors
# (1 KiB each) and the alignment of the buffers. ALiBi takes 0.5 KiB plus
# 0.25 KiB a query head of the group.
FUSED_MODS_SMEM = {64: 96 * 1024, 128: 24 * 1024}


def smem_bytes(scratch) -> int:
  """The bytes of the shared-memory buffers (`plgpu.SMEM`) of a pytree of
  scratch specs (barriers and None count nothing)."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(scratch)
             if isinstance(x, pl.MemoryRef))


def fused_dq_reason(head_dim: int) -> str | None:
  """Why the dK/dV kernel cannot also compute dQ (the fused backward,
  `LaunchConfig.atomic_dq`) at a padded head size, or None.

  Only the rows layout (Dp <= 128) has it: each consumer adds a `[64, Dp]`
  float32 share of dQ per step beside its dK and dV accumulators. At
  Dp = 256 (the columns layout) those accumulators already take both
  consumers' registers and the shared memory is full (219 of 227 KiB), so
  that call keeps the split backward (dQ through Triton).
  """
  if head_dim >= SPLIT_HEAD_DIM:
    return (f"its fused dQ (atomic_dq=True) takes padded head sizes below "
            f"{SPLIT_HEAD_DIM}, got {head_dim}; use atomic_dq=False (dQ "
            f"through Triton) there")
  return None


def wgmma_zeros(cols: int | None):
  """A zero `[64, cols]` float32 accumulator in the `wgmma` layout (cols
  None: a `[64]` vector of its rows)."""
  if cols is None:
    return plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32),
                             plgpu.Layout.WGMMA.reduce(1))
  return plgpu.layout_cast(jnp.zeros((ROWS, cols), jnp.float32),
                           plgpu.Layout.WGMMA)


def wgmma_transforms(dtype, swizzle: int = SWIZZLE) -> tuple[Any, ...]:
  """The shared-memory transforms of a `wgmma` operand: rows of `swizzle`
  bytes in tiles of 8 (`[8, 64]` tiles of 16-bit values by default),
  swizzled. A column slice of such a tile is an operand too where it covers
  whole rows of the swizzle."""
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


class TileDropout:
  """The library's dropout keep mask (`core.dropout`) of a program's tiles:
  the seed and batch row hashed once per program (scalars), the head and
  each query row's position once per row vector, the key position per
  element (one `dropout.mix`: about 11 integer ops).

  `words`: the seed's 4 words read from the bounds row (`pad_bounds`);
  `batch`: the program's local batch row (the seed's offsets make batch
  rows and heads global)."""

  def __init__(self, st, words, batch):
    u32 = lambda x: x.astype(jnp.uint32)
    seed0, seed1, batch_offset, self.head_offset = map(u32, words)
    self.threshold = dropout_lib.keep_threshold(st.dropout_rate)
    self.scale = 1.0 / (1.0 - st.dropout_rate)
    self.prefix = dropout_lib.mix(dropout_lib.mix(seed0, seed1),
                                  u32(batch) + batch_offset)

  def rows(self, head, q_pos, shape, dim: int):
    """The running hash of query head `head` (local) and positions `q_pos`
    (a vector), broadcast along `dim` of a `shape` tile."""
    h = dropout_lib.mix(self.prefix, head.astype(jnp.uint32) +
                        self.head_offset)
    return lax.broadcast_in_dim(dropout_lib.mix(h, q_pos), shape, [dim])

  def keep(self, rows, kv_pos):
    """The keep decisions of a tile from `rows` (`self.rows`) and the key
    positions, both broadcast to the tile."""
    return dropout_lib.mix(rows, kv_pos) >= self.threshold


def read_row(gmem_row, smem_row, ready, count: int) -> tuple[Any, ...]:
  """The first `count` scalars of a global-memory row (128 bytes), read by
  a warpgroup through its own shared-memory row: a tile's bounds (`lo,
  flo, fhi, hi`), the program's values of the mods (`mosaic_mods`)."""
  plgpu.copy_gmem_to_smem(gmem_row, smem_row, ready)
  plgpu.barrier_wait(ready)
  return tuple(smem_row[i] for i in range(count))


def visible(st, q_vec: dict, kv_vec: dict):
  """The structured mask of a tile from its vectors, each broadcast to the
  tile's shape (`Static.vectors` names them)."""
  return masks.pair_visible(
      kv_vec["kv_ok"] != 0, q_vec.get("q_pos"), kv_vec.get("kv_pos"),
      causal=st.causal, window=st.window, q_seg=q_vec.get("q_seg"),
      kv_seg=kv_vec.get("kv_seg"))




def logit_scale(st) -> float:
  """What takes a tile's raw `q k^T` to base-2 logits: `sm_scale log2(e)`;
  with a soft cap 1 (its tile is then the base-2 capped logits)."""
  return st.sm_scale * LOG2E if st.softcap is None else 1.0


def probabilities(st, s, lse, visible, score_mod=None, key_terms=None):
  """`(p, dcap, dmod)` of a score tile (or a transposed one): `p = exp(s -
  lse)`, 0 where not `visible` (None: all are), the soft cap's derivative
  `dcap` (None without a cap) and the score_mod's `dmod` (None without
  one). `s` is the raw `q k^T`, `lse` the rows' log-sum-exp in base 2,
  broadcast to the tile; `score_mod` maps the tile's natural-unit logits
  (scaled, soft-capped) to the modified ones and their derivative
  (`mosaic_mods.TileMods.score_grads`). `key_terms`, instead: a split
  score_mod's key terms (`mosaic_mods.split_slot`) in the units of `s`
  (natural ones times `log2(e) / logit_scale(st)`), added to it: one
  operation per element, whose derivative in `s` is 1."""
  dcap = dmod = None
  scale = logit_scale(st)
  if st.softcap is not None:
    t = jnp.tanh(s * (st.sm_scale / st.softcap))
    s = (st.softcap * LOG2E) * t
    dcap = 1.0 - t * t
  if key_terms is not None:
    s = s + key_terms
  elif score_mod is not None:
    s = s * (scale / LOG2E)  # Natural units.
    s, dmod = score_mod(s)
    scale = LOG2E
  p = jnp.exp2(s * scale - lse)
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  return p, dcap, dmod


def score_grads(st, p, dcap, dp_minus_delta, dtype, dmod=None):
  """`ds` of a tile in `dtype`: `p (dp - delta)`, through the score_mod
  (`dmod`, zero where invisible whatever the mod's slope) and the soft
  cap, times the softmax scale (the Triton kernels' `ds`)."""
  ds = p * dp_minus_delta
  if dmod is not None:
    ds = jnp.where(ds != 0.0, ds * dmod, 0.0)
  if dcap is not None:
    ds = ds * dcap
  return (ds * st.sm_scale).astype(dtype)


def step_zero(i):
  """Zero, computed from the loop index `i >= 0` of the step that uses it.

  A `wgmma` operand in shared memory reaches the instruction as one 64-bit
  descriptor per 16-wide slice of its contracted dimension. For a tile that
  stays put across a loop (a program's K or V tile), the compiler hoists
  those descriptors out of the loop and keeps them live through it: 8 per
  tile at Dp = 128, beyond what the fused dK/dV kernel's consumers have
  left beside their accumulators, so ptxas spills them and reloads them
  from local memory before each step's matmuls. Indexing the tile with
  this zero (`ref.at[n + step_zero(i)]`) ties the descriptors to the step:
  they are recomputed from the tile's address in it (a few uniform integer
  operations), and nothing is kept."""
  return jnp.minimum(i, 0)


def meet(sched):
  """Both consumers meet at `sched`: the ping-pong of FlashAttention-3 (one
  consumer's matmuls run while the other computes on its registers)."""
  plgpu.barrier_arrive(sched)
  plgpu.barrier_wait(sched)


def fetch_query_vectors(st, qvec_ref, qvec_row, ready, batch, rows):
  """Starts the copy of a consumer's query structure vectors
  (`st.vectors()[0]`) of batch row `batch`, its `ROWS` rows from `rows` on,
  into its shared-memory rows `qvec_row` (`[Nq, ROWS]`), completing
  `ready` (nothing without vectors)."""
  if st.vectors()[0]:
    plgpu.copy_gmem_to_smem(qvec_ref.at[batch, :, pl.ds(rows, ROWS)],
                            qvec_row, ready)


def loaded_query_vectors(st, qvec_row, ready, shape):
  """The vectors `fetch_query_vectors` copied into `qvec_row`, once `ready`
  completes, each broadcast to a `shape` tile: `{name: tile}`."""
  q_names = st.vectors()[0]
  if not q_names:
    return {}
  plgpu.barrier_wait(ready)
  return {name: lax.broadcast_in_dim(
      load_vector(qvec_row.at[n], plgpu.Layout.WGMMA.reduce(1)), shape,
      [0]) for n, name in enumerate(q_names)}


def query_vectors(st, qvec_ref, qvec_smem, ready, batch, wg, rows, shape):
  """Consumer `wg`'s query structure vectors (`st.vectors()[0]`) of batch
  row `batch`, its `ROWS` rows from `rows` on, each broadcast to a `shape`
  tile; read through its shared-memory rows `qvec_smem.at[wg]` (`[Nq,
  ROWS]`) and barrier `ready.at[wg]`."""
  fetch_query_vectors(st, qvec_ref, qvec_smem.at[wg], ready.at[wg], batch,
                      rows)
  return loaded_query_vectors(st, qvec_smem.at[wg], ready.at[wg], shape)


def key_vectors(st, kvvec_smem, slot, names, shape):
  """The key structure vectors `names` of the key tile in `slot` of the
  stream (`kvvec_smem`: `[STAGES, Nk, bk]`), each broadcast to a `shape`
  tile."""
  return {name: lax.broadcast_in_dim(
      key_vector(st, kvvec_smem, slot, name), shape, [1]) for name in names}


def key_vector(st, kvvec_smem, slot, name, dim: int = 0):
  """Key structure vector `name` of the key tile in `slot` (`key_vectors`'
  stream), in registers along the tile's columns (`dim` 0: a `[ROWS, bk]`
  tile's keys) or rows (1: the dK/dV kernel's transposed tile)."""
  return load_vector(kvvec_smem.at[slot, st.vectors()[1].index(name)],
                     plgpu.Layout.WGMMA.reduce(dim))


def stream_tiles(k_ref, v_ref, kvvec_ref, smem, ready, free, *, bk: int,
                 batch, kv_head, lo, hi, base):
  """Streams key tiles `[lo, hi)` of K, V and the keys' structure vectors
  of batch row `batch` and KV head `kv_head` into `STAGES` shared-memory
  slots, as the `base`-th and later tiles of a producer's stream: tile `t`
  goes into slot `(base + t - lo) % STAGES`, once both consumers freed the
  slot's K and V (from the stream's `STAGES`-th tile on). A program that
  runs several query tiles (the persistent forward) streams them one after
  another, so a tile's first key tiles load under the last steps of the
  one before. Returns the stream's count after these tiles.

  Args:
    smem: `(k [STAGES, bk, Dp], v [STAGES, bk, Dp], kv vectors [STAGES, Nk,
      bk])` in shared memory.
    ready: their barriers `(k, v, kv vectors)`, `STAGES` each.
    free: `(k, v)`, `STAGES` barriers of `CONSUMERS` arrivals each.
  """
  k_smem, v_smem, kvvec_smem = smem
  k_ready, v_ready, kvvec_ready = ready
  k_free, v_free = free

  def load(t, _):
    n = base + t - lo
    slot = lax.rem(n, STAGES)

    @pl.when(n >= STAGES)
    def _():
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])

    keys = pl.ds(t * bk, bk)
    plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], k_smem.at[slot],
                            k_ready.at[slot])
    plgpu.copy_gmem_to_smem(kvvec_ref.at[batch, :, keys],
                            kvvec_smem.at[slot], kvvec_ready.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], v_smem.at[slot],
                            v_ready.at[slot])

  lax.fori_loop(lo, hi, load, None)
  return base + (hi - lo)  # lo <= hi (`structure.bounds_table`).


def stream_keys(st, k_ref, v_ref, kvvec_ref, smem, ready, free, *, bk: int,
                batch, head, lo, hi):
  """The producer warpgroup of a program over one query tile (dQ): streams
  key tiles `[lo, hi)` of batch row `batch` and the KV head of query head
  `head` (`head // G`) as `stream_tiles` does, tile `t` into slot `(t -
  lo) % STAGES`."""
  plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
  kv_head = lax.div(head, jnp.array(st.groups, head.dtype))
  stream_tiles(k_ref, v_ref, kvvec_ref, smem, ready, free, bk=bk,
               batch=batch, kv_head=kv_head, lo=lo, hi=hi, base=0)


def stacked_vectors(st, aux, batch: int, q_len: int):
  """The kernels' structure operands: `(q_vectors [B, Nq, Sqp], kv_vectors
  [B, Nk, Skp])`, int32, the vectors `st.vectors()` names stacked in its
  order (`kv_ok` first; a zero `[B, 1, Sqp]` when Nq = 0)."""
  q_names, kv_names = st.vectors()
  q_vectors = (jnp.stack([aux[name] for name in q_names], 1) if q_names
               else jnp.zeros((batch, 1, q_len), jnp.int32))
  kv_vectors = jnp.stack([aux[name] for name in kv_names], 1)
  return q_vectors, kv_vectors
