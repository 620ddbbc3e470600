"""`fa.compare_attentions`: mechanisms side by side against the reference.

Each chosen mechanism runs on identical inputs (optionally on a mesh); its
output and its gradients with respect to q, k and v are checked against the
float32 reference before anything is timed, then compile time, median forward
and forward+backward times and memory are measured. A mechanism that refuses
the call is a row with status `unsupported: why`; one that fails or disagrees
with the reference is a row with status `error: why`.

The check against the reference (`reference_outputs`, then
`check_against_reference`) and a mechanism's pure forward
(`mechanism_forward`) are the benchmark's too (`comparison/measure.py`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flexible_attention import timing
from flexible_attention.core.inputs import canonicalize
from flexible_attention.core.reference import reference_attention
from flexible_attention.core.types import BlockSizes
from flexible_attention.mechanisms import registry
from flexible_attention.sharding.mesh import PartitionAxis
from flexible_attention.sharding.mesh import spec_entry

# Relative error (max |x - ref| / max |ref|) above which a mechanism's result
# is reported as an error and not timed. float32 allows TF32-class matmuls.
TOLERANCE = {"float32": 5e-3, "bfloat16": 6e-2, "float16": 1e-2}


@dataclasses.dataclass(frozen=True)
class ComparisonSetup:
  """The problem every mechanism of one comparison solves."""

  batch_size: int = 2
  q_len: int = 1024
  kv_len: int = 1024
  num_heads: int = 8
  num_kv_heads: int = 8
  head_dim: int = 64
  dtype: str = "float32"
  causal: bool = True
  sliding_window: Any = None
  logits_soft_cap: float | None = None
  num_segments: int = 0
  seed: int = 0


@dataclasses.dataclass
class ComparisonRow:
  """One mechanism's result. Errors are max |x - ref| / max |ref|."""

  mechanism: str
  status: str
  served_by: str | None = None
  out_error: float | None = None
  dq_error: float | None = None
  dk_error: float | None = None
  dv_error: float | None = None
  compile_seconds: float | None = None
  forward_ms: float | None = None
  forward_backward_ms: float | None = None
  temp_bytes: int | None = None
  peak_bytes: int | None = None

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class ComparisonReport:
  """The rows of one comparison, with its setup and mesh description."""

  setup: ComparisonSetup
  mesh: dict[str, int] | None
  rows: list[ComparisonRow]

  def as_dict(self) -> dict[str, Any]:
    return dict(setup=dataclasses.asdict(self.setup), mesh=self.mesh,
                rows=[r.as_dict() for r in self.rows])

  def to_json(self) -> str:
    return json.dumps(self.as_dict(), indent=2, default=str)

  def table(self) -> str:
    """A fixed-width text table of the rows."""
    fmt = format_value
    mib = lambda b: None if b is None else b / 2**20
    header = ("mechanism", "status", "served by", "out err", "dq err",
              "dk err", "dv err", "compile s", "fwd ms", "fwd+bwd ms",
              "temp MiB", "peak MiB")
    lines = [header]
    for r in self.rows:
      status = r.status if len(r.status) <= 60 else r.status[:57] + "..."
      lines.append((r.mechanism, status, r.served_by or "-",
                    fmt(r.out_error, "{:.1e}"), fmt(r.dq_error, "{:.1e}"),
                    fmt(r.dk_error, "{:.1e}"), fmt(r.dv_error, "{:.1e}"),
                    fmt(r.compile_seconds, "{:.2f}"),
                    fmt(r.forward_ms, "{:.2f}"),
                    fmt(r.forward_backward_ms, "{:.2f}"),
                    fmt(mib(r.temp_bytes), "{:.1f}"),
                    fmt(mib(r.peak_bytes), "{:.1f}")))
    return format_table(lines)

  def __str__(self) -> str:
    return self.table()


def format_value(x, spec: str) -> str:
  """`spec.format(x)`, or "-" for None (a table's empty cell)."""
  return "-" if x is None else spec.format(x)


