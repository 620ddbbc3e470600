"""Score and mask modifications inside flash's Mosaic GPU (Hopper) kernels.

The Triton kernels take every mod Triton lowers (`mod_lowering`): each
`mod_args` leaf whole as a kernel input, one gather load per index. The
Mosaic GPU forward (`mosaic_fwd`) has no such loads in its consumers, so it
takes the mods whose `mod_args` reads are the same for a whole program
(one batch row, one query head): ALiBi's `slopes[head]`, a prefix-LM's
`prefix_lengths[batch]`, a scalar temperature. The mod's jaxpr, traced on
a tile of shape `TILE` (rows 8, keys 16: different sizes, so a value's
shape says along which axis it varies), splits in two:

- the PROGRAM part: every equation that reads only `batch`, `head`,
  `mod_args` and constants. XLA evaluates it for every (batch row, query
  head) before the kernel (`program_rows`; any primitive, gathers
  included), and the values the tile part reads of it, one element each
  (float32, or int32 / bool), become rows `[B, H, ROW]` (float32, int32)
  that each consumer copies to shared memory once and reads as scalars;
- the TILE part: the equations that read the score or the positions. The
  kernel binds them on `[ROWS, bk]` tiles (`TileMods`): positions broadcast
  from the structure vectors, the program's values and literals broadcast
  from scalars, every equation from an allow-list of elementwise
  primitives (`TILE_PRIMITIVES`, each lowered for CUDA in the tests).
  Broadcasts and reshapes of tile values are identities: a tile value
  stands for its broadcast over the whole tile.

A mod whose tile part reads a `mod_args` array per element (T5's
`table[bucket, head]`, `doc_ids[batch, q_pos]`), uses a primitive off the
list or a dtype other than float32, int32 and bool, or needs more than
`ROW` program values of a row, has a reason (`unsupported_reason`): the
launch policy keeps that call's forward on Triton, and an explicit
`fwd_backend="mosaic"` is an error naming it.

The backward reads only the forward's log-sum-exp. The Mosaic dQ and
dK/dV kernels (`mosaic_dq`, `mosaic_bwd`) evaluate the same mods and take
the score_mod's derivative in the score in forward mode
(`TileMods.score_grads`: JAX's jvp of the tile part, evaluated with the
equations of JAX's rules Mosaic GPU does not lower rewritten,
`mosaic_jvp.lowerable_jvp`; none for an additive mod, whose derivative
is 1: `unit_slope`). `mod_args`' gradients are the dK/dV kernel's: per
(batch row, head) it sums the loss' gradient in each float32 program
value the score_mod's tile part reads (`grad_slots`; the tile part's
derivative in that value, again in forward mode, `TileMods.slot_grads`,
times the modified logits' cotangent), and XLA pulls those back to the
leaves through the program part (`args_grads`, a vjp of `program_rows`),
with `mod_lowering`'s rule: float leaves of at most H elements. Its dK/dV
kernel does so in its rows layout (padded D <= 128, without the fused
dQ); other calls with mods keep Triton's dK/dV kernel
(`mosaic_common.dkv_mods_reason`). Lowered for CUDA and tested on CPU,
and checked against the float32 reference on an H200
(`tests/test_mods.py::test_flash_mosaic_mods_compiled_on_a_gpu`). The
kernels read the program values through `mosaic_mod_rows`.

A score_mod that adds a linear function of the positions to the score
(ALiBi in a causal call) is split instead: `mosaic_mod_split`.

Glossary of shapes:
- B: batch size; H: query heads; G: query heads per KV head.
- ROWS, bk: a consumer's tile (`mosaic_common.ROWS`, the key tile; the
  dK/dV kernel's transposed tiles are `[ROWS keys, bq queries]`).
- n: the slots whose gradients the dK/dV kernel sums (`grad_slots`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from flexible_attention.kernels.flash.mod_lowering import CALLS
from flexible_attention.kernels.flash.mod_lowering import make_jaxpr
from flexible_attention.kernels.flash.mod_lowering import sum_partials
from flexible_attention.kernels.flash.mod_lowering import sub_jaxpr
from flexible_attention.kernels.flash.mosaic_jvp import PASS_THROUGH
from flexible_attention.kernels.flash.mosaic_jvp import lowerable_jvp

TILE = (1, 1, 8, 16)  # The traced tile: [1, 1, rows, keys], rows != keys.
ROW = 32  # Program values per row: 128 bytes, one TMA copy.
# Equations that only reshape or broadcast: identities on tile values.
SHAPE_OPS = frozenset(("broadcast_in_dim", "reshape", "squeeze", "copy",
                        "copy_p"))
# Elementwise primitives the tile part may use: each is lowered through
# Mosaic GPU by tests/test_mods.py (test_mosaic_forward_lowers_every_tile_
# primitive), on float32 and, where it applies, int32 and bool tiles.
TILE_PRIMITIVES = frozenset((
    "add sub mul div rem neg abs sign max min clamp square integer_pow exp "
    "exp2 log tanh logistic select_n eq ne lt le gt ge and or not xor "
    "shift_left shift_right_arithmetic shift_right_logical "
    "convert_element_type").split())
# Integer equations whose float32 result is the int32 one converted, while
# every value involved is exact in float32 (at most 2^24 in magnitude).
_EXACT_IN_FLOAT = frozenset(("add", "sub", "neg", "abs", "max", "min"))
_EXACT = 2**24
# The rows of program values: float32, and int32 (bools as 0 / 1).
_ROWS = {"float32": 0, "int32": 1, "bool": 1}
_TILE_DTYPES = frozenset(("float32", "int32", "bool"))


class Refused(Exception):
  """Why the Mosaic forward cannot evaluate a mod (the message)."""


class _Value:
  """A value of the walk: of the tile part (`tile`) or the program's, what
  the handler keeps of it (`data`), its aval, and whether it is a literal
  or a named input (`q_pos`, `kv_pos`)."""

  __slots__ = ("tile", "data", "aval", "literal", "name")

  def __init__(self, tile, data, aval, literal=False, name=None):
    self.tile, self.data, self.aval = tile, data, aval
    self.literal, self.name = literal, name


def _size(aval) -> int:
  return int(np.prod(aval.shape))


def _pattern(shape) -> tuple[bool, bool] | None:
  """Whether a tile-shaped value varies along the rows and the keys, or
  None for a shape that is not the tile's (right-aligned, leading 1s)."""
  *lead, rows, keys = (1, 1) + tuple(shape)
  if any(d != 1 for d in lead) or rows not in (1, TILE[2]) or (
      keys not in (1, TILE[3])):
    return None
  return rows != 1, keys != 1


