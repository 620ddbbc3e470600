"""What `auto` knows from measurements: a shipped table and autotuning.

- `measured_winner(request)`: the winner recorded for the call's cell in
  `measured_winners.json` (shipped with the package, filled from the
  benchmark results in `benchmarks/results/`), or `None`. A GPU entry
  holds for the XLA mode it was measured in (`xla_deterministic_ops()`;
  the entry's `deterministic_ops`, false when absent).
- `xla_deterministic_ops()`: whether `XLA_FLAGS` asks XLA for
  deterministic GPU ops, under which cuDNN's attention backward runs its
  slower deterministic algorithm.
- `autotune(request, config)`: times every mechanism that accepts the call on
  random inputs of the call's exact shapes, structure and mesh (forward +
  backward, compiled, median of `AUTOTUNE_REPEATS`), and caches the winner on
  disk, in a JSON file keyed by device kind, jax version and the call
  (`FLEXIBLE_ATTENTION_AUTOTUNE_CACHE`, default
  `~/.cache/flexible_attention/autotune.json`).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flexible_attention import timing
from flexible_attention.mechanisms import registry

AUTOTUNE_REPEATS = 5
_TABLE = os.path.join(os.path.dirname(__file__), "measured_winners.json")
_STRUCTURAL = frozenset({"causal"})


@functools.cache
def _entries() -> tuple[dict[str, Any], ...]:
  with open(_TABLE) as f:
    return tuple(json.load(f)["entries"])


def _device_kind(platform: str) -> str | None:
  try:
    return jax.devices(platform)[0].device_kind
  except RuntimeError:
    return None


# XLA's options that make its GPU ops deterministic, cuDNN's attention
# backward included (either one suffices).
DETERMINISTIC_OPS_FLAGS = ("xla_gpu_deterministic_ops",
                           "xla_gpu_exclude_nondeterministic_ops")


def xla_deterministic_ops() -> bool:
  """Whether `XLA_FLAGS` turns on XLA's deterministic GPU ops.

  True when `--xla_gpu_deterministic_ops` or
  `--xla_gpu_exclude_nondeterministic_ops` is given bare or with a true
  value (the last occurrence of each counts, as XLA reads them). XLA then
  compiles cuDNN's attention backward with its deterministic algorithm,
  which `benchmarks/BENCHMARKS.md` measured slower than `flash`'s (whose
  sums have a fixed order in any mode) in 16 of 18 cells on an H100.
  Options given to one compilation (`.compile(compiler_options=...)`) do
  not show here.
  """
  values = {}
  for flag in os.environ.get("XLA_FLAGS", "").split():
    name, has_value, value = flag.lstrip("-").partition("=")
    if name in DETERMINISTIC_OPS_FLAGS:
      values[name] = not has_value or value.lower() in ("true", "1")
  return any(values.values())


def _deterministic_mode(request: registry.AttentionRequest) -> bool:
  """The XLA mode a GPU measurement of `request` holds for (off a GPU
  there is one mode: False)."""
  return request.platform == "gpu" and xla_deterministic_ops()


def measured_winner(request: registry.AttentionRequest) -> str | None:
  """The measured winner of the request's cell, or `None`."""
  dims = request.dims
  extra = sorted(request.features - _STRUCTURAL)
  deterministic = _deterministic_mode(request)
  for entry in _entries():
    if (entry["platform"] != request.platform or
        entry.get("deterministic_ops", False) != deterministic or
        entry["dtype"] != request.dtype or
        entry["head_dim"] != dims.head_dim or
        entry["causal"] != ("causal" in request.features) or
        sorted(entry["features"]) != extra or
        not entry["seq_range"][0] <= dims.q_len <= entry["seq_range"][1]):
      continue
    kind = entry.get("device_kind")
    if kind is not None and kind != _device_kind(request.platform):
      continue
    return entry["winner"]
  return None


def default_cache_path() -> str:
  return os.environ.get(
      "FLEXIBLE_ATTENTION_AUTOTUNE_CACHE",
      os.path.join(os.path.expanduser("~"), ".cache", "flexible_attention",
                   "autotune.json"))


