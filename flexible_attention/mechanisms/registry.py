"""The one registry: mechanism name -> module class and its capabilities.

The factory (`create_attention`), `auto`, the comparison script, the README's
support table and the test battery all read it. A new mechanism is one module
class decorated with `@register_mechanism("name")` (what it may override:
`mechanisms/base.py`'s docstring).
"""

from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any

import numpy as np

from flexible_attention.core.inputs import AttentionDims
from flexible_attention.core.inputs import FEATURES
from flexible_attention.core.types import BlockSizes

_REGISTRY: dict[str, type] = {}

# The mechanism names EasyDeL users have in their configs, and what they
# stand for here. `sdpa` (EasyDeL: `jax.nn.dot_product_attention`, which
# uses cuDNN where it can and XLA otherwise) is `auto`, which likewise
# prefers `cudnn` on a GPU and falls back to a mechanism that serves the
# call, everywhere. `create_attention`, `capabilities` and the modules'
# `mechanism=` accept them; `available_mechanisms()` lists only the real
# names.
ALIASES: dict[str, str] = {
    "flash_attn2": "flash",
    "pallas_flash": "flash",
    "jax_flash_attn2": "blockwise",
    "sharded_vanilla": "vanilla",
    "legacy_sharded_vanilla": "vanilla",
    "local_ring": "ring",
    "wise_ring": "ring",
    "sdpa": "auto",
}


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """What a mechanism supports.

  Attributes:
    platforms: backends it runs on (`"cpu"`, `"gpu"`, `"tpu"`).
    dtypes: input dtypes it accepts.
    causal, window, segments, kv_lengths, positions, mask, bias, softcap,
    dropout, weights, lse, cache, gqa, sinks, score_mod, mask_mod: the
      features of the semantics it computes (see DESIGN.md); `weights` is
      `return_weights=True`, `lse` is `return_lse=True`, `positions` is
      explicit `q_positions` / `kv_positions`, `cache` a dense or paged KV
      cache (with `q_lengths`), `gqa` is `Hkv < H`, `sinks` learnable sink
      logits (`sinks=`, with their gradient), `score_mod` / `mask_mod` the
      user's modifications (`core/mods.py`; with the gradients of
      `mod_args`).
    sharded_sequence: whether a mesh may shard the sequence axes.
    precision: whether it honours the `precision` option (matmul
      precision); one that does not refuses any `precision` but None.
    block_size_fields: the `fa.BlockSizes` fields it reads.
    notes: one line on limits the fields above do not capture.
  """

  platforms: tuple[str, ...] = ("cpu", "gpu", "tpu")
  dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
  causal: bool = True
  window: bool = True
  segments: bool = True
  kv_lengths: bool = True
  positions: bool = True
  mask: bool = True
  bias: bool = True
  softcap: bool = True
  dropout: bool = True
  weights: bool = False
  lse: bool = True
  cache: bool = True
  gqa: bool = True
  sinks: bool = False
  score_mod: bool = False
  mask_mod: bool = False
  sharded_sequence: bool = False
  precision: bool = True
  block_size_fields: tuple[str, ...] = ()
  notes: str = ""

  def supports(self, feature: str) -> bool:
    known = FEATURES + ("sharded_sequence",)
    if feature not in known:
      raise ValueError(f"unknown feature {feature!r}; known: {known}.")
    return getattr(self, feature)


class Options(collections.abc.Mapping):
  """A read-only, hashable `name -> value` mapping: a request's options."""

  __slots__ = ("_items",)

  def __init__(self, items: Any = ()):
    self._items = dict(items)

  def __getitem__(self, name: str) -> Any:
    return self._items[name]

  def __iter__(self):
    return iter(self._items)

  def __len__(self) -> int:
    return len(self._items)

  def __hash__(self) -> int:
    return hash(frozenset(self._items.items()))

  def __repr__(self) -> str:
    return f"Options({self._items!r})"


@dataclasses.dataclass(frozen=True)
class AttentionRequest:
  """The static description of one call, which decides who can serve it.

  Attributes:
    dims: the sizes of the call.
    dtype: the compute dtype (name, e.g. `"bfloat16"`).
    platform: the backend the call runs on.
    features: the feature names the call uses.
    block_size_fields: the `BlockSizes` fields the user set.
    block_sizes: their values, where known (a module's call fills it; a
      request built by hand may leave it None): mechanisms with constraints
      on tile sizes refuse values they cannot use.
    sequence_sharded: whether the mesh shards a sequence axis.
    window: the canonical `(left, right)` sliding window, or `None`.
    options: the module's options that some mechanism may refuse
      (`"precision"` and the mechanism's own, e.g. `"interpret"`), as a
      read-only `Options` mapping (built from any mapping or pairs).
  """

  dims: AttentionDims
  dtype: str
  platform: str
  features: frozenset[str]
  block_size_fields: tuple[str, ...] = ()
  block_sizes: BlockSizes | None = None
  sequence_sharded: bool = False
  window: tuple[int, int] | None = None
  options: Options = Options()

  def __post_init__(self):
    if not isinstance(self.options, Options):
      object.__setattr__(self, "options", Options(self.options))

  def block_size_reason(self, fields, check) -> str | None:
    """The first refusal `check(field, value)` gives for a set field of
    `fields` (None when every value passes or the values are unknown)."""
    if self.block_sizes is None:
      return None
    for field in fields:
      reason = check(field, getattr(self.block_sizes, field))
      if reason is not None:
        return reason
    return None

  @property
  def score_elements(self) -> int:
    d = self.dims
    return d.batch * d.num_heads * d.q_len * d.kv_len