def _walk(jaxpr, consts, args, handler):
  """Runs `jaxpr` on `_Value`s with `handler` (nested calls inlined):
  equations reading a tile value are the tile part's (`handler.tile`), a
  broadcast of one program element to a larger shape starts a tile value
  (`handler.splat`), the rest is the program part (`handler.program`)."""
  env = {}

  def read(v):
    if hasattr(v, "val"):  # A literal.
      return _Value(False, v.val, v.aval, literal=True)
    return env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = _Value(False, handler.const(c), v.aval)
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    out_aval = eqn.outvars[0].aval if eqn.outvars else None
    if eqn.primitive.name in CALLS:
      sub, sub_consts = sub_jaxpr(eqn)
      outs = _walk(sub, sub_consts, ins, handler)
    elif any(x.tile for x in ins):
      outs = [_Value(True, handler.tile(eqn, ins), out_aval)]
    elif (eqn.primitive.name in SHAPE_OPS and len(ins) == 1
          and _size(ins[0].aval) == 1 and _size(out_aval) > 1):
      outs = [_Value(True, handler.splat(ins[0], out_aval), out_aval)]
    else:
      outs = [_Value(False, d, v.aval)
              for v, d in zip(eqn.outvars, handler.program(eqn, ins))]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


class _Handler:
  """What the walks share: the program values the tile part reads, each
  given a slot of a row once (`slot`), in the order the walk meets them."""

  def __init__(self, counts=(0, 0)):
    self.slots = {}  # id(value) -> (value, row, index); keeps it alive.
    self.counts = list(counts)

  def slot(self, x: _Value) -> tuple[int, int]:
    if id(x) not in self.slots:
      row = _ROWS[jnp.dtype(x.aval.dtype).name]
      self.slots[id(x)] = (x, row, self.counts[row])
      self.counts[row] += 1
      self.new_slot(x, row)
    return self.slots[id(x)][1:]

  def new_slot(self, x: _Value, row: int):
    del x, row

  def const(self, c):
    return c

  def program(self, eqn, ins):
    del ins
    return [None] * len(eqn.outvars)

  def use(self, x: _Value):
    """A program value the tile part reads."""
    if not x.literal:
      self.slot(x)

  def splat(self, x: _Value, aval):
    del aval
    self.use(x)

  def tile(self, eqn, ins):
    del eqn
    for x in ins:
      if not x.tile:
        self.use(x)


