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
import json
import os
import platform
from typing import Any

from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flexible_attention.comparison import timing
from flexible_attention.comparison.compare import TOLERANCE
from flexible_attention.comparison.compare import format_table
from flexible_attention.comparison.compare import relative_error
from flexible_attention.core.inputs import canonicalize
from flexible_attention.core.reference import reference_attention
from flexible_attention.mechanisms import registry


@dataclasses.dataclass
class BenchmarkRow:
  """One (mechanism, sequence length) measurement."""

  mechanism: str
  sequence_length: int
  status: str
  served_by: str | None = None
  out_error: float | None = None
  grad_error: float | None = None
  compile_seconds: float | None = None
  forward_ms: float | None = None
  forward_backward_ms: float | None = None
  forward_backward_tflops: float | None = None
  temp_bytes: int | None = None
  peak_bytes: int | None = None


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


def benchmark_one(name: str, config, seq_len: int) -> BenchmarkRow:
  """Checks, then times one mechanism at one sequence length."""
  row = BenchmarkRow(mechanism=name, sequence_length=seq_len, status="ok")
  b, h, d = config.batch_size, config.num_heads, config.head_dim
  hkv = config.num_kv_heads or h
  rng = np.random.default_rng(config.seed)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s), config.dtype)
  q, k, v = normal(b, seq_len, h, d), normal(b, seq_len, hkv, d), normal(
      b, seq_len, hkv, d)
  rows = min(config.check_rows, seq_len)
  ct_check = np.zeros((b, seq_len, h, d), np.float32)
  ct_check[:, -rows:] = rng.standard_normal((b, rows, h, d))
  ct_check = jnp.asarray(ct_check)
  ct_time = jnp.asarray(rng.standard_normal((b, seq_len, h, d)), jnp.float32)
  served = []

  def forward(q, k, v):
    attention = registry.create_attention(
        name, num_heads=h, head_dim=d, num_kv_heads=hkv,
        logits_soft_cap=config.logits_soft_cap)
    out = attention(q, k, v, causal=config.causal).attention_outputs
    served.append(attention.selected_mechanism)
    return out

  apply = hk.without_apply_rng(hk.transform(forward)).apply
  fwd = lambda q, k, v: apply({}, q, k, v)

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
    inputs = canonicalize(q_rows, k, v, causal=config.causal)
    return reference_attention(
        inputs.query, inputs.key, inputs.value, None, inputs.visibility,
        sm_scale=d**-0.5, softcap=config.logits_soft_cap).out

  f32 = lambda x: x.astype(jnp.float32)
  ref_loss = lambda q_rows, k, v: jnp.sum(
      reference(q_rows, k, v) * ct_check[:, -rows:])
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
                                               repeats=config.repeats)
  row.forward_backward_ms = 1e3 * timing.median_seconds(
      compiled.fn, q, k, v, ct_time, repeats=config.repeats)
  flops = 3.5 * attention_flops(b, h, seq_len, seq_len, d, config.causal)
  row.forward_backward_tflops = flops / (row.forward_backward_ms * 1e-3) / 1e12
  row.peak_bytes = timing.peak_device_bytes()
  return row


def table(rows: list[BenchmarkRow]) -> str:
  """A fixed-width text table."""
  fmt = lambda x, f: "-" if x is None else f.format(x)
  header = ("mechanism", "S", "status", "out err", "grad err", "fwd ms",
            "fwd+bwd ms", "TFLOP/s", "temp MiB")
  lines = [header] + [
      (r.mechanism, str(r.sequence_length),
       r.status if len(r.status) < 50 else r.status[:47] + "...",
       fmt(r.out_error, "{:.1e}"), fmt(r.grad_error, "{:.1e}"),
       fmt(r.forward_ms, "{:.1f}"), fmt(r.forward_backward_ms, "{:.1f}"),
       fmt(r.forward_backward_tflops, "{:.3f}"),
       fmt(None if r.temp_bytes is None else r.temp_bytes / 2**20, "{:.1f}"))
      for r in rows]
  return format_table(lines)


def run_benchmark(config) -> list[BenchmarkRow]:
  """Runs `config` (see configs/benchmark.py); writes JSON; returns rows."""
  names = [n.strip() for n in config.mechanisms.split(",") if n.strip()]
  names = names or list(registry.available_mechanisms())
  device = jax.devices()[0]
  logging.info("Benchmark on %s (%s), jax %s", device.device_kind,
               jax.default_backend(), jax.__version__)
  rows = []
  for seq_len in config.sequence_lengths:
    for name in names:
      logging.info("%s at S = %d ...", name, seq_len)
      row = benchmark_one(name, config, seq_len)
      logging.info("%s at S = %d: %s", name, seq_len, row)
      rows.append(row)
  logging.info("Results:\n%s", table(rows))
  os.makedirs(config.output_dir, exist_ok=True)
  path = os.path.join(config.output_dir, config.output_name + ".json")
  environment: dict[str, Any] = dict(
      device_kind=device.device_kind, backend=jax.default_backend(),
      jax_version=jax.__version__, python=platform.python_version(),
      cpu_count=os.cpu_count(), machine=platform.machine())
  with open(path, "w") as f:
    json.dump(dict(environment=environment, config=config.to_dict(),
                   rows=[dataclasses.asdict(r) for r in rows]), f, indent=2,
              default=str)
  logging.info("Wrote %s", path)
  return rows
