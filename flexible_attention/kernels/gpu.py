"""What the kernels need to know about the GPU they run on."""

from __future__ import annotations

import jax


def compute_capability() -> float | None:
  """The default GPU's compute capability (9.0 for Hopper), or None when
  there is no GPU."""
  try:
    return float(jax.devices("gpu")[0].compute_capability)
  except (RuntimeError, AttributeError, ValueError):
    return None