class _Check(_Handler):
  """The walk on avals that finds why a mod cannot run here (`Refused`)
  and which positions its tile part reads."""

  def __init__(self, kind: str, counts):
    super().__init__(counts)
    self.kind, self.reads = kind, set()

  def refuse(self, what: str):
    raise Refused(f"its {self.kind} {what}")

  def use(self, x: _Value):
    if x.literal:
      return
    if _size(x.aval) != 1:
      self.refuse(f"reads a value of shape {list(x.aval.shape)} computed "
                  f"from mod_args per element (it loads only single values "
                  f"at the program's batch row and head)")
    dtype = jnp.dtype(x.aval.dtype).name
    if dtype not in _ROWS:
      self.refuse(f"reads a {dtype} value of mod_args (it loads float32, "
                  f"int32 and bool)")
    self.slot(x)
    if max(self.counts) > ROW:
      self.refuse(f"reads more than {ROW} values of mod_args of one dtype")

  def splat(self, x: _Value, aval):
    if _pattern(aval.shape) is None:
      self.refuse(f"broadcasts to shape {list(aval.shape)}, not the tile's")
    self.use(x)

  def tile(self, eqn, ins):
    name = eqn.primitive.name
    if name == "gather":
      self.refuse("indexes mod_args per element (at indices computed from "
                  "q_pos, kv_pos or the score, e.g. table[bucket, head] or "
                  "doc_ids[batch, q_pos]; it loads mod_args only at the "
                  "program's batch row and head)")
    for x in ins:  # A value of another shape: only a gather may read it
      if x.tile and x.data is not None:  # (an index vector).
        return x.data
    if name not in TILE_PRIMITIVES and name not in SHAPE_OPS:
      self.refuse(f"uses the primitive {name!r} per element")
    if len(eqn.outvars) != 1:
      self.refuse(f"uses {name!r} with {len(eqn.outvars)} results")
    out = eqn.outvars[0].aval
    if jnp.dtype(out.dtype).name not in _TILE_DTYPES:
      self.refuse(f"computes in {jnp.dtype(out.dtype).name} (it takes "
                  f"float32, int32 and bool)")
    if name == "rem" and jnp.issubdtype(out.dtype, jnp.floating):
      self.refuse("uses 'rem' on floats (Mosaic GPU has it on integers)")
    self.reads.update(x.name for x in ins if x.name in ("q_pos", "kv_pos"))
    super().tile(eqn, ins)
    pattern, before = _pattern(out.shape), _pattern(ins[0].aval.shape)
    if pattern is None or (name in SHAPE_OPS and (before is None or any(
        b and not a for a, b in zip(pattern, before)))):
      # Not the tile's shape, or an axis moved: not elementwise, unless a
      # gather's index vector (refused above, naming the gather).
      return (f"makes a value of shape {list(out.shape)} from "
              f"{list(ins[0].aval.shape)} (not elementwise)")
    return None


class ProgramWalk(_Handler):
  """The walk in XLA on one (batch, head): the program part's values."""

  def __init__(self):
    super().__init__()
    self.values = ([], [])

  def new_slot(self, x: _Value, row: int):
    self.values[row].append(x.data)

  def program(self, eqn, ins):
    outs = eqn.primitive.bind(*[x.data for x in ins], **eqn.params)
    return outs if eqn.primitive.multiple_results else [outs]


