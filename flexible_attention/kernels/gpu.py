"""What the kernels need to know about the GPU they run on."""

from __future__ import annotations

import contextlib

import jax


def compute_capability() -> float | None:
  """The default GPU's compute capability (9.0 for Hopper), or None when
  there is no GPU."""
  try:
    return float(jax.devices("gpu")[0].compute_capability)
  except (RuntimeError, AttributeError, ValueError):
    return None


def core_count() -> int | None:
  """The default GPU's multiprocessors (132 on an H100 SXM or H200), or
  None when there is no GPU."""
  try:
    return int(jax.devices("gpu")[0].core_count)
  except (RuntimeError, AttributeError, TypeError, ValueError):
    return None


def lowering_target(device_kind: str = "NVIDIA H100"):
  """A context in which `jax.jit(f).trace(...).lower(lowering_platforms=
  ("cuda",))` lowers for a GPU of `device_kind` on a machine without one:
  Mosaic GPU reads the GPU from an abstract mesh's device (jax >= 0.11;
  earlier versions need none). A no-op where a GPU is attached."""
  device = getattr(jax.sharding, "AbstractDevice", None)
  if device is None or jax.default_backend() == "gpu":
    return contextlib.nullcontext()
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device(
      device_kind=device_kind, num_cores=None, platform="gpu"))
  return jax.sharding.use_abstract_mesh(mesh)
