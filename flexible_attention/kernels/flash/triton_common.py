"""What flash's Triton kernels share: in-kernel helpers and launch plumbing.

The Triton backend is three Pallas kernels, FlashAttention-2 style (Dao,
2023, https://arxiv.org/abs/2307.08691): the forward (`triton_fwd`), and the
dK/dV and dQ kernels of the backward (`triton_bwd`). They serve every call
the flash kernels take (any GPU, float32 too, bias, dense mask, dropout,
`precision`, Pallas' interpreter on CPU); on Hopper the launch policy
(`launch.py`) gives the forward and dK/dV of the calls the Mosaic kernels
serve to those instead.

Each program loads the position / segment / key-validity vectors of its
tiles and evaluates the structured mask in registers (`masks.pair_visible`,
the library's one rule); a dense mask or bias is read tile by tile only when
the caller passed one. The program walks the tiles `[lo, hi)` its row of
skipping bounds names (`structure.tile_bounds`), masking only `[lo, flo)`
and `[fhi, hi)`. Dropout calls the library's hash (`core/dropout.py`) on
the tile's coordinates, so the keep mask is bit-identical to every other
mechanism's.

Glossary of shapes:
- B: batch size.
- Sqp, Skp: query and key lengths padded to whole tiles.
- H, Hkv: query and key/value heads; G = H // Hkv.
- Dp, Dvp: query/key and value head sizes padded to powers of two.
- bq, bk: tile sizes along queries and keys.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from flexible_attention.core import dropout as dropout_lib
from flexible_attention.core import masks
from flexible_attention.kernels.flash.structure import LOG2E
from flexible_attention.kernels.flash.structure import Static
from flexible_attention.kernels.flash.structure import TileOrder


def dot(a, b, st: Static, *, trans_a: bool = False, trans_b: bool = False):
  """A 2-D matmul with float32 accumulation (`a^T` / `b^T` when asked)."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=st.precision,
                         preferred_element_type=jnp.float32)


def scores(st: Static, q, k, bias, transposed: bool = False):
  """A tile's logits as `(s, scale, dcap)`: `s * scale` are the logits in
  base 2 (`logits * log2(e)`), `dcap` the soft cap's derivative (or None);
  `[bq, bk]`, or `[bk, bq]` when `transposed` (then `bias` must be
  transposed too).

  Without soft cap, bias and score_mod, `s` is the raw `q k^T` and `scale`
  folds the softmax scale: the callers apply it in `_exp2`, one FMA with the
  subtraction of the row maximum or log-sum-exp, not a multiply of its own
  per element (`scale > 0`, so row maxima of `s` scale too). With a
  score_mod, `s` are the natural-unit logits the mod takes (`scale =
  log2(e)`; the caller applies the mod, `mod_lowering.TileMods`).
  """
  if transposed:
    s = dot(k, q, st, trans_b=True)  # [bk, bq] f32
  else:
    s = dot(q, k, st, trans_b=True)  # [bq, bk] f32
  if st.softcap is None and bias is None and not st.score_mod:
    return s, st.sm_scale * LOG2E, None
  s = s * st.sm_scale
  dcap = None
  if st.softcap is not None:
    t = jnp.tanh(s * (1.0 / st.softcap))
    s = st.softcap * t
    dcap = 1.0 - t * t
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  if st.score_mod:
    return s, LOG2E, dcap
  return s * LOG2E, 1.0, dcap


def exp2(s, scale: float, shift):
  """`2 ** (s * scale - shift)`, the multiply and subtraction one FMA."""
  return jnp.exp2(s * scale - shift if scale != 1.0 else s - shift)


def _outer(q_vec, kv_vec, transposed: bool):
  """`(q[:, None], kv[None, :])`, or the transposed pair."""
  if transposed:
    return q_vec[None, :], kv_vec[:, None]
  return q_vec[:, None], kv_vec[None, :]


