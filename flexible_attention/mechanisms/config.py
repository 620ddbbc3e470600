"""The options of every attention module: `AttentionConfig`.

A module's constructor options live in one frozen, hashable record that
validates itself when built (by the module or by hand), raising the same
errors either way. A mechanism with options of its own subclasses it
(`InterpretConfig` adds Pallas' `interpret` flag) and names the subclass as
its `config_class` (`mechanisms/base.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flexible_attention.core import inputs as inputs_lib
from flexible_attention.core import mods as mods_lib
from flexible_attention.core.types import BlockSizes
from flexible_attention.mechanisms import registry
from flexible_attention.sharding.mesh import PartitionAxis
from flexible_attention.sharding.mesh import validate_partition


def _positive_int(name, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
      value <= 0):
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return int(value)


def _positive_number(value) -> bool:
  return isinstance(value, (int, float)) and value > 0


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """The constructor options of an attention module (static, hashable).

  Built by the module (which resolves the defaults, e.g. `num_kv_heads`
  from `num_heads`) or by hand; either way it validates itself, raising the
  same errors. Fields are those of `AttentionModule.__init__`.
  """

  num_heads: int
  head_dim: int
  num_kv_heads: int
  value_dim: int | None = None
  sm_scale: float | None = None
  dropout_rate: float = 0.0
  logits_soft_cap: float | None = None
  sliding_window: int | tuple[int, int] | None = None
  dtype: Any = None
  precision: Any = None
  softmax_dtype: Any = jnp.float32
  block_sizes: BlockSizes = BlockSizes()
  mesh: jax.sharding.Mesh | None = None
  partition_axis: PartitionAxis = PartitionAxis()
  decode: bool = False
  max_cache_length: int | None = None
  score_mod: Callable | None = None
  mask_mod: Callable | None = None

  def __post_init__(self):
    set_field = lambda name, value: object.__setattr__(self, name, value)
    for name in ("num_heads", "head_dim", "num_kv_heads"):
      set_field(name, _positive_int(name, getattr(self, name)))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads = {self.num_heads} must be a multiple of "
                       f"num_kv_heads = {self.num_kv_heads}.")
    if self.value_dim is not None:
      set_field("value_dim", _positive_int("value_dim", self.value_dim))
    if self.sm_scale is not None and not (_positive_number(self.sm_scale)
                                          and np.isfinite(self.sm_scale)):
      raise ValueError("sm_scale must be a finite positive number, got "
                       f"{self.sm_scale!r}.")
    if not (isinstance(self.dropout_rate, (int, float)) and
            0.0 <= self.dropout_rate < 1.0):
      raise ValueError("dropout_rate must be in [0, 1), got "
                       f"{self.dropout_rate!r}.")
    set_field("dropout_rate", float(self.dropout_rate))
    if self.logits_soft_cap is not None and not (
        _positive_number(self.logits_soft_cap) and
        np.isfinite(self.logits_soft_cap)):
      raise ValueError("logits_soft_cap must be a finite positive number or "
                       f"None, got {self.logits_soft_cap!r}.")
    inputs_lib.canonical_window(self.sliding_window, False)  # Type/values.
    if np.dtype(self.softmax_dtype) != np.float32:
      raise ValueError("softmax_dtype must be float32 (the accumulation dtype "
                       f"of every kernel), got {np.dtype(self.softmax_dtype)}.")
    if self.dtype is not None and not jnp.issubdtype(self.dtype, jnp.floating):
      raise TypeError(f"dtype must be a floating dtype, got {self.dtype!r}.")
    if not isinstance(self.block_sizes, BlockSizes):
      raise TypeError("block_sizes must be a fa.BlockSizes, got "
                      f"{type(self.block_sizes)}.")
    if self.mesh is None and self.partition_axis != PartitionAxis():
      raise ValueError("partition_axis was given without a mesh; pass mesh=.")
    if self.mesh is not None:
      validate_partition(self.mesh, self.partition_axis)
    if self.decode:
      set_field("max_cache_length", _positive_int("max_cache_length",
                                                  self.max_cache_length))
    elif self.max_cache_length is not None:
      raise ValueError("max_cache_length is only used with decode=True.")
    set_field("decode", bool(self.decode))
    mods_lib.check_mod("score_mod", self.score_mod)
    mods_lib.check_mod("mask_mod", self.mask_mod)

  @property
  def scale(self) -> float:
    return self.head_dim**-0.5 if self.sm_scale is None else self.sm_scale

  @classmethod
  def own_fields(cls) -> tuple[str, ...]:
    """The names of this config's own options (beyond the common ones)."""
    common = {f.name for f in dataclasses.fields(AttentionConfig)}
    return tuple(f.name for f in dataclasses.fields(cls)
                 if f.name not in common)

  def for_mechanism(self, config_class: type) -> AttentionConfig:
    """These options as a `config_class` (what `auto` and `ulysses` hand
    the mechanism they run): itself if it is of that type, else the common
    options, with that class's defaults for its own."""
    if type(self) is config_class:  # pylint: disable=unidiomatic-typecheck
      return self
    common = {f.name: getattr(self, f.name)
              for f in dataclasses.fields(AttentionConfig)}
    return config_class(**common)

  def request_options(self) -> registry.Options:
    """The options a call's request carries: `precision` and this config's
    own (so that `unsupported_reason` can see them)."""
    names = ("precision",) + self.own_fields()
    return registry.Options((n, getattr(self, n)) for n in names)


@dataclasses.dataclass(frozen=True)
class InterpretConfig(AttentionConfig):
  """The common options plus `interpret`, for mechanisms with Pallas kernels.

  Attributes:
    interpret: run the Pallas kernels in Pallas' interpreter (any backend;
      slow: for tests on CPU).
  """

  interpret: bool = False

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.interpret, bool):
      raise TypeError(f"interpret must be a bool, got {self.interpret!r}.")
