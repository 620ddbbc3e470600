"""The kernels' side of the mods in the Mosaic GPU kernels: the program
values' rows as kernel operands, their shared-memory scratch, and each
consumer's reads of them into a `mosaic_mods.TileMods`.

XLA computes the rows (`mosaic_mods.program_rows`: float32 and int32
`[B, H, ROW]`, None where a call has none of a dtype); a kernel takes the
ones that exist as operands (`row_operands`), gives each consumer a
shared-memory row of them (`row_scratch`) and reads the program's values
once: one (batch row, head) in the forward and dQ kernels
(`consumer_mods`), the G query heads of a KV head in the dK/dV kernel
(`group_rows`, then `head_mods` per head).

Glossary of shapes:
- B: batch size; H: query heads; G: query heads per KV head.
- ROW: program values per row (`mosaic_mods.ROW`).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from flexible_attention.kernels.flash.mosaic_common import CONSUMERS
from flexible_attention.kernels.flash.mosaic_common import FUSED_MODS_SMEM
from flexible_attention.kernels.flash.mosaic_common import ROWS
from flexible_attention.kernels.flash.mosaic_common import smem_bytes
from flexible_attention.kernels.flash.mosaic_mod_split import read_counts
from flexible_attention.kernels.flash.mosaic_mods import ROW
from flexible_attention.kernels.flash.mosaic_mods import TileMods
from flexible_attention.kernels.flash.mosaic_mods import grad_slots
from flexible_attention.kernels.flash.mosaic_mods import plan


def row_operands(mod_rows) -> tuple[Any, ...]:
  """The kernel operands of `program_rows`' result (those not None)."""
  return tuple(x for x in mod_rows if x is not None)


def split_row_refs(mod_rows, refs: list) -> tuple[Any, ...]:
  """`(floats, ints)` refs (None where `mod_rows` has none), popped from
  the front of a kernel body's `refs`."""
  return tuple(None if x is None else refs.pop(0) for x in mod_rows)


def row_scratch(mod_rows, heads: tuple[int, ...] = (),
                copies: int = 1) -> tuple[Any, ...]:
  """Each consumer's shared-memory row of the program values (`heads`
  rows: `(G,)` in the dK/dV kernel, whose programs run every query head of
  a group) and its barrier, per operand of `row_operands`; `copies` of
  each (the persistent forward fetches the next item's values during this
  one's): row and barrier `copy * CONSUMERS + wg`."""
  return tuple((plgpu.SMEM((copies * CONSUMERS, *heads, ROW), x.dtype),
                plgpu.Barrier(num_barriers=copies * CONSUMERS))
               for x in row_operands(mod_rows))


def dkv_mods_scratch(km, groups: int) -> tuple[Any, Any]:
  """The dK/dV kernel's shared memory for the mods of `km` (its
  `KernelMods`, which `plan` accepts; None: no mods): each consumer's rows
  of the program values of a group's `groups` query heads (`row_scratch`)
  and its sums of one head's `grad_slots` gradients (None without)."""
  if km is None:
    return (), None
  rows = tuple(None if n == 0 else jax.ShapeDtypeStruct((ROW,), dtype)
               for n, dtype in zip(plan(km).counts, (jnp.float32, jnp.int32)))
  n_slots = len(grad_slots(km))
  return (row_scratch(rows, (groups,)),
          plgpu.SMEM((CONSUMERS, n_slots, ROWS), jnp.float32)
          if n_slots else None)


def fused_mods_reason(km, head_dim: int, groups: int) -> str | None:
  """Why the fused backward (the dK/dV kernel with dQ, padded head size
  `head_dim` <= 128) cannot run the mods of `km` with `groups` query heads
  per KV head: their shared memory (`dkv_mods_scratch`) over what the
  kernel leaves them (`FUSED_MODS_SMEM`), or None."""
  used = smem_bytes(dkv_mods_scratch(km, groups))
  if used <= FUSED_MODS_SMEM[head_dim]:
    return None
  return (f"its fused dQ (atomic_dq=True) leaves {FUSED_MODS_SMEM[head_dim]} "
          f"bytes of shared memory to score_mod / mask_mod at padded head "
          f"size {head_dim}, and this call's take {used} (each consumer's "
          f"program values of the group's {groups} query heads and its "
          f"{len(grad_slots(km))} gradient sums); use atomic_dq=False (the "
          f"split backward)")


def split_row_scratch(mod_rows, scratch) -> tuple[Any, ...]:
  """`row_scratch`'s refs as `((smem, barrier) | (None, None))` per row."""
  scratch = list(scratch)
  return tuple((None, None) if x is None else scratch.pop(0)
               for x in mod_rows)


def fetch_rows(mod_refs, mod_scratch, batch, head, index):
  """Starts the copies of the program values of (batch row, head) into the
  shared-memory rows `index` of `mod_scratch` (`row_scratch`'s)."""
  for ref, (row_smem, row_ready) in zip(mod_refs, mod_scratch):
    if ref is not None:
      plgpu.copy_gmem_to_smem(ref.at[batch, head], row_smem.at[index],
                              row_ready.at[index])


def fetched_mods(st, mod_scratch, index, shape):
  """The `TileMods` of the call `st` (`structure.Static`) on `shape` tiles
  from the values `fetch_rows` copied into rows `index`, once they arrive
  (None without mods)."""
  if st.mods is None:
    return None
  scalars = []
  for (row_smem, row_ready), count in zip(mod_scratch,
                                          read_counts(st.mods, st.causal)):
    if row_smem is None:
      scalars.append(())
      continue
    plgpu.barrier_wait(row_ready.at[index])
    scalars.append(tuple(row_smem[index, i] for i in range(count)))
  return TileMods(st.mods, scalars, shape, st.position_bound, st.causal)


def consumer_mods(st, mod_refs, mod_scratch, batch, head, wg, shape):
  """Consumer `wg`'s `TileMods` of the call `st` on `shape` tiles, for the
  program's batch row and head: its values read once through its
  shared-memory rows (None without mods)."""
  if st.mods is None:
    return None
  fetch_rows(mod_refs, mod_scratch, batch, head, wg)
  return fetched_mods(st, mod_scratch, wg, shape)


def group_rows(mod_refs, mod_scratch, batch, kv_head, groups: int, wg):
  """Consumer `wg`'s copy of the program values of the `groups` query heads
  of KV head `kv_head` (the dK/dV kernel's program), batch row `batch`:
  per operand its shared-memory rows `[G, ROW]` (None where none), copied
  once by TMA, after their barrier."""
  rows = []
  for ref, (row_smem, row_ready) in zip(mod_refs, mod_scratch):
    if ref is not None:
      plgpu.copy_gmem_to_smem(ref.at[batch, pl.ds(kv_head * groups, groups)],
                              row_smem.at[wg], row_ready.at[wg])
    rows.append(None if ref is None else row_smem.at[wg])
  for ref, (_, row_ready) in zip(mod_refs, mod_scratch):
    if ref is not None:
      plgpu.barrier_wait(row_ready.at[wg])
  return tuple(rows)


def head_mods(st, rows, g, shape):
  """The `TileMods` of the call `st` for query head `g` of a group
  (dynamic) on `shape` tiles: its values read as scalars from
  `group_rows`' rows."""
  scalars = [() if ref is None else tuple(ref[g, i] for i in range(count))
             for ref, count in zip(rows, read_counts(st.mods, st.causal))]
  return TileMods(st.mods, scalars, shape, st.position_bound, st.causal)