def format_table(lines: Sequence[Sequence[Any]]) -> str:
  """Left-aligned fixed-width columns; the first line is the header."""
  widths = [max(len(str(line[i])) for line in lines)
            for i in range(len(lines[0]))]
  return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths))
                   for line in lines)


def relative_error(x, ref) -> float:
  """max |x - ref| / max |ref|, in float32."""
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  scale = float(np.max(np.abs(ref))) or 1.0
  return float(np.max(np.abs(x - ref))) / scale


def reference_outputs(q, k, v, ct, *, causal: bool, sm_scale: float,
                      sliding_window: Any = None, segment_ids=None,
                      logits_soft_cap: float | None = None,
                      rows: int | None = None):
  """The float32 reference's output and gradients for the last `rows` queries.

  With default (bottom-right) positions the last `rows` queries alone are
  the same problem as within the full sequence, so a long problem is checked
  on a few rows against all keys: the backward of `sum(out * ct)` over those
  rows gives their dq and dk, dv in full. The arrays are used where they
  live: sequence-sharded K/V stay sharded, so on a mesh the reference runs
  over the mesh (XLA partitions it) instead of gathering the full float32
  K/V and their gradients onto one device.

  Args:
    q: `[B, Sq, H, D]`.
    k: `[B, Sk, Hkv, D]`.
    v: `[B, Sk, Hkv, Dv]`.
    ct: `[B, Sq, H, Dv]`, the output's cotangent (its last `rows` queries).
    causal, sm_scale, sliding_window, logits_soft_cap: attention options.
    segment_ids: `[B, S]` int document ids (Sq == Sk), or None.
    rows: the last queries checked (default all Sq).

  Returns:
    `(out [B, rows, H, Dv], (dq [B, rows, H, D], dk [B, Sk, Hkv, D],
    dv [B, Sk, Hkv, Dv]))`, float32.
  """
  rows = q.shape[1] if rows is None else rows
  ids = None
  if segment_ids is not None:
    ids = (jnp.asarray(segment_ids[:, -rows:]), jnp.asarray(segment_ids))

  def out_fn(q_rows, k, v):
    inputs = canonicalize(q_rows, k, v, causal=causal,
                          sliding_window=sliding_window, segment_ids=ids)
    return reference_attention(
        inputs.query, inputs.key, inputs.value, inputs.bias,
        inputs.visibility, sm_scale=sm_scale, softcap=logits_soft_cap).out

  loss = lambda q_rows, k, v, ct_rows: jnp.sum(out_fn(q_rows, k, v) * ct_rows)
  f32 = lambda x: x.astype(jnp.float32)
  q_rows, k, v = f32(q[:, -rows:]), f32(k), f32(v)
  ct_rows = f32(ct[:, -rows:])
  return (jax.jit(out_fn)(q_rows, k, v),
          jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q_rows, k, v, ct_rows))


@dataclasses.dataclass(frozen=True)
class ReferenceCheck:
  """Relative errors of an output and its gradients against the reference."""

  out_error: float
  dq_error: float
  dk_error: float
  dv_error: float
  tolerance: float  # TOLERANCE of the inputs' dtype.

  @property
  def grad_error(self) -> float:
    """The largest gradient error (NaN if any is)."""
    return float(np.max([self.dq_error, self.dk_error, self.dv_error]))

  @property
  def failure(self) -> str | None:
    """The row's status if the check fails (an error that is not finite or
    is above the tolerance), else None."""
    worst = float(np.max([self.out_error, self.grad_error]))
    if np.isfinite(worst) and worst <= self.tolerance:
      return None
    return (f"error: differs from the reference (relative error "
            f"{worst:.1e} > {self.tolerance:.0e}); not timed")


