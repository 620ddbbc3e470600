"""Speed and memory of mechanisms over sequence lengths.

`run_benchmark(config)` (called by `scripts/benchmark.py`) times forward and
forward+backward of each mechanism at each sequence length, after checking the
result against the float32 reference. The check stays cheap at any length:
with default (bottom-right) positions the last `check_rows` queries of the
full problem are exactly the problem of those queries alone, so the reference
runs on `[B, check_rows]` queries against all keys; gradients are checked the
same way, by giving the timed backward a cotangent that is zero outside those
rows (dq of the rows, dk and dv in full).

A mechanism whose compiled program would need more memory than the machine
has (`memory_analysis`) is recorded as `skipped: needs ...` and not run, so a
dense mechanism at a long sequence cannot take the process down.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import re
from typing import Any

from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flexible_attention.comparison import timing
from flexible_attention.comparison.compare import TOLERANCE
from flexible_attention.comparison.compare import format_table
from flexible_attention.comparison.compare import relative_error
from flexible_attention.core.inputs import canonicalize
from flexible_attention.core.reference import reference_attention
from flexible_attention.mechanisms import registry
from flexible_attention.sharding.mesh import make_mesh


@dataclasses.dataclass
class BenchmarkRow:
  """One (mechanism, sequence length) measurement."""

  mechanism: str
  sequence_length: int
  status: str
  cell: str | None = None
  served_by: str | None = None
  out_error: float | None = None
  grad_error: float | None = None
  compile_seconds: float | None = None
  forward_ms: float | None = None
  forward_backward_ms: float | None = None
  forward_tflops: float | None = None
  forward_backward_tflops: float | None = None
  temp_bytes: int | None = None
  peak_bytes: int | None = None
  devices: int = 1
  # Context parallel rows: per-device TFLOP/s over the single-device
  # TFLOP/s of the same block kernel at the per-device length.
  fraction_of_single_device: float | None = None


@dataclasses.dataclass(frozen=True)
class Cell:
  """One problem of a benchmark: sizes, causal and packed documents."""

  batch: int
  seq_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  causal: bool
  packed: bool = False  # Segment ids: documents of 64..2048 tokens.

  @property
  def name(self) -> str:
    kind = "packed" if self.packed else ("causal" if self.causal else "full")
    gqa = "" if self.num_heads == self.num_kv_heads else (
        f" H{self.num_heads}/{self.num_kv_heads}")
    return f"S{self.seq_len} D{self.head_dim} {kind}{gqa}"


def config_cell(config, seq_len: int) -> Cell:
  """The cell of a plain (one size per sequence length) config."""
  return Cell(batch=config.batch_size, seq_len=seq_len,
              num_heads=config.num_heads,
              num_kv_heads=config.num_kv_heads or config.num_heads,
              head_dim=config.head_dim, causal=config.causal)


def standard_grid(config) -> list[Cell]:
  """The standard grid of BENCH.md: B*S = `grid_tokens`, H*D =
  `grid_hidden`, S in `grid_lengths`, D in `grid_head_dims`, causal and not;
  plus grouped-query (H=32, Hkv=8, D=128, causal) and packed documents at
  each length of `grid_extra_lengths`."""
  cells = []
  for head_dim in config.grid_head_dims:
    for seq_len in config.grid_lengths:
      for causal in (False, True):
        cells.append(Cell(config.grid_tokens // seq_len, seq_len,
                          config.grid_hidden // head_dim,
                          config.grid_hidden // head_dim, head_dim, causal))
  for seq_len in config.grid_extra_lengths:
    batch = max(config.grid_tokens // seq_len, 1)
    cells.append(Cell(batch, seq_len, 32, 8, 128, True))
    heads = max(config.grid_hidden // 128, 1)
    cells.append(Cell(batch, seq_len, heads, heads, 128, True, packed=True))
  return cells


def packed_segment_ids(batch: int, seq_len: int, seed: int) -> np.ndarray:
  """`[B, S]` int32 ids of documents of random lengths in [64, 2048]."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, seq_len), np.int32)
  for row in ids:
    start, doc = 0, 0
    while start < seq_len:
      length = int(rng.integers(64, 2049))
      row[start:start + length] = doc
      start, doc = start + length, doc + 1
  return ids


