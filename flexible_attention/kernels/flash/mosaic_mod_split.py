"""A score_mod split into key and row terms in flash's Mosaic GPU kernels.

A score_mod that adds a linear function of the positions to the score,
`score + a q_pos + b kv_pos + c` with a, b, c program values
(`mosaic_mods`: per batch row and head; ALiBi's `-slopes[head] |q_pos -
kv_pos|` in a causal call, where every pair a kernel keeps has `q_pos >=
kv_pos`: `a = -slope`, `b = slope`), is not evaluated per element
(`mosaic_mods.TileMods.score`, several operations per element) but split
(`split_slot`):

- XLA writes `(b, a, c)` per (batch row, query head) into the float32 rows
  of program values after the mods' own (`split_rows`);
- the forward, dQ and dK/dV kernels add the key terms `b (kv_pos - ref)`
  to the logits: a vector per key tile (`key_terms`), scaled once to the
  logits' units, so one add per element; `ref` is the position of the
  first of each group of `REF_ROWS` query rows (a consumer's rows in the
  forward and dQ kernels, a step's query tile in the dK/dV kernel);
- the row terms `a (q_pos - ref) + c + (a + b) ref` are constant along a
  row, so they leave the softmax unchanged and only move the log-sum-exp:
  XLA adds them to the forward's and takes them off the one the backward
  kernels read (`row_terms`, `split_lse2`).

Relative to `ref`, both terms are small wherever a probability is not
negligible (nearby keys), so float32 keeps the logits as exact as the
per-element evaluation does (relative to position 0 they would not be,
at a million tokens). The forward with sinks evaluates the mod per
element (a sink's logit would move with the row term); its backward is
split all the same (it reads the true log-sum-exp). `_Affine` is the walk
that recognises the form.

Glossary of shapes:
- B: batch size; H: query heads; Sqp: query length padded to whole tiles.
- ROW: program values per row (`mosaic_mods.ROW`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flexible_attention.kernels.flash.mosaic_common import ROWS
from flexible_attention.kernels.flash.mosaic_mods import ProgramWalk
from flexible_attention.kernels.flash.mosaic_mods import ROW
from flexible_attention.kernels.flash.mosaic_mods import Refused
from flexible_attention.kernels.flash.mosaic_mods import SHAPE_OPS
from flexible_attention.kernels.flash.mosaic_mods import memo
from flexible_attention.kernels.flash.mosaic_mods import mod_jaxprs
from flexible_attention.kernels.flash.mosaic_mods import per_program
from flexible_attention.kernels.flash.mosaic_mods import plan
from flexible_attention.kernels.flash.mosaic_mods import walk_mod
from flexible_attention.kernels.flash.mosaic_numerics import SMALL_INT
from flexible_attention.kernels.flash.mosaic_numerics import small_int_to_float
from flexible_attention.kernels.flash.structure import LOG2E


def _number(x):
  """A python number for a Python or NumPy scalar literal, else x."""
  if isinstance(x, (bool, np.bool_)):
    return x
  if isinstance(x, (int, float, np.integer, np.floating)) or (
      isinstance(x, np.ndarray) and x.ndim == 0):
    return np.asarray(x).item()
  return x


def _is_number(x, value=None) -> bool:
  """Whether `x` is a Python number (equal to `value` when given): a
  coefficient known at trace time."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and (
      value is None or x == value)


def _add(a, b):
  """`a + b` of two coefficients, exact zeros dropped at trace time."""
  if _is_number(a, 0):
    return b
  if _is_number(b, 0):
    return a
  return a + b


def _mul(a, b):
  """`a * b` of two coefficients, exact zeros and ones kept static."""
  if _is_number(a, 0) or _is_number(b, 0):
    return 0
  if _is_number(a, 1):
    return b
  if _is_number(b, 1):
    return a
  return a * b


_BASIS = ("score", "q", "k", "1")  # score + a q_pos + b kv_pos + c.