class _Kernel(_Handler):
  """The walk in the kernel: the tile part on `[ROWS, bk]` tiles. With
  `causal` every pair the kernel keeps has `q_pos >= kv_pos`, so
  `abs(q_pos - kv_pos)` is `q_pos - kv_pos` wherever it matters (the pairs
  it changes are masked after the mod): `distances` holds the ids of the
  tiles that are `q_pos - kv_pos`."""

  def __init__(self, counts, scalars, shape, position_bound=None,
               causal=False):
    super().__init__(counts)
    self.scalars, self.shape, self.bound = scalars, shape, position_bound
    self.tiles = {}
    self.shadows = {}  # id(int tile) -> (int tile, float32 tile, bound).
    self.floated = 0  # Conversions served by a shadow.
    self.causal, self.positions = causal, {}
    self.distances = {}  # id(tile) -> tile, equal to q_pos - kv_pos.
    self.elided = 0  # Absolute values of a causal distance dropped.

  def shadow(self, x: _Value):
    """`(float32 value, bound)` equal to the int32 value `x` (exact: every
    value it was computed from is at most `bound` in magnitude), or None.
    Int literals and, with a position bound, the positions have one; an
    exact equation (`_EXACT_IN_FLOAT`) on values that have one does, while
    its bound stays within `_EXACT`."""
    if x.literal and np.issubdtype(np.asarray(x.data).dtype, np.integer):
      return np.float32(x.data), abs(int(x.data))
    if not x.tile:
      return None
    if x.name in ("q_pos", "kv_pos") and self.bound is not None and (
        id(x.data) not in self.shadows):
      self.shadows[id(x.data)] = (x.data, x.data.astype(jnp.float32),
                                  self.bound)
    entry = self.shadows.get(id(x.data))
    return None if entry is None else entry[1:]

  def shadow_of(self, name: str, ins, out):
    """Records `out`'s shadow where `name` on the inputs' shadows is exact."""
    if name not in _EXACT_IN_FLOAT:
      return
    shadows = [self.shadow(x) for x in ins]
    if not all(shadows):
      return
    values, bounds = zip(*shadows)
    bound = sum(bounds) if name in ("add", "sub") else max(bounds)
    if bound > _EXACT:
      return
    if name == "neg":  # 0 - x: no -0.0, which the int32 value cannot be.
      value = np.float32(0) - values[0]
    else:
      value = getattr(lax, name)(*values)
    self.shadows[id(out)] = (out, value, bound)

  def const(self, c):
    return None

  def full(self, x: _Value):
    """A program value or literal broadcast over the tile."""
    dtype = x.aval.dtype
    if x.literal:
      return jnp.full(self.shape, x.data, dtype)
    if id(x) not in self.tiles:
      row, index = self.slot(x)
      value = lax.broadcast_in_dim(self.scalars[row][index], self.shape, ())
      self.tiles[id(x)] = value != 0 if dtype == jnp.bool_ else value
    return self.tiles[id(x)]

  def splat(self, x: _Value, aval):
    return self.full(x)

  def tile(self, eqn, ins):
    name = eqn.primitive.name
    for x in ins:  # The positions' tiles, by identity (shapes keep it).
      if x.name in ("q_pos", "kv_pos"):
        self.positions[x.name] = x.data
    if name in SHAPE_OPS:
      return ins[0].data
    if name == "abs" and self.causal and id(ins[0].data) in self.distances:
      self.elided += 1  # |q - k| = q - k on every pair the kernel keeps.
      return ins[0].data
    if name == "not" and ins[0].aval.dtype == jnp.bool_:
      # Mosaic GPU's `not` on bools fails in jax 0.11; `xor True` lowers.
      return lax.bitwise_xor(ins[0].data, np.asarray(True))
    if name == "convert_element_type" and (
        eqn.params["new_dtype"] == jnp.float32):
      shadow = self.shadow(ins[0])
      if shadow is not None:
        self.floated += 1
        return shadow[0]
    args = [x.data if x.tile else
            np.asarray(x.data, x.aval.dtype) if x.literal and name != "select_n"
            else self.full(x) for x in ins]
    out = eqn.primitive.bind(*args, **eqn.params)
    if self.bound is not None and jnp.dtype(out.dtype) == jnp.int32:
      self.shadow_of(name, ins, out)
    if (self.causal and name == "sub" and len(ins) == 2 and
        self._is(ins[0], "q_pos") and self._is(ins[1], "kv_pos")):
      self.distances[id(out)] = out
    return out

  def _is(self, x: _Value, name: str) -> bool:
    """Whether `x` is the `name` positions' tile (or a broadcast of it)."""
    tile = self.positions.get(name)
    return x.tile and tile is not None and x.data is tile


def memo(fn):
  """`fn(km, *flags)` cached per `KernelMods` and flags (computed again for
  an unhashable one, e.g. a mod that is an unhashable callable object)."""
  cached = functools.lru_cache(maxsize=64)(fn)

  @functools.wraps(fn)
  def call(km, *flags):
    try:
      hash(km)
    except TypeError:
      return fn(km, *flags)
    return cached(km, *flags)

  return call