def attention_flops(batch, heads, q_len, kv_len, head_dim, causal) -> float:
  """Forward FLOPs, 4 B H Sq Sk D, halved for causal (BENCH.md)."""
  flops = 4.0 * batch * heads * q_len * kv_len * head_dim
  return flops / 2 if causal else flops


def _available_bytes() -> int | None:
  device = jax.devices()[0]
  if device.platform == "cpu":
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
      return None
  stats = device.memory_stats() or {}
  return stats.get("bytes_limit")


def _random_inputs(config, cell: Cell, sharding):
  """q, k, v, the checking and the timing cotangents, made on the devices."""
  b, h, d, hkv = cell.batch, cell.num_heads, cell.head_dim, cell.num_kv_heads
  seq_len = cell.seq_len
  rows = min(config.check_rows, seq_len)
  keys = jax.random.split(jax.random.PRNGKey(config.seed), 5)
  jit = functools.partial(jax.jit, static_argnums=(1, 2))
  if sharding is not None:
    jit = functools.partial(jit, out_shardings=sharding)
  normal = jit(lambda key, shape, dtype: jax.random.normal(key, shape, dtype))

  @functools.partial(jax.jit, out_shardings=sharding) if sharding else jax.jit
  def check_cotangent(key):
    zeros = jnp.zeros((b, seq_len, h, d), jnp.float32)
    return zeros.at[:, -rows:].set(jax.random.normal(key, (b, rows, h, d)))

  q = normal(keys[0], (b, seq_len, h, d), np.dtype(config.dtype))
  k = normal(keys[1], (b, seq_len, hkv, d), np.dtype(config.dtype))
  v = normal(keys[2], (b, seq_len, hkv, d), np.dtype(config.dtype))
  ct_time = normal(keys[4], (b, seq_len, h, d), np.dtype(np.float32))
  return q, k, v, check_cotangent(keys[3]), ct_time, rows


def benchmark_one(name: str, config, cell: Cell | int, *, mesh=None,
                  options=None, label: str | None = None,
                  repeats: int | None = None) -> BenchmarkRow:
  """Checks, then times one mechanism on one cell.

  Args:
    name: mechanism, or `"cudnn_dense_mask"`: the cuDNN baseline given the
      dense mask equivalent to the cell's structure (packed documents).
    config: the benchmark config (dtype, check rows, repeats, ...).
    cell: the problem, or a sequence length (sizes from `config`).
    mesh: run on this mesh (inputs sharded over its `sp` axis).
    options: extra module options (e.g. `layout`).
    label: the row's name (default `name`).
    repeats: timed calls (default `config.repeats`).
  """
  if isinstance(cell, int):
    cell = config_cell(config, cell)
  try:
    return _benchmark_one(name, config, cell, mesh, options, label,
                          repeats or config.repeats)
  except Exception as e:  # pylint: disable=broad-except
    return BenchmarkRow(mechanism=label or name, sequence_length=cell.seq_len,
                        cell=cell.name,
                        status=f"error: {type(e).__name__}: {str(e)[:300]}",
                        devices=1 if mesh is None else mesh.size)


def _forward_fn(name, config, cell: Cell, mesh, options, segment_ids,
                served):
  """The forward function `(q, k, v) -> out` of a row."""
  h, d, hkv = cell.num_heads, cell.head_dim, cell.num_kv_heads
  if name == "cudnn_dense_mask":
    mask = None
    if segment_ids is not None:
      mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if cell.causal:
      causal = np.tril(np.ones((cell.seq_len,) * 2, bool))[None, None]
      mask = causal if mask is None else mask & causal
    served.append("cudnn")
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None else jnp.asarray(mask),
        scale=d**-0.5, implementation="cudnn")

  def forward(q, k, v):
    attention = registry.create_attention(
        name, num_heads=h, head_dim=d, num_kv_heads=hkv,
        logits_soft_cap=config.logits_soft_cap, mesh=mesh,
        **(options or {}))
    out = attention(q, k, v, causal=cell.causal,
                    segment_ids=segment_ids).attention_outputs
    served.append(attention.selected_mechanism)
    return out

  apply = hk.without_apply_rng(hk.transform(forward)).apply
  return lambda q, k, v: apply({}, q, k, v)


