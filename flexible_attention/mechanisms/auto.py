"""`auto`: picks the mechanism for each call.

The rule (documented in the README):

- candidates, in order of preference:
  - GPU: `cudnn`, then `flash`, then `blockwise`, then `vanilla`; under
    XLA's deterministic GPU ops (`tuning.xla_deterministic_ops`), where
    cuDNN's backward runs its slower deterministic algorithm, `flash`
    first, then `cudnn`;
  - CPU: `vanilla` while the score matrix is small
    (B * H * Sq * Sk <= `DENSE_SCORE_LIMIT`), else `blockwise`, then
    `vanilla`;
  - TPU: `splash`, then `flash` (JAX's Pallas TPU flash kernel there), then
    the CPU order;
- a measured winner for the call's cell (`measured_winners.json`, from the
  benchmark results) goes first, ahead of the rule's order;
- the first candidate that accepts the call (dtype, features, shapes, block
  size fields) serves it; `auto` never picks a mechanism that would refuse.

With `autotune=True`, `auto` instead times every candidate that accepts the
call on its exact shapes and mesh on first use, and caches the winner on disk
(`tuning.autotune`).

So `return_weights=True` always lands on `vanilla`, and a feature cuDNN lacks
(dropout, segment ids, soft cap, ...) moves a GPU call to `flash`. On TPU a
bias moves a call from `splash` to `flash`, and what both TPU kernels refuse
(`fa.capabilities("splash")`, `fa.capabilities("flash", "tpu")`) moves it on
to `vanilla` or `blockwise`.
"""

from __future__ import annotations

import dataclasses

from flexible_attention.core.inputs import FEATURES
from flexible_attention.mechanisms import base
from flexible_attention.mechanisms import blockwise  # pylint: disable=unused-import
from flexible_attention.mechanisms import cudnn  # pylint: disable=unused-import
from flexible_attention.mechanisms import flash  # pylint: disable=unused-import
from flexible_attention.mechanisms import registry
from flexible_attention.mechanisms import splash  # pylint: disable=unused-import
from flexible_attention.mechanisms import tuning
from flexible_attention.mechanisms import vanilla  # pylint: disable=unused-import

# 2**24 scores are 64 MiB in float32 per materialised [B, H, Sq, Sk] array;
# past that, the dense backward's several such arrays cost more than tiling.
DENSE_SCORE_LIMIT = 2**24


def rule_candidates(request: registry.AttentionRequest) -> tuple[str, ...]:
  """The rule's order of mechanisms for `request`, best first."""
  if request.platform == "gpu":
    if tuning.xla_deterministic_ops():
      return ("flash", "cudnn", "blockwise", "vanilla")
    return ("cudnn", "flash", "blockwise", "vanilla")
  if request.score_elements <= DENSE_SCORE_LIMIT:
    order = ("vanilla", "blockwise")
  else:
    order = ("blockwise", "vanilla")
  if request.platform == "tpu":
    return ("splash", "flash") + order
  return order


def candidates(request: registry.AttentionRequest) -> tuple[str, ...]:
  """The mechanisms `auto` considers for `request`, best first: the
  measured winner of its cell (if any), then the rule's order."""
  winner = tuning.measured_winner(request)
  order = rule_candidates(request)
  return order if winner is None else tuple(dict.fromkeys((winner,) + order))


def select_mechanism(request: registry.AttentionRequest) -> str:
  """The name of the mechanism `auto` uses for `request`.

  Raises:
    NotImplementedError: when no candidate accepts the call (the message
      gives each candidate's reason).
  """
  reasons = []
  for name in candidates(request):
    reason = registry.refusal_reason(name, request)
    if reason is None:
      return name
    reasons.append(reason)
  raise NotImplementedError("auto: no mechanism accepts this call: " +
                            " | ".join(reasons))


def _union_capabilities(names) -> registry.Capabilities:
  caps = [registry.capabilities(n) for n in names]
  merged = {}
  for field in dataclasses.fields(registry.Capabilities):
    values = [getattr(c, field.name) for c in caps]
    if field.name in FEATURES or field.type == "bool":
      merged[field.name] = any(values)
    elif field.name == "notes":
      merged[field.name] = "picks per call: " + ", ".join(names) + "."
    else:
      merged[field.name] = tuple(dict.fromkeys(v for vs in values for v in vs))
  return registry.Capabilities(**merged)


@dataclasses.dataclass(frozen=True)
class AutoConfig(base.AttentionConfig):
  """`auto`'s options: the common ones plus autotuning.

  Attributes:
    autotune: time the candidates on first use for the call's shapes and
      mesh, and use the fastest (cached on disk).
    autotune_cache: the JSON cache file (default
      `tuning.default_cache_path()`).
  """

  autotune: bool = False
  autotune_cache: str | None = None


@registry.register_mechanism("auto")
class AutoAttention(base.AttentionModule):
  """Attention that picks the best mechanism for each call.

  See the module docstring for the rule; `select_mechanism` applies it.
  """

  config_class = AutoConfig
  capabilities = _union_capabilities(("vanilla", "blockwise", "cudnn",
                                      "flash", "splash"))

  def resolve(self, request):  # pylint: disable=arguments-differ
    """The mechanism serving `request`: autotuned or by the rule."""
    if self.config.autotune:
      select_mechanism(request)  # Refuses clearly if nobody accepts.
      name = tuning.autotune(request, self.config, candidates(request),
                             self.config.autotune_cache)
    else:
      name = select_mechanism(request)
    return registry.get_mechanism(name)

  @classmethod
  def unsupported_reason(cls, request):
    try:
      select_mechanism(request)
    except NotImplementedError as e:
      return str(e)
    return None

  @classmethod
  def make_kernel(cls, config, request):
    # The base class asks the resolved mechanism for its kernel; this path
    # is for callers holding only the class.
    mechanism = registry.get_mechanism(select_mechanism(request))
    return mechanism.make_kernel(
        config.for_mechanism(mechanism.config_class), request)
