"""Compiling, timing and memory readings: the one timing loop of the project.

Every figure the comparison and benchmark scripts report, and every timing
`auto`'s autotuning (`mechanisms/tuning.py`) makes, comes from here: compile
once (timed separately), warm up, then take `repeats` samples of
back-to-back calls waited for with `block_until_ready` (round-robin over
the programs compared, in a fresh order each round), and report the median
time of one call.

It also reads a `jax.profiler` trace's device kernels back
(`device_kernel_times`; `traced_kernel_times` traces a program's calls and
reads them: where its device time goes, for the benchmarks' profiles).

A leaf module: it imports only the standard library and JAX, so that both
`mechanisms/` and `comparison/` import it downward.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import random
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

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
                   warmup: int = 2, min_sample_seconds: float = 1e-2) -> float:
  """Median device time of one `fn(*args)` call (see `median_seconds_each`)."""
  return median_seconds_each([(fn, args)], repeats=repeats, warmup=warmup,
                             min_sample_seconds=min_sample_seconds)[0]


def median_seconds_each(calls: Sequence[tuple[Callable, tuple[Any, ...]]], *,
                        repeats: int = 20, warmup: int = 2,
                        min_sample_seconds: float = 1e-2,
                        seed: int = 0) -> list[float]:
  """Median device time of one call of each `(fn, args)` of `calls`.

  A sample of `fn` dispatches `n` calls back to back and waits for the last
  (a device runs one program after another, so the last done means all
  done), then divides by `n`, with `n` chosen per function so a sample lasts
  at least `min_sample_seconds`. Short programs are then timed by the
  device's throughput, not by the host's dispatch and wait (tens to hundreds
  of microseconds a call), which would otherwise dominate sub-millisecond
  cells; a program longer than `min_sample_seconds` is timed one call at a
  time.

  The `repeats` samples of the functions are taken round-robin (one sample
  of each, `repeats` times), so slow drifts of the device (clocks,
  temperature, other tenants) fall on every function alike and the ratios
  between them stay fair. Each round visits the functions in a fresh order
  (shuffled with `seed`), so that no function always runs right after the
  same other one (with a fixed order and 2 ms samples, one program came out
  up to 14% apart from an identical one on an H200: what ran just before,
  its clocks, power draw and what it left in L2, is the suspect;
  benchmarks/BENCHMARKS.md).

  Returns:
    Seconds per call, one per entry of `calls`.
  """
  batch = []
  for fn, args in calls:
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    single = time.perf_counter() - start
    batch.append(max(1, math.ceil(min_sample_seconds / max(single, 1e-9))))
  samples = [[] for _ in calls]
  order = list(range(len(calls)))
  shuffle = random.Random(seed).shuffle
  for _ in range(repeats):
    shuffle(order)
    for i in order:
      (fn, args), n, times = calls[i], batch[i], samples[i]
      start = time.perf_counter()
      for _ in range(n - 1):
        fn(*args)
      jax.block_until_ready(fn(*args))
      times.append((time.perf_counter() - start) / n)
  return [statistics.median(times) for times in samples]


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


def traced_kernel_times(fn: Callable[[], Any], calls: int
                        ) -> dict[tuple[str, str], list[float]]:
  """`device_kernel_times` of `calls` calls of `fn()` (after one untraced
  call, its warm-up), each waited for at the end."""
  jax.block_until_ready(fn())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(calls):
        out = fn()
      jax.block_until_ready(out)
    return device_kernel_times(trace_dir)


def device_kernel_times(trace_dir: str) -> dict[tuple[str, str], list[float]]:
  """The device's events of a `jax.profiler.trace(trace_dir,
  create_perfetto_trace=True)`: `{(thread, name): [durations in µs]}`, the
  threads being a device's lines (XLA's ops, a stream's kernels), the
  host's left out (empty on a CPU, whose work is the host's)."""
  path, = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                    recursive=True)
  with gzip.open(path, "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e["args"]["name"]
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  device = {pid for pid, name in processes.items()
            if "/device:" in name and "CPU" not in name.upper()}
  out = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device:
      thread = threads.get((e["pid"], e.get("tid")), str(e.get("tid")))
      out[(thread, e["name"])].append(float(e.get("dur", 0.0)))
  return dict(out)