def _benchmark_one(name, config, cell, mesh, options, label, repeats):
  row = BenchmarkRow(mechanism=label or name, sequence_length=cell.seq_len,
                     status="ok", devices=1 if mesh is None else mesh.size,
                     cell=cell.name)
  seq_len, d = cell.seq_len, cell.head_dim
  sharding = None
  if mesh is not None:
    sharding = NamedSharding(mesh, P(None, "sp", None, None))
  q, k, v, ct_check, ct_time, rows = _random_inputs(config, cell, sharding)
  segment_ids = None
  if cell.packed:
    segment_ids = packed_segment_ids(cell.batch, seq_len, config.seed)
  served = []
  fwd = _forward_fn(name, config, cell, mesh, options, segment_ids, served)

  def fwd_bwd(q, k, v, ct):
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32) * ct)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  try:
    compiled_fwd = timing.compile_fn(fwd, q, k, v)
    compiled = timing.compile_fn(fwd_bwd, q, k, v, ct_time)
  except NotImplementedError as e:
    row.status = f"unsupported: {e}"
    return row
  row.served_by = served[-1] if served else None
  row.compile_seconds = compiled.compile_seconds
  row.temp_bytes = compiled.temp_bytes
  available = _available_bytes()
  if (available and compiled.total_bytes and
      compiled.total_bytes > config.memory_fraction * available):
    row.status = (f"skipped: needs {compiled.total_bytes / 2**30:.1f} GiB, "
                  f"the device has {available / 2**30:.1f} GiB")
    return row

  # Check against the reference on the last `rows` queries.
  def reference(q_rows, k, v):
    ids = None
    if segment_ids is not None:
      ids = (jnp.asarray(segment_ids[:, -rows:]), jnp.asarray(segment_ids))
    inputs = canonicalize(q_rows, k, v, causal=cell.causal, segment_ids=ids)
    return reference_attention(
        inputs.query, inputs.key, inputs.value, None, inputs.visibility,
        sm_scale=d**-0.5, softcap=config.logits_soft_cap).out

  one = jax.devices()[0]
  f32 = lambda x: jax.device_put(x, one).astype(jnp.float32)
  ct_rows = f32(ct_check[:, -rows:])
  ref_loss = lambda q_rows, k, v: jnp.sum(reference(q_rows, k, v) * ct_rows)
  ref_out = jax.jit(reference)(f32(q[:, -rows:]), f32(k), f32(v))
  ref_grads = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(
      f32(q[:, -rows:]), f32(k), f32(v))
  out = compiled_fwd.fn(q, k, v)
  dq, dk, dv = compiled.fn(q, k, v, ct_check)
  row.out_error = relative_error(out[:, -rows:], ref_out)
  row.grad_error = max(relative_error(dq[:, -rows:], ref_grads[0]),
                       relative_error(dk, ref_grads[1]),
                       relative_error(dv, ref_grads[2]))
  worst = max(row.out_error, row.grad_error)
  if not np.isfinite(worst) or worst > TOLERANCE[np.dtype(config.dtype).name]:
    row.status = f"error: differs from the reference ({worst:.1e}); not timed"
    return row
  row.forward_ms = 1e3 * timing.median_seconds(compiled_fwd.fn, q, k, v,
                                               repeats=repeats)
  row.forward_backward_ms = 1e3 * timing.median_seconds(
      compiled.fn, q, k, v, ct_time, repeats=repeats)
  flops = attention_flops(cell.batch, cell.num_heads, seq_len, seq_len, d,
                          cell.causal)
  row.forward_tflops = flops / (row.forward_ms * 1e-3) / 1e12
  row.forward_backward_tflops = (3.5 * flops /
                                 (row.forward_backward_ms * 1e-3) / 1e12)
  row.peak_bytes = timing.peak_device_bytes()
  return row


