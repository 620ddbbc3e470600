"""Runs the test suite on every core: pytest processes over the test files.

Most tests compile one XLA program after another, which keeps one core
busy, so `python -m pytest -q tests` leaves the other cores of a CI machine
idle. This runs the same files with the same `conftest.py` (each process
gets its 8 virtual CPU devices), `--workers` processes at a time (default:
the CPUs this process may run on, at most `MAX_WORKERS`: each process holds
a few GiB).

The processes start longest first, so that the last ones to start are
short, by each file's seconds in `suite_durations.json` under the
installed jaxlib's version (as `--record` measured them, one process per
file; a file it does not list counts as the longest, and without a record
for the version a file's size ranks it, nothing packed). Each process pays
2-4 s to start Python and import JAX and the project before its first
test, so the files that take under `SMALL_SECONDS` share processes of at
most `PACK_SECONDS` (first fit, longest first). The record only orders and
packs the files: a stale one makes the suite slower, never skips a test.

Arguments after the options go to every pytest process (`-k dropout`,
`-x`). Each process's summary line is printed as it finishes, its whole
output too if it failed; the exit status is the worst process's (one
whose tests `-k` deselects entirely counts as passed).

  python tests/run_suite.py [--workers N] [--record] [pytest arguments...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys
import time

TESTS = pathlib.Path(__file__).resolve().parent
DURATIONS = TESTS / "suite_durations.json"
NO_TESTS_COLLECTED = 5  # pytest's exit status when `-k` deselects a file.
MAX_WORKERS = 4
SMALL_SECONDS = 50.0
PACK_SECONDS = 100.0


def _run(paths: list[pathlib.Path], pytest_args: list[str]):
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       *map(str, paths), *pytest_args],
      cwd=TESTS.parent, capture_output=True, text=True, check=False)
  return paths, result, time.monotonic() - start


def _summary(output: str) -> str:
  lines = [line for line in output.splitlines() if line.strip()]
  return lines[-1].strip("= ") if lines else "(no output)"


def jax_version() -> str:
  """The installed jaxlib's "major.minor", the key of its record (jax 0.11
  runs the Mosaic GPU kernels in its interpreter, so its files take other
  times), read without importing jax."""
  return ".".join(importlib.metadata.version("jaxlib").split(".")[:2])


def plan(files: list[pathlib.Path], seconds: dict[str, float],
         pack: bool = True) -> list[list[pathlib.Path]]:
  """The pytest processes to run, longest first: lists of files.

  `seconds`: recorded seconds per file name; a file it lacks counts as the
  longest (with an empty record, files rank by size). With `pack`, the
  files under `SMALL_SECONDS` share processes of at most `PACK_SECONDS`.
  """
  if seconds:
    longest = max(seconds.values()) + 1.0
    cost = {f: seconds.get(f.name, longest) for f in files}
  else:  # Sizes rank the files; nothing is packed.
    cost = {f: float(f.stat().st_size) for f in files}
    pack = False
  runs: list[list[pathlib.Path]] = []
  packs: list[list[pathlib.Path]] = []
  for f in sorted(files, key=lambda f: (-cost[f], f.name)):
    if not pack or cost[f] >= SMALL_SECONDS:
      runs.append([f])
      continue
    fit = next((p for p in packs
                if sum(cost[g] for g in p) + cost[f] <= PACK_SECONDS), None)
    if fit is None:
      packs.append([f])
    else:
      fit.append(f)
  return sorted(runs + packs, key=lambda run: -sum(cost[f] for f in run))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, default=min(
      len(os.sched_getaffinity(0)), MAX_WORKERS))
  parser.add_argument("--record", action="store_true", help=(
      f"One process per file; write each file's seconds to {DURATIONS.name}."))
  args, pytest_args = parser.parse_known_args()
  if args.record and pytest_args:
    parser.error("--record times the whole suite; it takes no pytest "
                 f"arguments (got {' '.join(pytest_args)})")
  records = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
  seconds = records.get(jax_version(), {})
  runs = plan(sorted(TESTS.glob("test_*.py")), seconds,
              pack=not args.record)
  counts, status, start, measured = {}, 0, time.monotonic(), {}
  with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
    futures = [pool.submit(_run, paths, pytest_args) for paths in runs]
    for future in concurrent.futures.as_completed(futures):
      paths, result, took = future.result()
      code = 0 if result.returncode == NO_TESTS_COLLECTED else (
          result.returncode)
      summary = _summary(result.stdout + result.stderr)
      names = " ".join(str(p.relative_to(TESTS.parent)) for p in paths)
      print(f"{names}: {summary} ({took:.0f} s)", flush=True)
      if code:
        print(result.stdout + result.stderr, flush=True)
      status = max(status, code)
      for number, word in re.findall(r"(\d+) (passed|failed|skipped|error)",
                                     summary):
        counts[word] = counts.get(word, 0) + int(number)
      if len(paths) == 1:
        measured[paths[0].name] = round(took, 1)
  total = ", ".join(f"{n} {word}" for word, n in sorted(counts.items())
                    ) or "no tests ran"
  print(f"{total} in {time.monotonic() - start:.0f} s over {args.workers} "
        f"workers, {len(runs)} processes", flush=True)
  if args.record:
    records[jax_version()] = dict(sorted(measured.items()))
    DURATIONS.write_text(json.dumps(records, indent=1) + "\n")
  return status


if __name__ == "__main__":
  sys.exit(main())
