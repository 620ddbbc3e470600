"""Compiling, timing and memory readings: the one timing loop of the project.

Every figure the comparison and benchmark scripts report comes from here:
compile once (timed separately), warm up, then time `repeats` calls, each
waited for with `block_until_ready`, and report the median.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax


@dataclasses.dataclass(frozen=True)
class Compiled:
  """A compiled function with what compiling it told us."""

  fn: Any
  compile_seconds: float
  temp_bytes: int | None
  total_bytes: int | None


def compile_fn(fn: Callable, *args) -> Compiled:
  """`jax.jit(fn)` lowered and compiled for `args`, timed."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - start
  temp = total = None
  try:
    analysis = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    analysis = None
  if analysis is not None:
    temp = int(analysis.temp_size_in_bytes)
    total = int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes +
                analysis.output_size_in_bytes)
  return Compiled(compiled, seconds, temp, total)


def median_seconds(fn: Callable, *args, repeats: int = 20,
                   warmup: int = 2) -> float:
  """Median wall time of `fn(*args)`, each call waited for on the device."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def peak_device_bytes(device: jax.Device | None = None) -> int | None:
  """The device's peak bytes in use so far, where the backend reports it."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except (NotImplementedError, RuntimeError):
    return None
  if not stats:
    return None
  return stats.get("peak_bytes_in_use")
