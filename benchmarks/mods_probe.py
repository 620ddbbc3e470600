"""Score and mask mods on a GPU: the benchmark rows of issue 16.

One command on a GPU (bf16, B * S = `--tokens`, H = 16, D = 128):

  python3 benchmarks/mods_probe.py --lengths=4096,16384 \\
      --out=$OUT/mods_probe.json

Two cells per S, each timed as forward and forward+backward (`jax.vjp` of
the output w.r.t. q, k, v, jitted):

- `alibi` (causal): `flash` with ALiBi as `score_mod=fa.alibi_score_mod`
  (`mod_args=(slopes,)`), against `flash` without a bias, `flash` with the
  same ALiBi bias materialised densely (`[1, H, S, S]` bf16) and cuDNN
  (`jax.nn.dot_product_attention(implementation="cudnn")`) with that dense
  bias and without a bias.
- `prefix_lm` (a prefix of `--prefix_fraction` of S, then causal): `flash`
  with the prefix-LM as an args-free `mask_mod` (so its tile table is
  derived at trace time: block sparsity), against `flash` plain causal,
  `flash` with the dense `[1, 1, S, S]` mask and cuDNN with that mask and
  plain causal. The prefix-LM sees more pairs than causal (the prefix's
  upper triangle); `useful_ratio` divides that out.
- `mod_cost` (causal, `--cells=mod_cost`): where a score_mod's time goes,
  `flash` with ALiBi built up a step at a time, each checked against the
  reference with the same mod: the identity (`s`: the mod path's fixed
  cost), a per-head shift (`s - slopes[head]`: a program value), a key-only
  distance (`s - slopes[head] * kv_pos`: the int position's conversion on
  every element) and ALiBi itself (`|q_pos - kv_pos|`).
- `features` (causal, `--cells=features`; issue 17's "no loss per useful
  FLOP against the plain causal cell"): `flash` plain causal against
  `flash` with grouped-query heads (`--groups` query heads per KV head:
  K and V are the first of each group's heads, sliced inside the timed
  program), packed documents (segment ids of 64..2048-token documents,
  `comparison.cells.packed_segment_ids`; and the same documents with
  their starts moved to whole 128-token tiles, so that only the tiles on
  a document's diagonal are masked), a sliding window of `--window`
  keys and a soft cap of `--softcap`. `useful_ratio` is each variant's
  time per visible (query, key) pair over plain causal's: at most 1 is no
  loss. `tile_ratio` is its time per visible tile (the Mosaic forward's
  `[BLOCK_Q, block_k]` tiles with a visible pair, `comparison.cells.
  visible_tiles`) over plain causal's: what is left of `useful_ratio`
  once the pairs a kernel that skips whole tiles must compute anyway (the
  partly visible tiles along a window's or a document's edges) are
  divided out, i.e. the cost per computed tile.

Every variant's output and dq / dk / dv are first checked against the
float32 reference (`core/reference.py`, with the mod or the dense bias /
mask) on the first batch row and `--check_heads` heads (heads and rows
are independent, so this bounds the reference's memory); a variant off by
more than bf16's tolerance is not timed. The variants of a cell are then
timed round-robin (`timing.median_seconds_each`). Each flash variant runs
the default launch policy; `fwd_backend` records which forward kernel its
program holds (`mosaic`: the Mosaic GPU forward, which on Hopper evaluates
ALiBi and the prefix-LM mask_mod itself; `triton`) and `fwd_bwd_kernels`
those of its gradient program, in order (from 16k keys the Mosaic dQ
kernel evaluates the mods too), read off the lowered programs. `--smoke`:
tiny shapes in Pallas' interpreter, flash only, no timing (a CPU check of
the script). `--fused` (Hopper) adds `flash_alibi_mod_fused` and
`flash_prefix_mod_fused`: the same mods with an explicit launch that puts
dQ inside the Mosaic dK/dV kernel (the fused backward, which the default
launches use at D = 128 from 8k keys, mods included where they fit: below
8k the flag is the only way to time it). `--trace=N` then runs each timed
variant's forward+backward N times under the profiler and reports the
microseconds per call of each kernel on each device line: the attention
kernels against the XLA ops around them (the backward's per-token passes
cost the same however few pairs are visible). `--features_dq=triton,
mosaic,fused,fused_any` (Hopper) adds to the features cell plain causal,
the window and the packed documents with the backward's dQ pinned to each
path (`flash_kernel.hopper_launch_config`: the split backwards with
Triton's or Mosaic's dQ kernel, the fused one, and the fused one with
float32 adds in any order instead of int32 fixed point), their ratios
taken against the plain causal of the same launch: whether the window's
and the documents' loss per tile belongs to the default (fused, fixed
point) backward, whose per-token passes (the fixed-point scales, dQ's
int32 zeros and conversion) and per-program ends weigh more where a
program has few tiles. `--features_ranked` adds the packed documents (and
the aligned ones) with the persistent forward's query tiles dealt by rank
of their work (`mosaic_schedule.RANKED_ORDER`) and, as `_ranked_bwd`,
with the backward's dK/dV and dQ kernels' tiles dealt so
(`RANKED_BWD_ORDER`), against the same plain causal as the default's.
"""