def visible(st: Static, shape, q_pos, kv_pos, kv_ok, q_seg, kv_seg,
             mask, transposed: bool = False, mods=None):
  """Bool `[bq, bk]` (`[bk, bq]` if `transposed`, with `mask` transposed
  too): the structured mask of a tile, and-ed with the mask_mod's when
  `mods` (the program's `mod_lowering.TileMods`) is given."""
  qp, kp = _outer(q_pos, kv_pos, transposed)
  qs = ks = None
  if st.segments:
    qs, ks = _outer(q_seg, kv_seg, transposed)
  vis = masks.pair_visible(_outer(q_pos, kv_ok, transposed)[1] != 0, qp, kp,
                           causal=st.causal, window=st.window, q_seg=qs,
                           kv_seg=ks)
  if mask is not None:
    vis = vis & (mask != 0)
  if mods is not None and st.mask_mod:
    vis = vis & mods.visible(q_pos, kv_pos)
  return jnp.broadcast_to(vis, shape)


def keep_mask(st: Static, seed_ref, batch, head, q_pos, kv_pos,
          transposed: bool = False):
  """The library's dropout keep mask `[bq, bk]` (or `[bk, bq]`) of a tile."""
  seed = (seed_ref[0], seed_ref[1])
  batch = batch.astype(jnp.uint32) + seed_ref[2]
  head = head.astype(jnp.uint32) + seed_ref[3]
  qp, kp = _outer(q_pos, kv_pos, transposed)
  return dropout_lib.dropout_keep(seed, batch, head, qp, kp,
                                  st.dropout_rate)


def tile_of(ref, q_slice, k_slice, head=None):
  """Loads the `[bq|1, bk|1]` tile of a broadcastable bias/mask block."""
  q_index = q_slice if ref.shape[-2] > 1 else slice(None)
  k_index = k_slice if ref.shape[-1] > 1 else slice(None)
  if head is None:
    return ref[q_index, k_index]
  return ref[head, q_index, k_index]


def loops(bounds_ref, row, body, carry):
  """Runs `body(index, carry, masked)` over `[lo, flo)` and `[fhi, hi)`
  with masking and over `[flo, fhi)` without."""
  lo, flo = bounds_ref[row, 0], bounds_ref[row, 1]
  fhi, hi = bounds_ref[row, 2], bounds_ref[row, 3]
  masked = functools.partial(body, masked=True)
  carry = lax.fori_loop(lo, flo, masked, carry)
  carry = lax.fori_loop(flo, fhi, functools.partial(body, masked=False),
                        carry)
  return lax.fori_loop(fhi, hi, masked, carry)



def compiler_params(launch, interpret: bool):
  """Triton's warps and stages of a `launch.Launch` (none when interpreted)."""
  if interpret:
    return None
  # jax >= 0.6 spells it `CompilerParams`; older ones `TritonCompilerParams`.
  cls = getattr(plgpu, "CompilerParams", None) or getattr(
      plgpu, "TritonCompilerParams")
  return cls(num_warps=launch.num_warps, num_stages=launch.num_stages)



class Call:
  """Collects the named inputs and outputs of one `pallas_call`.

  With an `order` (`structure.TileOrder`) the index maps are written over
  `(tile, batch row, head)` and the call runs over the order's grid, each
  map composed with `order.at`."""

  def __init__(self, order: TileOrder | None = None):
    self.order = order
    self.names, self.arrays, self.specs = [], [], []
    self.out_names, self.out_shapes, self.out_specs = [], [], []
    self.aliases = {}

  def _spec(self, block_shape, index_map):
    if self.order is not None and self.order.group > 1:
      index_map = lambda *ids, f=index_map: f(*self.order.at(*ids))
    return pl.BlockSpec(block_shape, index_map)

  def input(self, name, array, block_shape, index_map):
    if array is None:
      return
    self.names.append(name)
    self.arrays.append(array)
    self.specs.append(self._spec(block_shape, index_map))

  def output(self, name, shape, dtype, block_shape, index_map):
    self.out_names.append(name)
    self.out_shapes.append(jax.ShapeDtypeStruct(shape, dtype))
    self.out_specs.append(self._spec(block_shape, index_map))

  def accumulator(self, name, array, block_shape, index_map):
    """An output that starts as `array` (aliased to it: the kernel adds
    into it); the kernel sees it as `name` (its input as `name + "_in"`)."""
    self.aliases[len(self.arrays)] = len(self.out_names)
    self.input(name + "_in", array, block_shape, index_map)
    self.output(name, array.shape, array.dtype, block_shape, index_map)

  def __call__(self, kernel, grid, launch: Any, interpret: bool,
               name: str, **kwargs):
    fn = functools.partial(kernel, names=tuple(self.names + self.out_names),
                           **kwargs)
    return pl.pallas_call(
        fn, grid=grid, in_specs=self.specs, out_specs=self.out_specs,
        out_shape=self.out_shapes,
        compiler_params=compiler_params(launch, interpret),
        input_output_aliases=self.aliases, interpret=interpret,
        name=name)(*self.arrays)


