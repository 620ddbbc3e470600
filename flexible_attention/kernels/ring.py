"""Ring attention: exact attention over a sequence sharded across devices.

Runs inside `jax.shard_map`. Each of the `n` devices of the ring axis holds a
shard of the queries and a shard of the keys/values. K/V blocks (at the KV
head count, never repeated to H) travel around the ring with `lax.ppermute`
together with their positions, kv indices and segment ids, so every
structured mask stays exact under any token layout. Each step attends the
local queries to the block in hand with a per-block kernel and merges the
result through the float32 log-sum-exp (Liu et al., 2023, "Ring Attention
with Blockwise Transformers").

`jax.custom_vjp` spans the whole ring: the residuals are the local q, k, v,
output and log-sum-exp; the backward pass is a second ring in which each
block's dK/dV travel with it and arrive home after `n` steps. Blocks the
structure makes fully invisible (e.g. future blocks under causal) are skipped
in both passes. The per-block kernel is a `BlockKernel` (forward and backward
passes): the blockwise pure-JAX kernel or the fused `flash` kernels.

The next block's `ppermute` is issued before the current block's compute, so
XLA can overlap the transfer with the compute (see the README's note on XLA
flags).

Glossary of shapes (local to one device):
- B: batch; Sq, Sk: local query and key lengths; H, Hkv: heads; D, Dv.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from flexible_attention.core import merge
from flexible_attention.core import mods as mods_lib
from flexible_attention.core.inputs import AttentionInputs
from flexible_attention.core.masks import Visibility
from flexible_attention.core.types import KernelOutput
from flexible_attention.kernels import blockwise
from flexible_attention.kernels import flash as flash_kernel


class BlockKernel(NamedTuple):
  """A pluggable per-block attention kernel.

  Attributes:
    forward: `(q, k, v, vis, dropout, mods) -> (out [B,Sq,H,Dv] float32,
      lse [B,H,Sq] float32)` for one K/V block.
    backward: `(q, k, v, vis, dropout, mods, out, lse, dout, dlse) -> (dq,
      dk, dv, dargs)` float32, where `out` and `lse` are those of the whole
      row (all blocks) and `dargs` the block's share of the gradient of
      `mods.args` (None without a score_mod).
  """

  forward: Callable[..., Any]
  backward: Callable[..., Any]


def blockwise_block_kernel(cfg: blockwise.TileConfig) -> BlockKernel:
  """The blockwise pure-JAX kernel as a ring block kernel."""

  def forward(q, k, v, vis, dropout, mods):
    return blockwise.forward_pass(cfg, q, k, v, None, vis, dropout,
                                  out_dtype=jnp.float32, mods=mods)

  def backward(q, k, v, vis, dropout, mods, out, lse, dout, dlse):
    dq, dk, dv, _, dargs = blockwise.backward_pass(
        cfg, q, k, v, None, vis, dropout, out, lse, dout, dlse, mods)
    return dq, dk, dv, dargs

  return BlockKernel(forward, backward)


def flash_block_kernel(**flash_options) -> BlockKernel:
  """The fused Pallas kernels (`kernels/flash/`) as a ring block
  kernel: the forward writes a float32 partial output for the merge, and
  the backward kernels take the whole row's output and log-sum-exp, so each
  block's dq/dk/dv share comes out in float32.

  Each pass is one jitted program per static configuration (the options,
  shapes and structure of a block), shared by every step of a ring and by
  every ring with the same configuration: a ring of n devices traces and
  lowers its kernels once, not n times.

  Args:
    **flash_options: `flash_kernel.prepare`'s keyword arguments (`sm_scale`,
      `softcap`, `precision`, `block_sizes`, `interpret`; hashable).

  Score and mask mods run inside the kernels, within the flash kernels'
  limits (`kernels/flash/mod_lowering.py`); as the ring differentiates
  every float `mod_args` leaf, its backward refuses a leaf of more than H
  elements (the kernels compute only those gradients), differentiated or
  not.
  """
  options = tuple(sorted(flash_options.items()))

  def forward(q, k, v, vis, dropout, mods):
    return _flash_forward_step(q, k, v, vis, dropout, mods, options=options)

  def backward(q, k, v, vis, dropout, mods, out, lse, dout, dlse):
    return _flash_backward_step(q, k, v, vis, dropout, mods, out, lse, dout,
                                dlse, options=options)

  return BlockKernel(forward, backward)


def _prepare_flash(q, k, v, vis, dropout, mods, options):
  return flash_kernel.prepare(AttentionInputs(q, k, v, None, vis, mods=mods),
                              dropout, float32_results=True, **dict(options))


@functools.partial(jax.jit, static_argnames=("options",))
def _flash_forward_step(q, k, v, vis, dropout, mods, *, options):
  """One block's `(out [B, Sq, H, Dv], lse [B, H, Sq])`, both float32."""
  call = _prepare_flash(q, k, v, vis, dropout, mods, options)
  out, lse, _ = flash_kernel.forward_pass(call, out_dtype=jnp.float32)
  return out, lse