@memo
def mod_jaxprs(km) -> tuple[tuple[str, Any], ...]:
  """`(kind, closed jaxpr on TILE)` of each mod the call has."""
  return tuple((kind, make_jaxpr(km, kind, TILE))
               for kind in ("score_mod", "mask_mod")
               if getattr(km, kind) is not None)


def walk_mod(kind: str, closed, handler, program=(), tiles=None) -> _Value:
  """Walks one mod with `handler`; its inputs in the mod's order: score
  (score_mod only), batch, head, q_pos, kv_pos, the leaves, with data
  `program` (batch, head, the leaves; empty: None) and `tiles` (by name;
  None: None). Returns its output; one of the program part is one the tile
  part reads (`handler.use`)."""
  avals = [v.aval for v in closed.jaxpr.invars]
  names = (("score",) if kind == "score_mod" else ()) + (
      "batch", "head", "q_pos", "kv_pos")
  program = list(program) or [None] * (len(avals) - len(names) + 2)
  values = [_Value(False, program[("batch", "head").index(n)], a)
            if n in ("batch", "head") else
            _Value(True, (tiles or {}).get(n), a, name=n)
            for n, a in zip(names, avals)]
  values += [_Value(False, x, a)
             for x, a in zip(program[2:], avals[len(names):])]
  (out,) = _walk(closed.jaxpr, closed.consts, values, handler)
  if not out.tile:
    handler.use(out)
  return out


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the Mosaic forward knows of a call's mods before tracing it.

  Attributes:
    reason: why it cannot evaluate them (None: it can).
    counts: the program values per row (float32, int32).
    offsets: per mod kind, the slots before its own (float32, int32).
    reads: per mod kind, the positions (`q_pos`, `kv_pos`) it reads.
  """

  reason: str | None
  counts: tuple[int, int] = (0, 0)
  offsets: tuple[tuple[str, tuple[int, int]], ...] = ()
  reads: tuple[tuple[str, frozenset[str]], ...] = ()

  def reads_of(self, kind: str) -> frozenset[str]:
    return dict(self.reads).get(kind, frozenset())

  def float_slots(self, kind: str) -> range:
    """The float32 slots `kind`'s tile part reads (each walk numbers its
    slots after the previous mod's)."""
    kinds = [k for k, _ in self.offsets]
    if kind not in kinds:
      return range(0)
    starts = [o[0] for _, o in self.offsets] + [self.counts[0]]
    return range(starts[kinds.index(kind)], starts[kinds.index(kind) + 1])


@memo
def plan(km) -> Plan:
  """The call's `Plan` (`km`: its `KernelMods`)."""
  counts, offsets, reads = (0, 0), [], []
  for kind, closed in mod_jaxprs(km):
    check = _Check(kind, counts)
    try:
      out = walk_mod(kind, closed, check)
      if out.tile and out.data is not None:
        check.refuse(out.data)
    except Refused as e:
      return Plan(str(e))
    offsets.append((kind, counts))
    reads.append((kind, frozenset(check.reads)))
    counts = tuple(check.counts)
  return Plan(None, counts, tuple(offsets), tuple(reads))


@memo
def unit_slope(km) -> bool:
  """Whether the score_mod's derivative in the score is exactly 1 wherever
  it is evaluated: its jvp hands the score's tangent back unchanged, or
  through equations that keep ones ones (`PASS_THROUGH`; jax 0.11 may
  reshard it). An additive mod, e.g. ALiBi's `s - slopes[head] *
  |q_pos - kv_pos|`: the backward's chain rule has nothing to multiply
  (`TileMods.score_grads`)."""
  if km is None or km.score_mod is None:
    return False
  closed = dict(mod_jaxprs(km))["score_mod"]
  avals = [v.aval for v in closed.jaxpr.invars]

  def tangent(t, s, *rest):
    mod = lambda s: jax.core.eval_jaxpr(closed.jaxpr, closed.consts, s,
                                        *rest)[0]
    return jax.jvp(mod, (s,), (t,))[1]

  jvp = jax.make_jaxpr(tangent)(avals[0], *avals).jaxpr
  producers = {id(v): e for e in jvp.eqns for v in e.outvars}
  out = jvp.outvars[0]
  while id(out) in producers and (
      producers[id(out)].primitive.name in PASS_THROUGH):
    out = producers[id(out)].invars[0]
  return out is jvp.invars[0]