from __future__ import annotations

import collections
import functools
import json
import re
from unittest import mock

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import flexible_attention as fa
from flexible_attention import timing
from flexible_attention.comparison import cells as comparison_cells
from flexible_attention.comparison import compare
from flexible_attention.core import inputs as inputs_lib
from flexible_attention.core import reference
from flexible_attention.kernels import flash as flash_kernel
from flexible_attention.kernels.flash import mosaic_common
from flexible_attention.kernels.flash import mosaic_schedule
from flexible_attention.kernels.flash.structure import pad_dim

_LENGTHS = flags.DEFINE_list("lengths", ["4096", "16384"], "Sequence lengths.")
_CELLS = flags.DEFINE_list("cells", ["alibi", "prefix_lm"],
                           "Cells to run: alibi, prefix_lm, mod_cost, "
                           "features.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "B * S.")
_HEADS = flags.DEFINE_integer("heads", 16, "H (and Hkv).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "D.")
_PREFIX = flags.DEFINE_float("prefix_fraction", 0.125,
                             "The prefix-LM's prefix, a fraction of S.")
_CHECK_HEADS = flags.DEFINE_integer("check_heads", 2,
                                    "Heads checked against the reference.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Samples per timing.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_FUSED = flags.DEFINE_bool(
    "fused", False, "Also time the mods with dQ inside the Mosaic dK/dV "
    "kernel (`flash_*_mod_fused`: an explicit fused launch, Hopper only), "
    "which the default launches pick only where the mods' shared memory "
    "fits (`mosaic_mod_rows.fused_mods_reason`).")
_GROUPS = flags.DEFINE_integer("groups", 4, "features: query heads per KV "
                               "head of the grouped-query variant.")
_WINDOW = flags.DEFINE_integer("window", 1024, "features: the sliding "
                               "window's keys before each query.")
_SOFTCAP = flags.DEFINE_float("softcap", 30.0, "features: the soft cap.")
_FEATURES_DQ = flags.DEFINE_list(
    "features_dq", [], "features: also time plain causal, the window and the "
    "packed documents with the backward's dQ pinned to each path named "
    "(`flash_<variant>_<path>`; `triton`, `mosaic`: split backwards, "
    "`fused`, `fused_any`: the fused one with float32 adds in any order; "
    "Hopper only), each against its own plain causal.")
_FEATURES_RANKED = flags.DEFINE_bool(
    "features_ranked", False, "features: also time the packed documents "
    "(and the aligned ones) with the Mosaic forward's query tiles dealt by "
    "rank of their work (`flash_packed_ranked`: `mosaic_schedule."
    "RANKED_ORDER` set while the variant traces) and with the backward's "
    "dK/dV and dQ kernels' tiles dealt so (`flash_packed_ranked_bwd`: "
    "`RANKED_BWD_ORDER`), against the same plain causal as the default's.")
_TRACE = flags.DEFINE_integer(
    "trace", 0, "Then run each timed variant's forward+backward this many "
    "times under `jax.profiler.trace`: microseconds per call of each "
    "kernel (the attention kernels and the XLA ops around them).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes, interpreted flash "
                           "kernels, no timing: a CPU check of the script.")

TOL = 1.5e-2  # bf16, relative to the largest entry (tests/helpers.py).


def _prefix_mask_mod(prefix: int):
  """An args-free prefix-LM mask_mod: keys before `prefix` are seen by every
  query, later keys causally."""
  def mask_mod(batch, head, q_pos, kv_pos):
    del batch, head
    return (kv_pos < prefix) | (kv_pos <= q_pos)
  return mask_mod


# The steps of the `mod_cost` cell, each a score_mod of `mod_args=(slopes,)`.
_COST_MODS = {
    "identity": lambda s, b, h, q_pos, kv_pos, slopes: s,
    "head_shift": lambda s, b, h, q_pos, kv_pos, slopes: s - slopes[h],
    "key_distance": lambda s, b, h, q_pos, kv_pos, slopes: (
        s - slopes[h] * kv_pos.astype(s.dtype)),
    "alibi": fa.alibi_score_mod,
}


def _module(mechanism, h, d, call, **options):
  """`attend(q, k, v, extra)`: `mechanism` inside `hk.transform`; `extra`
  is the call's bias / mask / mod_args (named by `call`)."""
  def f(q, k, v, extra):
    attn = fa.create_attention(mechanism, num_heads=h, head_dim=d,
                               interpret=_SMOKE.value, **options)
    return attn(q, k, v, **call(extra)).attention_outputs
  apply = hk.without_apply_rng(hk.transform(f)).apply
  return lambda q, k, v, extra: apply({}, q, k, v, extra)


def _groups(h: int) -> int:
  """Query heads per KV head of the `flash_gqa` variant."""
  return min(_GROUPS.value, h)


def _grouped(attend, groups: int):
  """`attend` on the first K / V head of each group of `groups` heads (a
  grouped-query call: query head h reads KV head h // groups)."""
  return lambda q, k, v, extra: attend(q, k[:, :, ::groups],
                                       v[:, :, ::groups], extra)


def _cudnn(causal, name):
  def attend(q, k, v, extra):
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn",
        **({name: extra} if name else {}))
  return attend


def _reference(call, softcap=None, **options):
  """The float32 reference of `call(extra)`, with the soft cap and the
  call options (`canonicalize`'s: mods, the sliding window) given."""
  def attend(q, k, v, extra):
    record = inputs_lib.canonicalize(q, k, v, **call(extra), **options)
    return reference.reference_attention(
        record.query, record.key, record.value, record.bias,
        record.visibility, sm_scale=q.shape[-1]**-0.5, softcap=softcap,
        mods=record.mods).out
  return attend


def _cells(s: int, h: int, d: int, b: int):
  """`({cell: (reference, extra, {variant: (attend, extra[, reference])})},
  {cell: visible pairs per row}, {variant: visible pairs per row},
  {variant: visible tiles per row})`: a variant's own reference, where it
  has one, replaces the cell's; its own pair count, where it has one, the
  cell's; the tile counts are the features cell's (plain causal's where a
  variant has none of its own)."""
  idx = np.arange(s)
  slopes = jnp.asarray(fa.alibi_slopes(h))
  distance = np.abs(idx[:, None] - idx[None, :]).astype(np.float32)
  alibi = (-slopes[:, None, None] * distance)[None].astype(jnp.bfloat16)
  prefix = max(1, int(s * _PREFIX.value))
  prefix_mask = jnp.asarray(((idx[None, :] < prefix) |
                             (idx[None, :] <= idx[:, None]))[None, None])
  causal = lambda extra: dict(causal=True)
  with_bias = lambda extra: dict(causal=True, bias=extra)
  with_mask = lambda extra: dict(mask=extra)
  alibi_args = lambda extra: dict(causal=True, mod_args=(extra,))
  no_args = lambda extra: {}
  alibi_mod = dict(score_mod=fa.alibi_score_mod)
  prefix_mod = dict(mask_mod=_prefix_mask_mod(prefix))
  cells = {
      "alibi": (_reference(with_bias), alibi, {
          "flash_alibi_mod": (_module("flash", h, d, alibi_args, **alibi_mod),
                              slopes),
          "flash_plain": (_module("flash", h, d, causal), None),
          "flash_alibi_dense": (_module("flash", h, d, with_bias), alibi),
          "cudnn_alibi_dense": (_cudnn(True, "bias"), alibi),
          "cudnn_plain": (_cudnn(True, None), None)}),
      "prefix_lm": (_reference(with_mask), prefix_mask, {
          "flash_prefix_mod": (_module("flash", h, d, no_args, **prefix_mod),
                               None),
          "flash_plain": (_module("flash", h, d, causal), None),
          "flash_prefix_dense": (_module("flash", h, d, with_mask),
                                 prefix_mask),
          "cudnn_prefix_dense": (_cudnn(False, "mask"), prefix_mask),
          "cudnn_plain": (_cudnn(True, None), None)}),
      "mod_cost": (None, slopes, {
          "flash_plain": (_module("flash", h, d, causal), None), **{
              f"flash_{name}": (
                  _module("flash", h, d, alibi_args, score_mod=mod), slopes,
                  _reference(alibi_args, score_mod=mod))
              for name, mod in _COST_MODS.items()}}),
  }
  if _FUSED.value:
    fused = flash_kernel.hopper_launch_config(d, True, dq="fused")
    cells["alibi"][2]["flash_alibi_mod_fused"] = (
        _module("flash", h, d, alibi_args, launch=fused, **alibi_mod), slopes)
    cells["prefix_lm"][2]["flash_prefix_mod_fused"] = (
        _module("flash", h, d, no_args, launch=fused, **prefix_mod), None)
  # Features: segment ids as [B, 1, S] (a size-1 head axis, which the
  # check's slicing keeps whole).
  ids = comparison_cells.packed_segment_ids(b, s, seed=0)
  # The same documents with their starts moved to whole query / key tiles
  # (each tile takes its first token's document): about as many visible
  # pairs, and every tile off the diagonal unmasked (`flash_packed`'s
  # cross the documents' edges).
  block = mosaic_common.BLOCK_Q
  aligned = np.repeat(ids[:, ::block], block, axis=1)[:, :s]
  documents = lambda extra: dict(causal=True, segment_ids=extra[:, 0])
  window = min(_WINDOW.value, max(1, s // 4))  # A window at any S.
  groups = _groups(h)
  features = {
      "flash_plain": (_module("flash", h, d, causal), None),
      "flash_gqa": (_grouped(_module("flash", h, d, causal,
                                     num_kv_heads=h // groups), groups),
                    None, _grouped(_reference(causal), groups)),
      "flash_packed": (_module("flash", h, d, documents),
                       jnp.asarray(ids)[:, None], _reference(documents)),
      "flash_packed_aligned": (_module("flash", h, d, documents),
                               jnp.asarray(aligned)[:, None],
                               _reference(documents)),
      "flash_window": (_module("flash", h, d, causal, sliding_window=window),
                       None, _reference(causal, sliding_window=window)),
      "flash_softcap": (_module("flash", h, d, causal,
                                logits_soft_cap=_SOFTCAP.value), None,
                        _reference(causal, softcap=_SOFTCAP.value))}
  for path in _FEATURES_DQ.value:
    launch = flash_kernel.hopper_launch_config(
        pad_dim(d), True, dq=path.removesuffix("_any"),
        deterministic_dq=not path.endswith("_any"))
    features.update({
        f"flash_plain_{path}": (_module("flash", h, d, causal,
                                        launch=launch), None),
        f"flash_window_{path}": (_module("flash", h, d, causal,
                                         sliding_window=window,
                                         launch=launch),
                                 *features["flash_window"][1:]),
        f"flash_packed_{path}": (_module("flash", h, d, documents,
                                         launch=launch),
                                 *features["flash_packed"][1:])})
  if _FEATURES_RANKED.value:
    for name in ("flash_packed", "flash_packed_aligned"):
      attend, *rest = features[name]
      for suffix, flag in RANKED_FLAGS.items():
        features[f"{name}{suffix}"] = (_ranked(attend, flag), *rest)
  cells["features"] = (_reference(causal), None, features)
  cells = {name: cells[name] for name in _CELLS.value}
  causal_pairs = comparison_cells.causal_pairs(s)
  pairs = {"alibi": causal_pairs, "mod_cost": causal_pairs,
           "features": causal_pairs,
           "prefix_lm": causal_pairs + prefix * (prefix - 1) / 2}
  own_pairs = {"flash_plain": causal_pairs, "cudnn_plain": causal_pairs,
               "flash_packed": comparison_cells.causal_pairs(
                   s, segment_ids=ids),
               "flash_packed_aligned": comparison_cells.causal_pairs(
                   s, segment_ids=aligned),
               "flash_window": comparison_cells.causal_pairs(
                   s, window=window)}
  tiles = functools.partial(comparison_cells.visible_tiles, s,
                            mosaic_common.BLOCK_Q,
                            mosaic_common.block_k(pad_dim(d)))
  own_tiles = {"flash_plain": tiles(),
               "flash_packed": tiles(segment_ids=ids),
               "flash_packed_aligned": tiles(segment_ids=aligned),
               "flash_window": tiles(window=window)}
  return cells, pairs, own_pairs, own_tiles


# `--features_ranked`'s variants: name suffix -> the `mosaic_schedule`
# flag set while the variant traces (the forward's query tiles by rank; the
# backward's grid kernels' tiles by rank).
RANKED_FLAGS = {"_ranked": "RANKED_ORDER", "_ranked_bwd": "RANKED_BWD_ORDER"}


def _ranked(attend, flag: str):
  """`attend` traced with `mosaic_schedule.<flag>` on."""
  def ranked(*args):
    with mock.patch.object(mosaic_schedule, flag, True):
      return attend(*args)
  return ranked


def _pinned(name: str) -> tuple[str, str]:
  """`(variant, suffix)`: a features variant's name without the `_<path>`
  of `--features_dq` (or a `RANKED_FLAGS` suffix of `--features_ranked`),
  and that suffix ("" for the default launch)."""
  for suffix in RANKED_FLAGS:
    if name.endswith(suffix):
      return name.removesuffix(suffix), ""
  for path in _FEATURES_DQ.value:
    if name.endswith("_" + path):
      return name[:-len(path) - 1], "_" + path
  return name, ""


def _part(x, heads, axis):
  """The first batch row and `heads` heads of `x` (`axis`: its head axis);
  a broadcast (size-1) axis is kept."""
  if x is None:
    return None
  x = x[:1]
  if x.shape[axis] > 1:
    x = jax.lax.slice_in_dim(x, 0, heads, axis=axis)
  return x


def _kernels(fn, *args) -> str:
  """The kernels of a jitted flash program, from the custom calls of its
  lowered text, in order: `mosaic` (Mosaic GPU) or `triton` each, joined
  by `+` (`interpreted` without any)."""
  text = fn.lower(*args).as_text()
  kinds = ["mosaic" if "mosaic_gpu" in t else "triton"
           for t in re.findall(r"custom_call @\"?([\w$.]+)", text)
           if "mosaic_gpu" in t or "triton" in t]
  return "+".join(kinds) or "interpreted"


def _measure(s: int, h: int, d: int, tokens: int) -> dict:
  b = max(1, tokens // s)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, dout = (jax.random.normal(key, (b, s, h, d), jnp.bfloat16)
                   for key in keys)
  # Whole groups of query heads: a KV head's gradient sums over its group,
  # so a check of part of a group would miss the rest's share.
  groups = _groups(h)
  n = min(h, -(-_CHECK_HEADS.value // groups) * groups)
  part = lambda x: _part(x, n, 2).astype(jnp.float32)
  cells, pairs, own_pairs, own_tiles = _cells(s, h, d, b)
  rows = {}
  for cell, (ref, ref_extra, variants) in cells.items():
    def wanted(ref, extra):
      # The dense bias / mask is [1, H, S, S] / [1, 1, S, S]: its heads are
      # axis 1; slopes [H] are axis 0 (those of the checked heads).
      if extra is not None:
        extra = extra[:n] if extra.ndim == 1 else _part(extra, n, 1)
      out, vjp = jax.vjp(lambda q, k, v: ref(q, k, v, extra),
                         part(q), part(k), part(v))
      return (out, *vjp(part(dout)))
    row = dict(S=s, B=b, H=h, D=d, error={}, fwd_ms={}, fwd_bwd_ms={},
               fwd_backend={}, fwd_bwd_kernels={})
    calls = []
    for name, (attend, extra, *own) in variants.items():
      if _SMOKE.value and not name.startswith("flash"):
        continue
      forward = jax.jit(attend)
      forward_backward = jax.jit(lambda q, k, v, dout, extra, attend=attend:
                                 jax.vjp(lambda q, k, v: attend(q, k, v, extra),
                                         q, k, v)[1](dout))
      try:
        got = (forward(q, k, v, extra), *forward_backward(q, k, v, dout, extra))
      except Exception as e:  # pylint: disable=broad-except
        row["error"][name] = f"{type(e).__name__}: {str(e)[:300]}"
        continue
      if name.startswith("flash"):
        row["fwd_backend"][name] = _kernels(forward, q, k, v, extra)
        row["fwd_bwd_kernels"][name] = _kernels(forward_backward, q, k, v,
                                                dout, extra)
      if name.endswith("plain"):  # Its own reference: plain causal.
        error = None
      else:
        want = (wanted(own[0], extra) if own else wanted(ref, ref_extra))
        error = max(compare.relative_error(part(x), w)
                    for x, w in zip(got, want))
      row["error"][name] = error
      if error is None or error <= TOL:
        calls.append((name, forward, forward_backward, extra))
    if not _SMOKE.value:
      timed = []
      for name, forward, forward_backward, extra in calls:
        timed += [(forward, (q, k, v, extra)),
                  (forward_backward, (q, k, v, dout, extra))]
      seconds = timing.median_seconds_each(timed, repeats=_REPEATS.value)
      for i, (name, *_) in enumerate(calls):
        row["fwd_ms"][name] = seconds[2 * i] * 1e3
        row["fwd_bwd_ms"][name] = seconds[2 * i + 1] * 1e3
      if _TRACE.value:
        row["fwd_bwd_kernel_us"] = {
            name: _kernel_times(forward_backward, (q, k, v, dout, extra),
                                _TRACE.value)
            for name, _, forward_backward, extra in calls}
    row["pairs_over_causal"] = pairs[cell] / pairs["mod_cost"]
    # Time per visible pair over plain flash's (at most 1: no loss); a
    # variant with a pinned dQ path over the plain one with that path.
    times = row["fwd_bwd_ms"]
    plains = {name: times.get("flash_plain" + _pinned(name)[1])
              for name in times}
    row["useful_ratio"] = {
        name: ms / own_pairs.get(_pinned(name)[0], pairs[cell]) / (
            plains[name] / pairs["mod_cost"])
        for name, ms in times.items() if plains[name]}
    if cell == "features":  # Time per visible tile, likewise.
      plain = own_tiles["flash_plain"]
      row["tile_ratio"] = {
          name: ms / own_tiles.get(_pinned(name)[0], plain) / (
              plains[name] / plain)
          for name, ms in times.items() if plains[name]}
    rows[cell] = row
    print(json.dumps({"cell": cell, **row}), flush=True)
  return rows


def _kernel_times(fn, args, calls: int) -> dict:
  """`{"thread": {kernel: µs per call}}` of `calls` runs of `fn(*args)`
  under the profiler (the device's lines only)."""
  events = timing.traced_kernel_times(lambda: fn(*args), calls)
  threads = collections.defaultdict(dict)
  for (thread, name), durations in events.items():
    threads[thread][name] = sum(durations) / calls
  return dict(threads)


def _check_plain(s: int, d: int) -> None:
  """The `*_plain` rows, checked against plain causal (the cells'
  references have the bias / mask) on a small separate call."""
  h = 2
  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(key, (1, s, h, d), jnp.bfloat16)
             for key in keys)
  want = _reference(lambda extra: dict(causal=True))(
      *(x.astype(jnp.float32) for x in (q, k, v)), None)
  got = {"flash_plain": jax.jit(_module("flash", h, d,
                                        lambda e: dict(causal=True)))}
  if not _SMOKE.value:
    got["cudnn_plain"] = jax.jit(_cudnn(True, None))
  for name, fn in got.items():
    error = compare.relative_error(fn(q, k, v, None), want)
    print(json.dumps({"check": name, "S": s, "out_error": error}), flush=True)
    if error > TOL:
      raise AssertionError(f"{name}: error {error} over {TOL}")


def main(argv):
  del argv
  lengths = [int(s) for s in _LENGTHS.value]
  h, d, tokens = _HEADS.value, _HEAD_DIM.value, _TOKENS.value
  if _SMOKE.value:
    lengths, h, d, tokens = [64], 4, 16, 64
  print(json.dumps({"device": jax.devices()[0].device_kind,
                    "jax": jax.__version__}), flush=True)
  results = []
  for s in lengths:
    _check_plain(min(s, 2048), d)
    rows = _measure(s, h, d, tokens)
    results.append(rows)
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind,
                       jax=jax.__version__, rows=results), f, indent=1)
  if _SMOKE.value:
    return
  print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}; "
        f"H = {h}, D = {d}, bf16; ms forward / "
        "forward+backward")
  for rows in results:
    for cell, row in rows.items():
      base = row["fwd_bwd_ms"].get("flash_plain")
      print(f"\n{cell}, S = {row['S']}, B = {row['B']} "
            f"(pairs over causal {row['pairs_over_causal']:.3f})")
      tile_ratio = row.get("tile_ratio", {})
      print("| variant | forward kernel | fwd+bwd kernels | fwd | fwd+bwd | "
            "flash_plain's fwd+bwd over it | time per pair over "
            "flash_plain's |" + (" time per tile over flash_plain's |"
                                 if tile_ratio else ""))
      print("|---|---|---|---|---|---|---|" + ("---|" if tile_ratio else ""))
      for name in row["error"]:
        kernel = row["fwd_backend"].get(name, "-")
        kernels = row["fwd_bwd_kernels"].get(name, "-")
        f, fb = row["fwd_ms"].get(name), row["fwd_bwd_ms"].get(name)
        tiles = (f" {tile_ratio[name]:.3f} |" if name in tile_ratio else
                 " - |" if tile_ratio else "")
        if fb is None:
          print(f"| {name} | {kernel} | {kernels} | - | - | "
                f"{row['error'][name]} | - |" + tiles)
          continue
        print(f"| {name} | {kernel} | {kernels} | {f:.3f} | {fb:.3f} | "
              f"{base / fb if base else float('nan'):.3f} | "
              f"{row['useful_ratio'].get(name, float('nan')):.3f} |" + tiles)
      for name, threads in row.get("fwd_bwd_kernel_us", {}).items():
        print(f"\n{name}: forward+backward, µs per call by device line")
        for thread, kernels in threads.items():
          top = sorted(kernels.items(), key=lambda x: -x[1])
          print(f"  {thread[:30]}: busy {sum(kernels.values()):.1f}; " +
                "; ".join(f"{us:.1f} {kernel[:60]}" for kernel, us in top[:6]))


if __name__ == "__main__":
  app.run(main)