@functools.partial(jax.jit, static_argnames=("options",))
def _flash_backward_step(q, k, v, vis, dropout, mods, out, lse, dout, dlse,
                         *, options):
  """One block's float32 `(dq, dk, dv, dargs)` given the whole row's out and
  lse (dargs: the block's share of the `mod_args` gradient, or None)."""
  call = _prepare_flash(q, k, v, vis, dropout, mods, options)
  dq, dk, dv, _, dargs = flash_kernel.backward_pass(
      call, out, lse, dout, dlse, grad_dtype=jnp.float32)
  return dq, dk, dv, dargs


@dataclasses.dataclass(frozen=True)
class RingConfig:
  """Static settings of a ring (hashable)."""

  axis_name: Any  # The mesh axis of the ring, or None for a single device.
  num_shards: int
  block_kernel: BlockKernel


def _kv_part(vis: Visibility):
  """The parts of the structured mask that travel with the keys."""
  return (vis.kv_positions, vis.kv_indices, vis.kv_segment_ids)


def _with_kv_part(vis: Visibility, part) -> Visibility:
  positions, indices, segments = part
  return dataclasses.replace(vis, kv_positions=positions, kv_indices=indices,
                             kv_segment_ids=segments)


def _rotate(cfg: RingConfig, tree):
  """Sends every array of `tree` to the next device of the ring."""
  if cfg.num_shards == 1:
    return tree
  perm = [(i, (i + 1) % cfg.num_shards) for i in range(cfg.num_shards)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, cfg.axis_name, perm), tree)


def _forward(cfg: RingConfig, q, k, v, vis, dropout, sinks, mods):
  batch, q_len, num_heads, _ = q.shape
  out = jnp.zeros((batch, q_len, num_heads, v.shape[-1]), jnp.float32)
  lse = jnp.full((batch, num_heads, q_len), -jnp.inf, jnp.float32)
  block = (k, v, _kv_part(vis))
  for step in range(cfg.num_shards):
    # Issue the transfer of the next block before computing on this one.
    following = _rotate(cfg, block) if step + 1 < cfg.num_shards else None
    k_blk, v_blk, part = block
    vis_blk = _with_kv_part(vis, part)

    def attend(state, k_blk=k_blk, v_blk=v_blk, vis_blk=vis_blk):
      block_out, block_lse = cfg.block_kernel.forward(q, k_blk, v_blk,
                                                      vis_blk, dropout, mods)
      return merge.merge_pair(*state, block_out, block_lse)

    out, lse = jax.lax.cond(vis_blk.maybe_visible(), attend, lambda s: s,
                            (out, lse))
    block = following
  if sinks is not None:  # The sink: one more part (out 0, lse sinks[h]).
    out, lse = merge.merge_sinks(out, lse, sinks)
  return out.astype(q.dtype), lse