def broadcast_block(shape, head_block, q_block, k_block, head_squeezed):
  """Block shape of a `[B|1, H|1, Sq|1, Sk|1]` array (bias or mask)."""
  _, hb, sq, sk = shape
  head = (None if head_squeezed else (head_block if hb > 1 else 1))
  return (None, head, q_block if sq > 1 else 1, k_block if sk > 1 else 1)


def broadcast_index(shape, b, h, i, j):
  return (b if shape[0] > 1 else 0, h if shape[1] > 1 else 0,
          i if shape[2] > 1 else 0, j if shape[3] > 1 else 0)


def add_structure(call: Call, aux, st: Static, q_block: int,
                   k_block: int, q_index, k_index):
  """The position / segment / validity vectors, tiled or whole."""
  call.input("q_pos", aux["q_pos"], (None, q_block), q_index)
  call.input("kv_pos", aux["kv_pos"], (None, k_block), k_index)
  call.input("kv_ok", aux["kv_ok"], (None, k_block), k_index)
  if st.segments:
    call.input("q_seg", aux["q_seg"], (None, q_block), q_index)
    call.input("kv_seg", aux["kv_seg"], (None, k_block), k_index)
  if st.dropout_rate is not None:
    call.input("seed", aux["seed"], (4,), lambda *_: (0,))
  if st.mods is not None:  # Whole (`mod_lowering.operands`).
    for name in ["mod_offsets"] + [st.mods.name(i) for i in range(
        len(st.mods.shapes))]:
      shape = aux[name].shape
      call.input(name, aux[name], shape,
                 lambda *_, n=len(shape): (0,) * n)


def query_grid_call(st: Static, q, k, v, bias, aux, bq: int,
                     bounds: str, order: TileOrder | None = None
                     ) -> tuple[Call, Any]:
  """A `Call` over the programs (query block, batch, head) (in `order`, if
  given) with the inputs the forward and dQ kernels share: a query tile,
  its KV head's whole K/V, the structure vectors, bias and mask tiles and
  the tile-skipping bounds.

  Returns the call and the query block index map `qi` (heavy causal rows
  first).
  """
  q_len, d_pad = q.shape[1], q.shape[3]
  kv_len, dv_pad = k.shape[1], v.shape[-1]
  nq = q_len // bq
  groups = st.groups
  qi = lambda i: nq - 1 - i
  call = Call(order)
  call.input("q", q, (None, bq, None, d_pad),
             lambda i, b, h: (b, qi(i), h, 0))
  call.input("k", k, (None, kv_len, None, d_pad),
             lambda i, b, h: (b, 0, h // groups, 0))
  call.input("v", v, (None, kv_len, None, dv_pad),
             lambda i, b, h: (b, 0, h // groups, 0))
  add_structure(call, aux, st, bq, kv_len, lambda i, b, h: (b, qi(i)),
                 lambda i, b, h: (b, 0))
  if bias is not None:
    call.input("bias", bias,
               broadcast_block(bias.shape, 1, bq, kv_len, True),
               lambda i, b, h: broadcast_index(bias.shape, b, h, qi(i), 0))
  if st.mask:
    mask = aux["mask"]
    call.input("mask", mask,
               broadcast_block(mask.shape, 1, bq, kv_len, True),
               lambda i, b, h: broadcast_index(mask.shape, b, h, qi(i), 0))
  call.input("bounds", aux[bounds], (None, nq, 4), lambda i, b, h: (b, 0, 0))
  return call, qi