def check_against_reference(out, grads, reference, dtype: str, *,
                            rows: int | None = None) -> ReferenceCheck:
  """The errors of `out` and `grads` against `reference_outputs`'.

  Args:
    out: the mechanism's output `[B, Sq, H, Dv]`.
    grads: its `(dq, dk, dv)` for the same cotangent as the reference's.
    reference: what `reference_outputs` returned, for the same `rows`.
    dtype: the inputs' dtype (which tolerance applies).
    rows: the last queries the reference covers (default all).
  """
  ref_out, (ref_dq, ref_dk, ref_dv) = reference
  dq, dk, dv = grads
  last = (lambda x: x) if rows is None else (lambda x: x[:, -rows:])
  return ReferenceCheck(
      out_error=relative_error(last(out), ref_out),
      dq_error=relative_error(last(dq), ref_dq),
      dk_error=relative_error(dk, ref_dk),
      dv_error=relative_error(dv, ref_dv),
      tolerance=TOLERANCE[np.dtype(dtype).name])


def mechanism_forward(name: str, *, num_heads: int, head_dim: int,
                      num_kv_heads: int, call: dict[str, Any] | None = None,
                      served: list[str] | None = None,
                      **options) -> Callable:
  """The pure forward `(q, k, v) -> out` of one registered mechanism.

  Args:
    name: the mechanism.
    num_heads, head_dim, num_kv_heads: its sizes.
    call: keyword arguments of the module call (`causal`, `segment_ids`).
    served: a list to which tracing appends the mechanism that ran.
    **options: the module's options (`mesh`, `logits_soft_cap`, ...).

  Returns:
    `(q [B, Sq, H, D], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv]) ->
    [B, Sq, H, Dv]`.
  """

  def forward(q, k, v):
    attention = registry.create_attention(
        name, num_heads=num_heads, head_dim=head_dim,
        num_kv_heads=num_kv_heads, **options)
    out = attention(q, k, v, **(call or {})).attention_outputs
    if served is not None:
      served.append(attention.selected_mechanism)
    return out

  apply = hk.without_apply_rng(hk.transform(forward)).apply
  return lambda q, k, v: apply({}, q, k, v)