def _backward(cfg: RingConfig, q, k, v, vis, dropout, mods, out, lse, dout,
              dlse):
  """`(dq, dk, dv, dargs)`: dargs (this device's queries' share of the
  gradient of `mods.args`, None without a score_mod) stays here, as dq."""
  dq = jnp.zeros(q.shape, jnp.float32)
  dargs = None
  if mods is not None and mods.score_mod is not None:
    dargs = mods.zero_grads(jnp.float32)
  block = (k, v, _kv_part(vis), jnp.zeros(k.shape, jnp.float32),
           jnp.zeros(v.shape, jnp.float32))
  for step in range(cfg.num_shards):
    k_blk, v_blk, part, dk_blk, dv_blk = block
    vis_blk = _with_kv_part(vis, part)

    def grads(state, k_blk=k_blk, v_blk=v_blk, vis_blk=vis_blk):
      dq, dk_blk, dv_blk, dargs = state
      dq_i, dk_i, dv_i, dargs_i = cfg.block_kernel.backward(
          q, k_blk, v_blk, vis_blk, dropout, mods, out, lse, dout, dlse)
      if dargs is not None:
        dargs = mods_lib.add_grads(dargs, dargs_i)
      return dq + dq_i, dk_blk + dk_i, dv_blk + dv_i, dargs

    dq, dk_blk, dv_blk, dargs = jax.lax.cond(
        vis_blk.maybe_visible(), grads, lambda s: s,
        (dq, dk_blk, dv_blk, dargs))
    if step + 1 < cfg.num_shards:
      block = _rotate(cfg, (k_blk, v_blk, part, dk_blk, dv_blk))
    else:  # The last hop only brings the gradients home.
      dk_blk, dv_blk = _rotate(cfg, (dk_blk, dv_blk))
  return dq, dk_blk, dv_blk, dargs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg, q, k, v, vis, dropout, sinks, mods):
  return _forward(cfg, q, k, v, vis, dropout, sinks, mods)


def _ring_fwd(cfg, q, k, v, vis, dropout, sinks, mods):
  out, lse = _forward(cfg, q, k, v, vis, dropout, sinks, mods)
  return (out, lse), (q, k, v, vis, dropout, sinks, mods, out, lse)


def _ring_bwd(cfg, residuals, cotangents):
  q, k, v, vis, dropout, sinks, mods, out, lse = residuals
  dout, dlse = cotangents
  # The lse counts the sinks, so the blocks' dq, dk, dv are unchanged; the
  # gradients of the sinks and of `mod_args` cover the local queries
  # (shard_map sums the shards').
  dq, dk, dv, dargs = _backward(cfg, q, k, v, vis, dropout, mods, out, lse,
                                dout, dlse)
  dsinks = None if sinks is None else merge.sink_gradient(
      sinks, out, lse, dout, dlse)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None,
          None, dsinks, None if mods is None else mods.cotangent(dargs))


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(inputs: AttentionInputs, dropout=None, *, axis_name,
                   num_shards: int, block_kernel: BlockKernel
                  ) -> KernelOutput:
  """Attention of local queries to keys spread over a ring of devices.

  Call inside `jax.shard_map` over `axis_name` (or with `num_shards=1`
  anywhere). The record holds this device's shards: queries, keys, values,
  their positions/segments/kv indices; `kv_lengths` is global per row.

  Args:
    inputs: the local canonical record (no bias, no dense mask); its
      `sinks [H]`, if any, are merged once, after the ring; its `mods`, if
      any, reach the block kernel with each block's key positions.
    dropout: a `Dropout` (offsets for batch/head shards applied) or `None`.
    axis_name: the mesh axis of the ring.
    num_shards: its size n.
    block_kernel: the per-block kernel.

  Returns:
    `KernelOutput(out [B, Sq, H, Dv], lse [B, H, Sq] float32, None)`,
    differentiable with respect to q, k, v, sinks and `mod_args`.
  """
  if inputs.bias is not None or inputs.visibility.mask is not None:
    raise NotImplementedError("ring: a dense bias or mask is not supported.")
  cfg = RingConfig(axis_name=axis_name, num_shards=num_shards,
                   block_kernel=block_kernel)
  out, lse = _ring(cfg, inputs.query, inputs.key, inputs.value,
                   inputs.visibility, dropout, inputs.sinks, inputs.mods)
  return KernelOutput(out, lse, None)