def table(rows: list[BenchmarkRow]) -> str:
  """A fixed-width text table."""
  fmt = lambda x, f: "-" if x is None else f.format(x)
  header = ("mechanism", "cell", "status", "out err", "grad err", "fwd ms",
            "fwd+bwd ms", "TFLOP/s", "x single", "temp MiB")
  lines = [header] + [
      (r.mechanism, r.cell or str(r.sequence_length),
       r.status if len(r.status) < 50 else r.status[:47] + "...",
       fmt(r.out_error, "{:.1e}"), fmt(r.grad_error, "{:.1e}"),
       fmt(r.forward_ms, "{:.1f}"), fmt(r.forward_backward_ms, "{:.1f}"),
       fmt(r.forward_backward_tflops, "{:.3f}"),
       fmt(r.fraction_of_single_device, "{:.2f}"),
       fmt(None if r.temp_bytes is None else r.temp_bytes / 2**20, "{:.1f}"))
      for r in rows]
  return format_table(lines)


def run_context_parallel(config) -> list[BenchmarkRow]:
  """Ring attention across devices vs its block kernel on one device.

  For each per-device length `s` of `config.local_lengths`: the block
  kernel (`config.block_mechanism`) on one device at `s`, then `ring` over
  `n` devices at `n * s` for each of `config.layouts`, reporting each ring
  row's per-device throughput as a fraction of the single-device one. Then
  `ring` (zigzag) at each of `config.longest_lengths` until one fails.
  """
  n = jax.device_count() if config.num_devices == -1 else config.num_devices
  mesh = make_mesh((1, 1, 1, n), devices=jax.devices()[:n])
  rows = []
  for local in config.local_lengths:
    single = benchmark_one(config.block_mechanism, config, local,
                           label=f"{config.block_mechanism} x1")
    _log_row(single)
    rows.append(single)
    for layout in config.layouts:
      row = benchmark_one("ring", config, n * local, mesh=mesh,
                          options={"layout": layout},
                          label=f"ring {layout} x{n}")
      if row.forward_backward_tflops and single.forward_backward_tflops:
        row.fraction_of_single_device = (
            row.forward_backward_tflops / n / single.forward_backward_tflops)
      _log_row(row)
      rows.append(row)
  for length in config.longest_lengths:
    row = benchmark_one("ring", config, length, mesh=mesh,
                        options={"layout": "zigzag"},
                        label=f"ring zigzag x{n} (longest)", repeats=1)
    _log_row(row)
    rows.append(row)
    if row.status != "ok":
      break
  return rows


def _log_row(row: BenchmarkRow):
  logging.info("%s at S = %d: %s", row.mechanism, row.sequence_length, row)


def _write(config, rows) -> str:
  """Writes the rows so far as JSON; returns the path."""
  device = jax.devices()[0]
  os.makedirs(config.output_dir, exist_ok=True)
  slug = re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-")
  name = config.output_name.format(device=slug, count=jax.device_count())
  path = os.path.join(config.output_dir, name + ".json")
  environment: dict[str, Any] = dict(
      device_kind=device.device_kind, backend=jax.default_backend(),
      device_count=jax.device_count(), jax_version=jax.__version__,
      python=platform.python_version(), cpu_count=os.cpu_count(),
      machine=platform.machine())
  with open(path, "w") as f:
    json.dump(dict(environment=environment, config=config.to_dict(),
                   rows=[dataclasses.asdict(r) for r in rows]), f, indent=2,
              default=str)
  return path


def run_benchmark(config) -> list[BenchmarkRow]:
  """Runs `config` (see configs/benchmark.py); writes JSON; returns rows."""
  names = [n.strip() for n in config.mechanisms.split(",") if n.strip()]
  names = names or list(registry.available_mechanisms())
  device = jax.devices()[0]
  logging.info("Benchmark on %s (%s), jax %s", device.device_kind,
               jax.default_backend(), jax.__version__)
  rows = []
  if config.get("context_parallel"):
    rows = run_context_parallel(config)
  cells = [config_cell(config, s) for s in config.sequence_lengths]
  if config.get("standard_grid"):
    cells = standard_grid(config)
  baselines = [n.strip() for n in config.get("packed_baselines", "").split(",")
               if n.strip()]  # Only for packed documents.
  for i, cell in enumerate(cells):
    logging.info("Cell %d/%d: %s", i + 1, len(cells), cell)
    for name in names + (baselines if cell.packed else []):
      row = benchmark_one(name, config, cell)
      _log_row(row)
      rows.append(row)
      _write(config, rows)  # After every row: a cut-short run keeps them.
  logging.info("Results:\n%s", table(rows))
  path = _write(config, rows)
  logging.info("Wrote %s", path)
  return rows