def unmasked_reads(km, name: str, dropout: bool = False) -> tuple[str, ...]:
  """`(name,)` if the score_mod reads position `name` (a structure vector
  the kernels load on the tiles they do not mask) or the call has dropout
  (whose hash reads both positions), else `()`."""
  reads = dropout or (km and name in plan(km).reads_of("score_mod"))
  return (name,) if reads else ()


def unsupported_reason(km) -> str | None:
  """Why the Mosaic forward cannot evaluate the call's mods, or None."""
  return None if km is None else plan(km).reason


def program_rows(km, mods, batch: int, heads: int, leaves=None):
  """The program values of every (batch row, query head), XLA.

  Args:
    km: the call's `KernelMods` (`plan(km).reason` None).
    mods: the call's `core.mods.Mods` (`mod_args`, offsets).
    batch, heads: B and H of the kernel's operands.
    leaves: `mod_args`' leaves in place of `mods.args`' (None: those), for
      differentiating (`args_grads`).

  Returns:
    `(floats [B, H, ROW] float32, ints [B, H, ROW] int32)`, each None when
    the mods read no such value.
  """
  p = plan(km)
  leaves = jax.tree.leaves(mods.args) if leaves is None else leaves

  def one(b, h):
    program = ProgramWalk()
    index = (b.reshape(1, 1, 1, 1), h.reshape(1, 1, 1, 1))
    for kind, closed in mod_jaxprs(km):
      walk_mod(kind, closed, program, index + tuple(leaves))
    return tuple(
        jnp.stack([jnp.reshape(x, ()).astype(dtype) for x in values])
        if values else jnp.zeros((0,), dtype)
        for values, dtype in zip(program.values, (jnp.float32, jnp.int32)))

  rows = per_program(one, mods, batch, heads)
  return tuple(None if n == 0 else jnp.pad(x, ((0, 0), (0, 0), (0, ROW - n)))
               for x, n in zip(rows, p.counts))


def per_program(one, mods, batch: int, heads: int):
  """`one(b, h)` for every (batch row, query head), the mods' offsets
  added: its results stacked `[B, H, ...]`."""
  bs = jnp.arange(batch, dtype=jnp.int32) + mods.batch_offset
  hs = jnp.arange(heads, dtype=jnp.int32) + mods.head_offset
  return jax.vmap(jax.vmap(one, (None, 0)), (0, None))(
      bs.astype(jnp.int32), hs.astype(jnp.int32))


def grad_slots(km) -> range:
  """The float32 slots whose gradients the dK/dV kernel accumulates: those
  the score_mod's tile part reads (the first of the row), when a `mod_args`
  leaf has one (`KernelMods.grads`); empty otherwise."""
  if km is None or km.score_mod is None or not any(km.grads):
    return range(0)
  return plan(km).float_slots("score_mod")


def args_grads(km, mods, partials):
  """`mod_args`' gradients from the slots' (XLA).

  The dK/dV kernel gives, per (batch row, query head), the gradient of the
  loss in each program value the score_mod's tile part reads (`grad_slots`:
  the sum over the head's tiles of the modified logits' cotangent times
  the mod's derivative in that value); they are the cotangent of
  `program_rows`' float rows, which `jax.vjp` pulls back to the leaves
  (any program part: gathers, converts, arithmetic).

  Args:
    km: the call's `KernelMods`.
    mods: the call's `core.mods.Mods`.
    partials: float32 `[B, H, n]`, n = `len(grad_slots(km))`, or None
      (no slot: every gradient is zero).

  Returns:
    `dargs` like `mods.args`, as `mod_lowering.sum_partials` gives them:
    float32, None at integer leaves, zeros at float leaves without an
    in-kernel gradient (`KernelMods.grads`: over H elements).
  """
  if partials is None:
    return sum_partials(km, mods, {})
  leaves = jax.tree.leaves(mods.args)
  wrt = [i for i, grad in enumerate(km.grads) if grad]
  batch, heads, n = partials.shape

  def floats(*values):
    full = list(leaves)
    for i, x in zip(wrt, values):
      full[i] = x
    return program_rows(km, mods, batch, heads, full)[0]  # [B, H, ROW]

  _, pull = jax.vjp(floats, *[leaves[i] for i in wrt])
  first = grad_slots(km).start
  cts = pull(jnp.pad(partials, ((0, 0), (0, 0), (first, ROW - first - n))))
  return sum_partials(km, mods, {i: ct.astype(jnp.float32).reshape(1, -1)
                                 for i, ct in zip(wrt, cts)})


