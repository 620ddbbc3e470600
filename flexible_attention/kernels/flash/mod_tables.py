"""Block sparsity from a `mask_mod`: its tile tables, derived at trace time.

The flash kernels skip a tile that the structured mask makes invisible and
leave a fully visible one unmasked (`structure.tile_tables`). A `mask_mod`
joins this when its value is KNOWN at trace time, i.e. when

- it does not depend on `mod_args` (a dependence walk over its jaxpr: no
  output reads a `mod_args` input), and
- the arguments it does depend on are concrete: the query and key
  positions (the static default positions are: `core/inputs.py` builds
  them with numpy; explicit positions, a KV cache's, or positions under
  `shard_map` / `ulysses` are traced values) and, if it reads `batch` /
  `head`, the record's batch / head offsets (concrete outside `shard_map`);
- no mesh is set as context (`jax.set_mesh`, `use_abstract_mesh`: under an
  abstract mesh alone JAX runs nothing eagerly, and inside `jit` the two
  cannot be told apart).

Then the mask_mod is evaluated once, eagerly (`jax.ensure_compile_time_eval`,
in chunks of query tiles), on the padded positions the kernels use, and
reduced per (query tile, key tile) to `maybe` (some pair visible) and `full`
(every pair visible). The tables are per batch row (the structure tables'
`[B, nq, nk]`) and the union over the query heads: `maybe` is the OR, `full`
the AND over heads, so a head-dependent mask skips only tiles no head sees.
`structure.tile_tables` ANDs them into its own. Cost: one evaluation of the
mask over `[B', H', Sqp, Skp]` at trace time, with B' (H') 1 when the mask
does not read `batch` (`head`).

Otherwise (`derive` returns None) nothing is derived: every tile the
structure allows is loaded and masked with the mask_mod, as before.

Glossary of shapes:
- B: batch size; H: query heads (of the kernel's part).
- Sqp, Skp: query and key lengths padded to whole tiles.
- nq, nk: the number of query and key tiles of one kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flexible_attention.core.inputs import concrete
from flexible_attention.kernels.flash import mod_lowering

_CHUNK = 1 << 24  # Mask elements evaluated at once.


def _depends(jaxpr, seeds: set) -> bool:
  """Whether any output of `jaxpr` depends on the invars `seeds`
  (conservative through nested calls: every output of a call that reads
  a dependent value is dependent)."""
  dep = set(seeds)
  for eqn in jaxpr.eqns:
    if any(not hasattr(v, "val") and v in dep for v in eqn.invars):
      dep.update(eqn.outvars)
  return any(not hasattr(v, "val") and v in dep for v in jaxpr.outvars)


def dependence(km: mod_lowering.KernelMods) -> frozenset[str]:
  """What the mask_mod's output depends on, of `batch`, `head`, `q_pos`,
  `kv_pos` and `args` (`mod_args`)."""
  jaxpr = mod_lowering.make_jaxpr(km, "mask_mod", (1, 1, 16, 16)).jaxpr
  invars = jaxpr.invars
  groups = {"batch": {invars[0]}, "head": {invars[1]},
            "q_pos": {invars[2]}, "kv_pos": {invars[3]},
            "args": set(invars[4:])}
  return frozenset(k for k, seeds in groups.items()
                   if _depends(jaxpr, seeds))


def position_bound(vis) -> int | None:
  """The largest magnitude of `vis`'s query and key positions when both are
  concrete (the default ones), else None. The kernels pad them with their
  edge values or zeros, which it bounds too."""
  positions = [concrete(vis.q_positions), concrete(vis.kv_positions)]
  if any(x is None for x in positions):
    return None
  return max((int(np.abs(x.astype(np.int64)).max()) if x.size else 0)
             for x in positions)


def _pad(x, size: int, mode: str):
  pad = size - x.shape[1]
  return np.pad(x, ((0, 0), (0, pad)), mode=mode) if pad else x


def _mesh_context() -> bool:
  """Whether a mesh is set as context (`jax.set_mesh`, or an abstract mesh
  alone for ahead-of-time lowering, under which JAX refuses to run
  anything eagerly, so no table could be evaluated; inside `jit` the two
  cannot be told apart)."""
  abstract = getattr(jax.sharding, "get_abstract_mesh", lambda: None)()
  return abstract is not None and not abstract.empty


def derive(km, mods, vis, *, num_heads: int, q_pad: int, kv_pad: int,
           blocks) -> dict[tuple[int, int], tuple[Any, Any]] | None:
  """The mask_mod's tile tables, or None when they are not static.

  Args:
    km: the call's `mod_lowering.KernelMods` (or None).
    mods: the call's `core.mods.Mods` (or None).
    vis: the call's `Visibility` (its positions).
    num_heads: H.
    q_pad, kv_pad: Sqp and Skp.
    blocks: the kernels' `(block_q, block_k)` pairs.

  Returns:
    `{(block_q, block_k): (maybe, full)}`, numpy bool `[B|1, nq, nk]`: tile
    `(i, j)` holds a pair the mask_mod keeps for some head / keeps every
    pair for every head; None without a mask_mod, or when it reads
    `mod_args` or traced positions or offsets (module docstring), or under
    a context mesh (`_mesh_context`).
  """
  if km is None or km.mask_mod is None or _mesh_context():
    return None
  uses = dependence(km)
  if "args" in uses:
    return None
  q_pos, kv_pos = concrete(vis.q_positions), concrete(vis.kv_positions)
  b_off, h_off = concrete(mods.batch_offset), concrete(mods.head_offset)
  if q_pos is None or kv_pos is None or (
      "batch" in uses and b_off is None) or ("head" in uses and h_off is None):
    return None
  same_rows = (q_pos == q_pos[:1]).all() and (kv_pos == kv_pos[:1]).all()
  batch = 1 if "batch" not in uses and same_rows else q_pos.shape[0]
  heads = num_heads if "head" in uses else 1
  # The kernels' padded positions (`structure.structure_vectors`).
  q_pos = _pad(q_pos.astype(np.int32), q_pad, "edge")[:batch]  # [B', Sqp]
  kv_pos = _pad(kv_pos.astype(np.int32), kv_pad, "constant")[:batch]
  real_keys = np.arange(kv_pad) < vis.kv_positions.shape[1]  # [Skp]
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), mods.args)
  local = dataclasses.replace(
      mods, args=zeros,
      batch_offset=np.int32(0 if b_off is None else b_off),
      head_offset=np.int32(0 if h_off is None else h_off))
  rows = max(bq for bq, _ in blocks)
  step = max(rows, (_CHUNK // max(1, batch * heads * kv_pad)) // rows * rows)
  parts = {key: ([], []) for key in blocks}
  with jax.ensure_compile_time_eval():
    for start in range(0, q_pad, step):
      stop = min(q_pad, start + step)
      keep = local.visible(batch, heads, q_pos[:, start:stop], kv_pos)
      keep = jnp.broadcast_to(keep, (batch, heads, stop - start, kv_pad))
      for (bq, bk), (maybe, full) in parts.items():
        shape = (batch, heads, (stop - start) // bq, bq, kv_pad // bk, bk)
        tiles = keep.reshape(shape)
        real = jnp.broadcast_to(real_keys.reshape(kv_pad // bk, bk), shape)
        # Padding keys (invisible anyway) neither make a tile visible nor
        # keep it from being full.
        maybe.append(np.asarray(jnp.any(tiles & real, (1, 3, 5))))
        full.append(np.asarray(jnp.all(tiles | ~real, (1, 3, 5))))
  return {key: (np.concatenate(maybe, 1), np.concatenate(full, 1))
          for key, (maybe, full) in parts.items()}
