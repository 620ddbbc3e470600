"""What a benchmark row runs: a registered mechanism or a baseline.

A baseline (`BASELINES`) calls another library directly instead of a
registered mechanism, so that the mechanisms are timed beside it: cuDNN
given the dense mask equivalent to the cell's structure
(`cudnn_dense_mask`), or JAX's in-tree Pallas-Triton kernel
(`pallas_in_tree`). `forward_fn` gives the forward of either;
`forward_backward_fn` the program that the benchmark times and whose memory
it reads.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from flexible_attention.comparison.cells import Cell
from flexible_attention.comparison.compare import mechanism_forward
from flexible_attention.core.inputs import canonicalize


class BaselineUnavailable(Exception):
  """A baseline's code is not in this installation (the row says why)."""


def _require_gpu(name: str):
  if jax.default_backend() != "gpu":
    raise NotImplementedError(
        f"{name} runs on GPU only; the backend is {jax.default_backend()}.")


def _cudnn_dense_mask(cell: Cell, segment_ids, logits_soft_cap):
  """cuDNN given the dense `[B, 1, S, S]` mask equivalent to the cell."""
  _require_gpu("cudnn_dense_mask")
  if logits_soft_cap is not None:
    raise NotImplementedError("cudnn_dense_mask has no logits soft cap.")
  mask = None
  if cell.causal or segment_ids is not None:
    # The library's own mask rule (`Visibility.dense`), expanded.
    shape = (cell.batch, cell.seq_len, 1, 1)
    mask = canonicalize(
        jnp.zeros(shape), jnp.zeros(shape), jnp.zeros(shape),
        causal=cell.causal,
        segment_ids=None if segment_ids is None else jnp.asarray(segment_ids)
    ).visibility.dense()  # [B, 1, S, S]
  return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=cell.head_dim**-0.5, implementation="cudnn")


def _pallas_in_tree(cell: Cell, segment_ids, logits_soft_cap):
  """JAX's in-tree Pallas-Triton kernel, `pallas.ops.gpu.attention.mha`.

  It takes `[B, S, H, D]` inputs and `[B, S]` segment ids, with top-left
  causal alignment (the same as ours, since Sq == Sk here).
  """
  try:
    # Optional: JAX may move or drop it; the row then says so.
    from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise BaselineUnavailable(
        f"jax {jax.__version__} has no jax.experimental.pallas.ops.gpu."
        f"attention ({e})") from e
  if not hasattr(attention, "mha"):
    raise BaselineUnavailable(
        f"jax {jax.__version__}'s pallas.ops.gpu.attention has no mha")
  if cell.num_kv_heads != cell.num_heads:
    raise NotImplementedError(
        "pallas_in_tree has no grouped-query attention (H = "
        f"{cell.num_heads}, Hkv = {cell.num_kv_heads}).")
  if logits_soft_cap is not None:
    raise NotImplementedError("pallas_in_tree has no logits soft cap.")
  _require_gpu("pallas_in_tree (Triton lowering)")
  return lambda q, k, v: attention.mha(
      q, k, v, None if segment_ids is None else jnp.asarray(segment_ids),
      sm_scale=cell.head_dim**-0.5, causal=cell.causal)


# Baselines: rows that call another library directly instead of a
# registered mechanism. Name -> (what serves it, builder of the forward
# `(q, k, v) -> out` from (cell, `[B, S]` segment ids or None, soft cap)).
BASELINES = {
    "cudnn_dense_mask": ("cudnn", _cudnn_dense_mask),
    "pallas_in_tree": ("pallas_in_tree", _pallas_in_tree),
}


def forward_fn(name: str, cell: Cell, *, logits_soft_cap=None,
               segment_ids=None, mesh=None, options=None,
               served=None) -> Callable:
  """The forward `(q, k, v) -> out` of one row.

  Args:
    name: a mechanism or a baseline (`BASELINES`).
    cell: the problem.
    logits_soft_cap: the soft cap of the logits, or None.
    segment_ids: `[B, S]` int document ids (packed cells), or None.
    mesh: run the mechanism on this mesh.
    options: extra module options (e.g. `layout`).
    served: a list to which tracing appends the mechanism that ran.

  Returns:
    `(q [B, S, H, D], k [B, S, Hkv, D], v [B, S, Hkv, D]) -> [B, S, H, D]`.

  Raises:
    BaselineUnavailable: the baseline is not in this installation.
    NotImplementedError: the baseline does not support the cell, a mesh or
      options here (the mechanisms raise it when traced).
  """
  served = [] if served is None else served
  if name not in BASELINES:
    return mechanism_forward(
        name, num_heads=cell.num_heads, head_dim=cell.head_dim,
        num_kv_heads=cell.num_kv_heads,
        call=dict(causal=cell.causal, segment_ids=segment_ids),
        served=served, logits_soft_cap=logits_soft_cap, mesh=mesh,
        **(options or {}))
  if mesh is not None or options:
    raise NotImplementedError(
        f"{name} runs on one device with no options; got mesh={mesh}, "
        f"options={options}.")
  served_by, build = BASELINES[name]
  baseline = build(cell, segment_ids, logits_soft_cap)

  def forward_baseline(q, k, v):
    served.append(served_by)
    return baseline(q, k, v)

  return forward_baseline


def forward_backward_fn(forward: Callable) -> Callable:
  """`(q, k, v, ct) -> (dq, dk, dv)` of `forward`, through `jax.vjp`.

  The cotangent `ct` `[B, S, H, D]` has the output's dtype, so the program's
  arguments are exactly q, k, v, ct and its outputs dq, dk, dv.
  """

  def forward_backward(q, k, v, ct):
    _, f_vjp = jax.vjp(forward, q, k, v)
    return f_vjp(ct)

  return forward_backward