def cache_key(request: registry.AttentionRequest, config) -> str:
  """The cache key: device kind, jax version, XLA's deterministic GPU ops
  (on a GPU), the call and the mesh."""
  mesh = None if config.mesh is None else dict(config.mesh.shape)
  deterministic = _deterministic_mode(request)
  return json.dumps(dict(
      device_kind=_device_kind(request.platform), jax=jax.__version__,
      deterministic_ops=deterministic,
      platform=request.platform, dims=list(vars(request.dims).values()),
      dtype=request.dtype, features=sorted(request.features),
      window=request.window, mesh=mesh,
      blocks=list(request.block_size_fields)), sort_keys=True)


def _synthetic_call(request, rng):
  """Call arguments with the request's structure, on random data."""
  dims, features = request.dims, request.features
  call: dict[str, Any] = {"causal": "causal" in features}
  if "segments" in features:
    ids = np.sort(rng.integers(0, 4, (dims.batch, dims.kv_len)), axis=1)
    call["segment_ids"] = (jnp.asarray(ids[:, -dims.q_len:], jnp.int32),
                           jnp.asarray(ids, jnp.int32))
  if features & {"kv_lengths", "cache"}:
    call["kv_lengths"] = jnp.full((dims.batch,), dims.kv_len, jnp.int32)
  if features & {"positions", "cache"}:
    call["q_positions"] = jnp.broadcast_to(
        jnp.arange(dims.q_len) + dims.kv_len - dims.q_len,
        (dims.batch, dims.q_len))
  if "mask" in features:
    call["mask"] = jnp.ones((1, 1, dims.q_len, dims.kv_len), bool)
  if "bias" in features:
    call["bias"] = jnp.zeros((1, 1, dims.q_len, dims.kv_len), jnp.float32)
  call["deterministic"] = "dropout" not in features
  call["return_weights"] = "weights" in features
  return call


def _time_candidate(name, request, config, call, inputs) -> float:
  options = {f: getattr(config, f) for f in (
      "value_dim", "sm_scale", "dropout_rate", "logits_soft_cap",
      "sliding_window", "dtype", "precision", "block_sizes", "mesh",
      "partition_axis")}
  dims = request.dims

  def forward(q, k, v):
    attention = registry.create_attention(
        name, num_heads=dims.num_heads, head_dim=dims.head_dim,
        num_kv_heads=dims.num_kv_heads, **options)
    return attention(q, k, v, **call).attention_outputs

  apply = hk.transform(forward).apply
  rng = jax.random.PRNGKey(0)
  loss = lambda q, k, v: jnp.sum(apply({}, rng, q, k, v).astype(jnp.float32))
  compiled = timing.compile_fn(jax.grad(loss, argnums=(0, 1, 2)), *inputs)
  return timing.median_seconds(compiled.fn, *inputs, repeats=AUTOTUNE_REPEATS)


def autotune(request: registry.AttentionRequest, config, candidates,
             cache_path: str | None = None) -> str:
  """The fastest of `candidates` that accept `request`, cached on disk."""
  path = cache_path or default_cache_path()
  key = cache_key(request, config)
  cache = {}
  if os.path.exists(path):
    with open(path) as f:
      cache = json.load(f)
  if key in cache:
    return cache[key]["winner"]
  rng = np.random.default_rng(0)
  dims = request.dims
  dtype = np.dtype(request.dtype)
  inputs = tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in (
      (dims.batch, dims.q_len, dims.num_heads, dims.head_dim),
      (dims.batch, dims.kv_len, dims.num_kv_heads, dims.head_dim),
      (dims.batch, dims.kv_len, dims.num_kv_heads, dims.value_dim)))
  call = _synthetic_call(request, rng)
  seconds, reasons = {}, []
  for name in candidates:
    reason = registry.refusal_reason(name, request)
    if reason is not None:
      reasons.append(reason)
      continue
    try:
      seconds[name] = _time_candidate(name, request, config, call, inputs)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("autotune: %s failed (%s); not a candidate.", name, e)
      reasons.append(f"{name} failed when timed: {type(e).__name__}: {e}")
  if not seconds:
    raise NotImplementedError("auto: no mechanism accepts this call: " +
                              "; ".join(reasons))
  winner = min(seconds, key=seconds.get)
  logging.info("autotune: %s wins (%s).", winner, seconds)
  cache[key] = dict(winner=winner, seconds=seconds)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(cache, f, indent=1, sort_keys=True)
  return winner