def register_mechanism(name: str):
  """Class decorator adding an attention module class to the registry."""

  def decorator(cls):
    if name in _REGISTRY:
      raise ValueError(f"mechanism {name!r} is already registered.")
    if name in ALIASES:
      raise ValueError(f"{name!r} is an alias of mechanism "
                       f"{ALIASES[name]!r}; register under another name.")
    cls.mechanism = name
    _REGISTRY[name] = cls
    return cls

  return decorator


def available_mechanisms() -> tuple[str, ...]:
  """All registered mechanism names, in registration order (not the
  aliases of `ALIASES`)."""
  return tuple(_REGISTRY)


def resolve_name(name: str) -> str:
  """The registered name that `name` (a registered name or an alias of
  `ALIASES`) stands for (a clear error otherwise)."""
  if isinstance(name, str):
    name = ALIASES.get(name, name)
  if not isinstance(name, str) or name not in _REGISTRY:
    raise ValueError(f"unknown attention mechanism {name!r}; valid names: "
                     f"{', '.join(_REGISTRY)} (aliases: "
                     f"{', '.join(f'{a} -> {m}' for a, m in ALIASES.items())}"
                     ").")
  return name


def get_mechanism(name: str) -> type:
  """The module class registered under `name` or the name an alias stands
  for (`ALIASES`); a clear error otherwise."""
  return _REGISTRY[resolve_name(name)]


def capabilities(mechanism: str, platform: str | None = None) -> Capabilities:
  """The `Capabilities` record of a registered mechanism.

  Args:
    mechanism: a registered name.
    platform: `"cpu"`, `"gpu"` or `"tpu"` for the record of the kernels the
      mechanism runs there (e.g. `flash` on TPU runs JAX's Pallas TPU kernel,
      which supports less), or None for its record over all platforms.
  """
  cls = get_mechanism(mechanism)
  if platform is None:
    return cls.capabilities
  return cls.platform_capabilities.get(platform, cls.capabilities)


def mechanisms_supporting(feature: str) -> tuple[str, ...]:
  """Registered mechanisms whose capabilities include `feature`."""
  return tuple(name for name, cls in _REGISTRY.items()
               if cls.capabilities.supports(feature))


def unsupported_reason(mechanism: str, request: AttentionRequest) -> str | None:
  """Why `mechanism` would refuse `request`, or `None` if it serves it."""
  return get_mechanism(mechanism).unsupported_reason(request)


def refusal_reason(mechanism: str, request: AttentionRequest) -> str | None:
  """Why `mechanism` cannot serve `request`: a missing capability
  (`unsupported_reason`) or tile sizes it cannot use (`block_size_reason`);
  `None` if it serves it. What `auto` checks of each candidate."""
  cls = get_mechanism(mechanism)
  return cls.unsupported_reason(request) or cls.block_size_reason(request)


def create_attention(mechanism: str, *, num_heads: int, head_dim: int,
                     num_kv_heads: int | None = None, **options):
  """Creates the attention module of a mechanism by name.

  Must be called inside `hk.transform` (or `hk.transform_with_state`), like
  any Haiku module.

  Args:
    mechanism: a name from `available_mechanisms()` or an alias of
      `ALIASES` (e.g. EasyDeL's `"flash_attn2"`, standing for `"flash"`).
    num_heads: H, the number of query heads.
    head_dim: D, the query/key head size.
    num_kv_heads: Hkv (default H); H must be a multiple of it.
    **options: the common options of `fa.AttentionModule` (`sm_scale`,
      `dropout_rate`, `logits_soft_cap`, `sliding_window`, `dtype`,
      `precision`, `softmax_dtype`, `block_sizes`, `mesh`, `partition_axis`,
      `decode`, `max_cache_length`, `value_dim`, `score_mod`, `mask_mod`,
      `name`) and any option the mechanism adds.

  Returns:
    The `hk.Module`.
  """
  return get_mechanism(mechanism)(num_heads, head_dim,
                                  num_kv_heads=num_kv_heads, **options)


def support_table() -> str:
  """The mechanism x feature table (Markdown), generated from the registry:
  a row per mechanism, then one per platform record of it (`flash (tpu)`)."""
  columns = ("platforms", "dtypes") + FEATURES + ("sharded_sequence",
                                                  "block_size_fields")
  short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16",
           "float64": "f64"}
  lines = ["| mechanism | " + " | ".join(columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
  rows = []
  for name, cls in _REGISTRY.items():
    rows.append((name, cls.capabilities))
    rows.extend((f"{name} ({platform})", caps) for platform, caps in
                cls.platform_capabilities.items())
  for name, caps in rows:
    cells = []
    for column in columns:
      value = getattr(caps, column)
      if isinstance(value, (bool, np.bool_)):
        cells.append("yes" if value else "-")
      else:
        cells.append(", ".join(short.get(v, v) for v in value) or "-")
    lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
  return "\n".join(lines)
