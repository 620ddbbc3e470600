"""`auto`: picks the mechanism for each call.

The rule (documented in the README):

- candidates, in order of preference:
  - GPU: `cudnn`, then `flash`, then `blockwise`, then `vanilla`;
  - CPU and TPU: `vanilla` while the score matrix is small
    (B * H * Sq * Sk <= `DENSE_SCORE_LIMIT`), else `blockwise`, then
    `vanilla`;
- the first candidate that accepts the call (dtype, features, shapes, block
  size fields) serves it; `auto` never picks a mechanism that would refuse.

So `return_weights=True` always lands on `vanilla`, and a feature cuDNN lacks
(dropout, segment ids, soft cap, ...) moves a GPU call to `flash`.
"""

from __future__ import annotations

import dataclasses

from flexible_attention.core.inputs import FEATURES
from flexible_attention.mechanisms import base
from flexible_attention.mechanisms import blockwise  # pylint: disable=unused-import
from flexible_attention.mechanisms import cudnn  # pylint: disable=unused-import
from flexible_attention.mechanisms import flash  # pylint: disable=unused-import
from flexible_attention.mechanisms import registry
from flexible_attention.mechanisms import vanilla  # pylint: disable=unused-import

# 2**24 scores are 64 MiB in float32 per materialised [B, H, Sq, Sk] array;
# past that, the dense backward's several such arrays cost more than tiling.
DENSE_SCORE_LIMIT = 2**24


def candidates(request: registry.AttentionRequest) -> tuple[str, ...]:
  """The mechanisms `auto` considers for `request`, best first."""
  if request.platform == "gpu":
    return ("cudnn", "flash", "blockwise", "vanilla")
  if request.score_elements <= DENSE_SCORE_LIMIT:
    return ("vanilla", "blockwise")
  return ("blockwise", "vanilla")


def select_mechanism(request: registry.AttentionRequest) -> str:
  """The name of the mechanism `auto` uses for `request`.

  Raises:
    NotImplementedError: when no candidate accepts the call (the message
      gives each candidate's reason).
  """
  reasons = []
  for name in candidates(request):
    reason = registry.unsupported_reason(name, request)
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


@registry.register_mechanism("auto")
class AutoAttention(base.AttentionModule):
  """Attention that picks the best mechanism for each call.

  See the module docstring for the rule; `select_mechanism` applies it.
  """

  capabilities = _union_capabilities(("vanilla", "blockwise", "cudnn",
                                      "flash"))

  @classmethod
  def resolve(cls, request):
    return registry.get_mechanism(select_mechanism(request))

  @classmethod
  def unsupported_reason(cls, request):
    try:
      select_mechanism(request)
    except NotImplementedError as e:
      return str(e)
    return None

  @classmethod
  def make_kernel(cls, config, request):
    return cls.resolve(request).make_kernel(config, request)
