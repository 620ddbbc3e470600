"""The package's layering, read from its sources (no import is run).

The layers import downward only (`LAYERS`: `core` → `kernels` / `sharding`
/ `timing` → `mechanisms` → `comparison` → `generation` / `modules`), with
`timing` a leaf that both `mechanisms` (autotune) and `comparison` use. Inside `kernels/flash/` the
two backends (Triton: `triton_*`, Mosaic GPU: `mosaic_*`) never import each
other, nor the launch policy or the entry points that sit above them; and a
mechanism never imports another (only `auto` knows the others).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "flexible_attention"
MAX_LINES = 700


def _modules(folder: str = "") -> dict[str, pathlib.Path]:
  """Dotted module name -> path, for the `.py` files under `folder`."""
  root = PACKAGE / folder
  return {
      ".".join(("flexible_attention",) + path.relative_to(PACKAGE).with_suffix(
          "").parts).removesuffix(".__init__"): path
      for path in sorted(root.rglob("*.py"))}


def _imports(path: pathlib.Path) -> set[str]:
  """The project modules `path` imports (`from a import b` counts as both
  `a` and `a.b`, which may be a module)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return {n for n in names if n.startswith("flexible_attention")}


def _under(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + ".")


def test_modules_are_found():
  assert "flexible_attention.kernels.flash.interface" in _modules()
  assert "flexible_attention.mechanisms.base" in _modules("mechanisms")


@pytest.mark.parametrize("name, path", sorted(_modules("mechanisms").items()))
def test_mechanisms_import_neither_comparison_nor_each_other(name, path):
  imported = _imports(path)
  assert not [n for n in imported
              if _under(n, "flexible_attention.comparison")], name
  if name.endswith(".auto"):
    return
  shared = {"flexible_attention.mechanisms",  # As in `from ... import base`.
            "flexible_attention.mechanisms.base",
            "flexible_attention.mechanisms.config",
            "flexible_attention.mechanisms.registry",
            "flexible_attention.mechanisms.tuning"}
  others = {n for n in _modules("mechanisms") if n != name} - shared
  if name == "flexible_attention.mechanisms":  # The package registers all.
    return
  assert not imported & others, (name, sorted(imported & others))


FLASH = "flexible_attention.kernels.flash"


@pytest.mark.parametrize("backend, other", [("triton", "mosaic"),
                                            ("mosaic", "triton")])
def test_flash_backends_import_neither_each_other_nor_the_policy(backend,
                                                                  other):
  above = {f"{FLASH}.launch", f"{FLASH}.interface", FLASH}
  modules = {n: p for n, p in _modules("kernels/flash").items()
             if n.startswith(f"{FLASH}.{backend}_")}
  assert modules, backend
  for name, path in modules.items():
    imported = _imports(path)
    assert not [n for n in imported if n.startswith(f"{FLASH}.{other}_")], (
        name)
    assert not imported & above, (name, sorted(imported & above))


def test_timing_is_a_leaf():
  assert not _imports(PACKAGE / "timing.py")


# The layers, lowest first; a module imports only from its layer and lower
# ones (`timing` is a leaf below `mechanisms`).
LAYERS = (("core",), ("kernels", "sharding", "timing"), ("mechanisms",),
          ("comparison",), ("generation", "modules"))


def _layer(name: str) -> int | None:
  parts = name.split(".")
  if len(parts) < 2:
    return None  # The package itself re-exports every layer.
  return next((i for i, layer in enumerate(LAYERS) if parts[1] in layer),
              None)


@pytest.mark.parametrize("name, path", sorted(_modules().items()))
def test_layers_import_downward(name, path):
  level = _layer(name)
  if level is None:
    return
  upward = [n for n in _imports(path)
            if (_layer(n) or 0) > level]
  assert not upward, (name, upward)


@pytest.mark.parametrize("name, path", sorted(_modules().items()))
def test_no_module_is_longer_than_the_limit(name, path):
  lines = len(path.read_text().splitlines())
  assert lines <= MAX_LINES, f"{name}: {lines} lines (limit {MAX_LINES})"