def _inputs(setup: ComparisonSetup):
  """Random q, k, v, output cotangent and segment ids of a setup."""
  rng = np.random.default_rng(setup.seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  b, sq, sk = setup.batch_size, setup.q_len, setup.kv_len
  q = normal(b, sq, setup.num_heads, setup.head_dim)
  k = normal(b, sk, setup.num_kv_heads, setup.head_dim)
  v = normal(b, sk, setup.num_kv_heads, setup.head_dim)
  ct = normal(b, sq, setup.num_heads, setup.head_dim)
  segment_ids = None
  if setup.num_segments > 1:
    if sq != sk:
      raise ValueError("compare_attentions: segments need q_len == kv_len.")
    cuts = np.sort(rng.choice(np.arange(1, sk), setup.num_segments - 1,
                              replace=False))
    segment_ids = np.broadcast_to(
        np.searchsorted(cuts, np.arange(sk), side="right"),
        (b, sk)).astype(np.int32)
  return q, k, v, ct, segment_ids


def compare_attentions(
    mechanisms: Sequence[str] | None = None,
    *,
    batch_size: int = 2,
    sequence_length: int = 1024,
    kv_sequence_length: int | None = None,
    num_heads: int = 8,
    num_kv_heads: int | None = None,
    head_dim: int = 64,
    dtype: str = "float32",
    causal: bool = True,
    sliding_window: Any = None,
    logits_soft_cap: float | None = None,
    num_segments: int = 0,
    block_sizes: BlockSizes | None = None,
    mesh: jax.sharding.Mesh | None = None,
    partition_axis: PartitionAxis | None = None,
    repeats: int = 10,
    seed: int = 0,
    time_it: bool = True,
) -> ComparisonReport:
  """Runs mechanisms on the same inputs and compares them with the reference.

  Args:
    mechanisms: names to compare (default: every registered mechanism).
    batch_size: B.
    sequence_length: Sq.
    kv_sequence_length: Sk (default Sq).
    num_heads: H.
    num_kv_heads: Hkv (default H).
    head_dim: D (= Dv).
    dtype: input dtype name.
    causal, sliding_window, logits_soft_cap: attention options.
    num_segments: if > 1, packs each row into this many segments of random
      lengths (segment ids).
    block_sizes: given to the mechanisms that read every set field.
    mesh, partition_axis: run sharded on this mesh.
    repeats: timed calls per measurement (median reported).
    seed: input seed.
    time_it: measure times (else only check correctness).

  Returns:
    A `ComparisonReport` (print it for a table).
  """
  mechanisms = tuple(mechanisms or registry.available_mechanisms())
  setup = ComparisonSetup(
      batch_size=batch_size, q_len=sequence_length,
      kv_len=kv_sequence_length or sequence_length, num_heads=num_heads,
      num_kv_heads=num_kv_heads or num_heads, head_dim=head_dim,
      dtype=np.dtype(dtype).name, causal=causal,
      sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
      num_segments=num_segments, seed=seed)
  q, k, v, ct, segment_ids = _inputs(setup)
  partition_axis = partition_axis or PartitionAxis()
  reference = reference_outputs(
      q, k, v, ct, causal=setup.causal, sm_scale=setup.head_dim**-0.5,
      sliding_window=setup.sliding_window, segment_ids=segment_ids,
      logits_soft_cap=setup.logits_soft_cap)

  cast = lambda x: jnp.asarray(x, setup.dtype)
  args = (cast(q), cast(k), cast(v))
  if mesh is not None:
    spec = P(spec_entry(partition_axis.batch_axis), None,
             spec_entry(partition_axis.head_axis), None)
    args = tuple(jax.device_put(a, NamedSharding(mesh, spec)) for a in args)
  ct = jnp.asarray(ct, jnp.float32)
  rows = []
  for name in mechanisms:
    rows.append(_compare_one(name, setup, args, ct, segment_ids, reference,
                             block_sizes, mesh, partition_axis, repeats,
                             time_it))
  mesh_shape = None if mesh is None else dict(mesh.shape)
  return ComparisonReport(setup, mesh_shape, rows)


def _compare_one(name, setup, args, ct, segment_ids, reference, block_sizes,
                 mesh, partition_axis, repeats, time_it):
  row = ComparisonRow(mechanism=name, status="ok")
  served = []
  reads = set(registry.capabilities(name).block_size_fields)
  use_blocks = (block_sizes is not None and
                set(block_sizes.set_fields()) <= reads)
  fwd = mechanism_forward(
      name, num_heads=setup.num_heads, head_dim=setup.head_dim,
      num_kv_heads=setup.num_kv_heads,
      call=dict(causal=setup.causal, segment_ids=segment_ids), served=served,
      logits_soft_cap=setup.logits_soft_cap,
      sliding_window=setup.sliding_window,
      block_sizes=block_sizes if use_blocks else None, mesh=mesh,
      partition_axis=partition_axis if mesh is not None else None)

  def fwd_bwd(q, k, v):
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32) * ct)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  try:
    compiled_fwd = timing.compile_fn(fwd, *args)
    compiled = timing.compile_fn(fwd_bwd, *args)
  except NotImplementedError as e:
    row.status = f"unsupported: {e}"
    return row
  except Exception as e:  # pylint: disable=broad-except
    row.status = f"error: {type(e).__name__}: {e}"
    return row
  row.served_by = served[-1] if served else None
  row.compile_seconds = compiled.compile_seconds
  row.temp_bytes = compiled.temp_bytes
  try:
    out = compiled_fwd.fn(*args)
    _, grads = compiled.fn(*args)
    check = check_against_reference(out, grads, reference, setup.dtype)
  except Exception as e:  # pylint: disable=broad-except
    row.status = f"error: {type(e).__name__}: {e}"
    return row
  row.out_error = check.out_error
  row.dq_error, row.dk_error, row.dv_error = (check.dq_error, check.dk_error,
                                              check.dv_error)
  if check.failure:
    row.status = check.failure
    return row
  if time_it:
    row.forward_ms = 1e3 * timing.median_seconds(compiled_fwd.fn, *args,
                                                 repeats=repeats)
    row.forward_backward_ms = 1e3 * timing.median_seconds(
        compiled.fn, *args, repeats=repeats)
    row.peak_bytes = timing.peak_device_bytes()
  return row