class _Affine(ProgramWalk):
  """The walk (`mosaic_mods.walk_mod`) in XLA on one (batch, head) that
  writes the score_mod's tile part as `score + a q_pos + b kv_pos + c`:
  each tile value is a form `{basis: coefficient}` (`_BASIS`), each
  coefficient a program value (traced) or a Python number; `Refused` for
  any step that leaves that set. With `causal` every pair a kernel keeps
  has `q_pos >= kv_pos`, so `|q_pos - kv_pos|` (and `|kv_pos - q_pos|`) is
  `q_pos - kv_pos` there. The program part is evaluated as `ProgramWalk`
  evaluates it."""

  def __init__(self, causal: bool):
    super().__init__()
    self.causal = causal

  def form(self, x) -> dict:
    if x.tile:
      return x.data
    return {"1": _number(x.data) if x.literal else x.data}

  def splat(self, x, aval):
    del aval
    return self.form(x)

  def tile(self, eqn, ins):
    name = eqn.primitive.name
    forms = [self.form(x) for x in ins]
    constant = [set(f) <= {"1"} for f in forms]
    if name in SHAPE_OPS:
      return forms[0]
    if name in ("add", "sub"):
      sign = 1 if name == "add" else -1
      a, b = forms
      return {k: _add(a.get(k, 0), _mul(sign, b.get(k, 0)))
              for k in _BASIS if k in a or k in b}
    if name == "neg":
      return {k: _mul(-1, c) for k, c in forms[0].items()}
    if name == "mul" and any(constant):
      scale_at = constant.index(True)
      scale, other = forms[scale_at]["1"], forms[1 - scale_at]
      return {k: _mul(scale, c) for k, c in other.items()}
    if (name == "div" and constant[1] and
        jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating)):
      d = forms[1]["1"]
      inverse = 1.0 / d if _is_number(d) and d != 0 else (
          None if _is_number(d) else 1.0 / d)
      if inverse is not None:
        return {k: _mul(inverse, c) for k, c in forms[0].items()}
    if name == "convert_element_type" and (
        eqn.params["new_dtype"] == jnp.float32):
      return {k: float(c) if _is_number(c) else jnp.asarray(c, jnp.float32)
              for k, c in forms[0].items()}
    if name == "abs" and self.causal:
      f = {k: c for k, c in forms[0].items() if not _is_number(c, 0)}
      if set(f) == {"q", "k"} and all(_is_number(c) for c in f.values()) and (
          abs(f["q"]) == 1 and f["k"] == -f["q"]):
        return {"q": abs(f["q"]), "k": -abs(f["q"])}
    raise Refused(f"its score_mod is not score + a q_pos + b kv_pos + c "
                  f"({name!r})")


SPLIT_TERMS = 3  # The float32 slots of a split score_mod: b, a, c.
_POSITIONS = {"score": {"score": 1}, "q_pos": {"q": 1}, "kv_pos": {"k": 1}}


def _affine_terms(closed, causal: bool, program):
  """`(b, a, c)`, float32 scalars: the score_mod of `closed` on one
  program's values (`walk_mod`'s `program`) is `score + a q_pos + b kv_pos
  + c` on the pairs a kernel keeps; `Refused` if it is not (or scales the
  score)."""
  out = walk_mod("score_mod", closed, _Affine(causal), program, _POSITIONS)
  if not out.tile or not _is_number(out.data.get("score"), 1):
    raise Refused("its score_mod does not add to the score")
  return tuple(jnp.asarray(out.data.get(k, 0), jnp.float32).reshape(())
               for k in ("k", "q", "1"))


@memo
def split_slot(km, causal: bool) -> int | None:
  """Where the float32 rows of the mods' program values hold the split
  score_mod's `(b, a, c)` (`split_rows`), or None where the kernels
  evaluate the score_mod per element: it is not `score + a q_pos + b kv_pos
  + c` (with `causal` only, `|q_pos - kv_pos|` counts as `q_pos - kv_pos`),
  the Mosaic kernels cannot take the mods (`mosaic_mods.plan`), or the row
  has no room for three more values."""
  if km is None or km.score_mod is None or plan(km).reason is not None:
    return None
  n = plan(km).counts[0]
  if n + SPLIT_TERMS > ROW:
    return None
  closed = dict(mod_jaxprs(km))["score_mod"]
  avals = [v.aval for v in closed.jaxpr.invars]
  program = [jax.ShapeDtypeStruct(a.shape, a.dtype)
             for a in avals[1:3] + avals[5:]]  # batch, head, the leaves.
  try:
    jax.eval_shape(lambda *p: _affine_terms(closed, causal, p), *program)
  except Refused:
    return None
  return n