class TileMods:
  """A consumer's view of the mods in the Mosaic kernels.

  Args:
    km: the call's `KernelMods`.
    scalars: `(floats, ints)`, the program's values read from its rows
      (lists of scalars, `plan(km).counts` long).
    shape: the tile, `(ROWS, bk)` (the dK/dV kernel's transposed `(ROWS,
      bq)`: the tile part is elementwise, so it computes the same values
      on either).
    position_bound: a bound on the positions' magnitude, known at trace
      time (`Static.position_bound`), or None. With one, the tile part's
      integer arithmetic on positions that it converts to float32
      (ALiBi's `|q_pos - kv_pos|`) is done in float32 where that is exact
      (`_Kernel.shadow`): positions converted once per vector (the
      compiler shares the conversion of a broadcast), then one float op
      per element, where the int32 way costs an integer op per equation
      and a conversion per element (a quarter-rate instruction, as exp2).
    causal: whether the call is causal (`Static.causal`): every pair the
      kernel keeps then has `q_pos >= kv_pos`, so the tile part's
      `abs(q_pos - kv_pos)` (ALiBi's distance) is evaluated as `q_pos -
      kv_pos`, one operation per element less; the pairs where the two
      differ are masked after the mod, in every kernel.
  """

  def __init__(self, km, scalars, shape, position_bound=None,
               causal=False):
    self.km, self.scalars, self.shape = km, scalars, shape
    self.position_bound, self.causal = position_bound, causal
    self.plan = plan(km)
    self.jaxprs = dict(mod_jaxprs(km))
    self.floated = 0  # Conversions served in float32 (for the tests).
    self.elided = 0  # Causal distances' absolute values dropped (tests).

  def _run(self, kind: str, score, q_pos, kv_pos):
    closed = self.jaxprs[kind]
    handler = _Kernel(dict(self.plan.offsets)[kind], self.scalars,
                      self.shape, self.position_bound, self.causal)
    out = walk_mod(kind, closed, handler,
                   tiles={"score": score, "q_pos": q_pos, "kv_pos": kv_pos})
    self.floated += handler.floated
    self.elided += handler.elided
    return out.data if out.tile else handler.full(out)

  def score(self, s, q_pos, kv_pos):
    """The score_mod on a tile's natural-unit logits `s [ROWS, bk]`
    (float32); `q_pos`, `kv_pos` int32 `[ROWS, bk]` (None where
    `plan.reads_of("score_mod")` does not name them)."""
    return self._run("score_mod", s, q_pos, kv_pos)

  def score_grads(self, s, q_pos, kv_pos):
    """`(s_mod, dmod)`: the score_mod on `s` (as `score`) and its
    elementwise derivative in `s`, in forward mode (the tile part's jvp
    with a tangent of ones: the same allowed primitives, no transposes);
    the dQ and dK/dV kernels' chain rule. `dmod` is None where it is 1
    everywhere (`unit_slope`)."""
    if unit_slope(self.km):
      return self.score(s, q_pos, kv_pos), None
    return lowerable_jvp(lambda x: self.score(x, q_pos, kv_pos), (s,),
                          (jnp.ones_like(s),))

  def slot_grads(self, s, q_pos, kv_pos, slots):
    """Per float32 slot of `slots`, the score_mod's elementwise derivative
    in that program value on the tile (like `s`): forward mode, the value
    the jvp's primal with a tangent of 1 (the dK/dV kernel's `mod_args`
    gradients, `grad_slots`)."""
    floats, ints = self.scalars

    def score(slot, x):
      values = list(floats)
      values[slot] = x
      return TileMods(self.km, (values, ints), self.shape,
                      self.position_bound, self.causal).score(s, q_pos,
                                                              kv_pos)

    return [lowerable_jvp(functools.partial(score, slot), (floats[slot],),
                           (jnp.ones_like(floats[slot]),))[1]
            for slot in slots]

  def visible(self, q_pos, kv_pos):
    """Bool `[ROWS, bk]`: the mask_mod on the tile."""
    return self._run("mask_mod", None, q_pos, kv_pos)

