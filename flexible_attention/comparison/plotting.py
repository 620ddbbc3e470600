"""Optional plots: matplotlib when it is installed, a log line otherwise."""

from __future__ import annotations

from absl import logging


def pyplot():
  """`matplotlib.pyplot` on the Agg backend, or None (logged) without it."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.info("matplotlib is not installed: no plot.")
    return None
  return plt


def save(plt, fig, path: str):
  """Writes `fig` to `path` and closes it."""
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  logging.info("Wrote %s", path)