def read_counts(km, causal: bool) -> tuple[int, int]:
  """The float32 and int32 program values a kernel reads per row: the
  mods' (`plan`) and a split score_mod's key slope `b` after them."""
  counts = plan(km).counts
  n = split_slot(km, causal)
  return counts if n is None else (n + 1, counts[1])


def split_rows(km, causal: bool, mods, rows, batch: int, heads: int):
  """`program_rows`' rows with a split score_mod's `(b, a, c)` per (batch
  row, query head) in float32 slots `split_slot(km, causal)` on (`rows`
  unchanged without one)."""
  n = split_slot(km, causal)
  if n is None:
    return rows
  closed = dict(mod_jaxprs(km))["score_mod"]
  leaves = tuple(jax.tree.leaves(mods.args))
  terms = per_program(
      lambda b, h: jnp.stack(_affine_terms(
          closed, causal, (b.reshape(1, 1, 1, 1), h.reshape(1, 1, 1, 1)) +
          leaves)), mods, batch, heads)  # [B, H, 3]
  floats = rows[0] if rows[0] is not None else jnp.zeros(
      (batch, heads, ROW), jnp.float32)
  return (floats.at[:, :, n:n + SPLIT_TERMS].set(terms), rows[1])


REF_ROWS = ROWS  # Query rows per reference position of a split score_mod.


def row_terms(km, causal: bool, floats, q_pos):
  """A split score_mod's row terms `a (q_pos - ref) + c + (a + b) ref`,
  float32 `[B, H, Sqp]` (`split_slot`): what the kernels leave out of the
  logits and so of the log-sum-exp. `floats`: `split_rows`' float32 rows
  `[B, H, ROW]`; `q_pos`: int32 `[B, Sqp]`, Sqp a multiple of
  `REF_ROWS`; `ref` the position of the first row of each group of
  `REF_ROWS`."""
  n = split_slot(km, causal)
  b, a, c = (floats[:, :, n + i, None] for i in range(SPLIT_TERMS))
  ref = jnp.repeat(q_pos[:, ::REF_ROWS], REF_ROWS, axis=1)
  offset = (q_pos - ref).astype(jnp.float32)[:, None]
  return a * offset + c + (a + b) * ref.astype(jnp.float32)[:, None]


def key_terms(mods, kv_pos, ref, unit: float = 1.0):
  """A split score_mod's key terms `b (kv_pos - ref) / unit` in a kernel,
  float32 like the int32 key positions `kv_pos` (a vector), `ref` the
  int32 position of the first query row of the tile's group, `unit` what
  one unit of the logits it joins is in natural ones (the scale folded
  into `b` once, a scalar); `mods`: the consumer's `mosaic_mods.TileMods`
  (`b` among its float32 scalars, in slot `split_slot`). In `wgmma`'s
  layout a thread holds two rows of a tile and a quarter of its columns,
  so these three operations on a key vector cost it as much as 1.5
  elementwise operations on the tile (in the dK/dV kernel, whose keys are
  rows, two values a thread: next to nothing). Where the positions are
  known to be small (`position_bound`, the default positions below 2^21)
  the difference becomes float32 without a conversion instruction
  (`mosaic_numerics.small_int_to_float`): the forward's exp2 shares its unit
  with conversions, and a conversion per column is half an exp2 per
  element."""
  slope = mods.scalars[0][split_slot(mods.km, mods.causal)] * (1.0 / unit)
  bound = mods.position_bound
  if bound is not None and 2 * bound < SMALL_INT:
    return slope * small_int_to_float(kv_pos - ref)
  return slope * (kv_pos - ref).astype(jnp.float32)


def split_lse2(st, lse2, mod_rows, q_vectors):
  """The base-2 log-sum-exp `[B, H, Sqp]` a backward kernel of the call
  `st` reads with a split score_mod (`split_slot`; `lse2` unchanged
  without one): its row terms taken off, as the kernel's logits leave
  them out. `mod_rows`, `q_vectors`: the kernel's operands."""
  if split_slot(st.mods, st.causal) is None:
    return lse2
  q_pos = q_vectors[:, st.vectors()[0].index("q_pos")]
  return lse2 - LOG2E * row_terms(st.mods, st.causal, mod_rows[0], q_pos)
