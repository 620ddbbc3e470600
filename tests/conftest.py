"""Test configuration: 8 virtual CPU devices and fast CPU compiles, set
before JAX is imported.

On CPU, compiling dominates the suite's time, and XLA's MLIR fusion
emitters are its slowest part. The suite compiles CPU programs with the
legacy fusion emitters (jaxlib 0.10; 0.11 has only the new ones), in
one codegen module, and (when JAX can only run
on the CPU here) at backend optimisation level 0: the battery's vanilla
cases compile in 2.6 s instead of 18 s, flash's (interpreted) in 32 s
instead of 92 s. These flags change how XLA generates machine code, never
what it computes: every comparison keeps its tolerance. The compiled memory
sizes that tests read (`memory_analysis()`) come from XLA's buffer
assignment: vanilla's S = 8192 temporaries are byte-identical with or
without them, blockwise's 23 MB instead of 40 MB, both three orders of
magnitude below vanilla's 5.4 GB, so test_blockwise_memory's 10x pin still
means what it says. Subprocesses started by the tests inherit the flags.
GPU and TPU programs keep XLA's default optimisation level.

Python's cyclic garbage collector runs its young generations less often
than by default (`gc.set_threshold` below): the suite holds hundreds of
thousands of live objects (JAX's caches of traced and compiled programs),
which each full collection walks again; with the default thresholds
(700, 10, 10) collecting took about 5% of the suite's time, with these
about 1%, and the suite's memory peak (2.9 GB) is unchanged.
"""

import gc
import importlib.metadata
import importlib.util
import os

_FLAGS = ["--xla_force_host_platform_device_count=8",
          "--xla_cpu_parallel_codegen_split_count=1"]


def _jaxlib_version() -> tuple[int, ...]:
  """jaxlib's version, read without importing jax (flags come first)."""
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ()
  return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


# XLA in jaxlib 0.11 has only the fusion emitters: it rejects the flag (an
# unknown XLA flag aborts the process).
if (0, 10) <= _jaxlib_version() < (0, 11):
  _FLAGS.append("--xla_cpu_use_fusion_emitters=false")


def _cpu_only() -> bool:
  """Whether JAX can only run on the CPU here (no accelerator plugin)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms == "cpu"
  return not any(importlib.util.find_spec(name) for name in (
      "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
      "jax_rocm7_plugin", "libtpu"))


if _cpu_only():
  _FLAGS.append("--xla_backend_optimization_level=0")

os.environ.setdefault("XLA_FLAGS", "")
for _flag in _FLAGS:
  if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _flag

gc.set_threshold(10_000, 20, 20)
