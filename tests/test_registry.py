"""The factory and the registry, and `auto`'s choice.

- `fa.create_attention` builds the registered module class by name (inside a
  Haiku transform), and a misspelt name lists the valid ones.
- `fa.register_mechanism` adds a mechanism that the factory, capabilities,
  the support table and `mechanisms_supporting` then know; a second
  registration under the same name is an error. The toy mechanism of these
  tests computes the semantics (checked against the reference) and is removed
  from the registry afterwards.
- `fa.capabilities` records are well-formed (known platforms, dtypes and
  `BlockSizes` fields) and `vanilla` is the one mechanism returning weights.
- `auto` follows its documented rule (CPU: vanilla for small score matrices,
  blockwise for large ones; GPU: cudnn, flash, blockwise, then vanilla; TPU:
  splash, flash, then the CPU order) and never picks a mechanism that would
  refuse the call: checked over a grid of requests, and through the module
  (which kernel actually runs is read off the traced program: blockwise's
  `custom_vjp` versus vanilla's dense scores). The TPU choices are pure
  selection tests (no TPU needed), with the reasons of the kernels passed
  over, and a check that auto's options build the compiled TPU kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re

import haiku as hk
import jax
import jax.numpy as jnp
import pytest

import flexible_attention as fa
from flexible_attention.core import reference
from flexible_attention.core.inputs import FEATURES
from flexible_attention.core.inputs import AttentionDims
from flexible_attention.kernels import flash_tpu
from flexible_attention.kernels import splash_tpu
from flexible_attention.mechanisms import auto
from flexible_attention.mechanisms import base
from flexible_attention.mechanisms import flash
from flexible_attention.mechanisms import registry

import helpers

KNOWN = ("vanilla", "blockwise", "cudnn", "flash", "splash", "ring",
         "ulysses", "auto")


# --- The factory --------------------------------------------------------------


@pytest.mark.parametrize("mechanism", fa.available_mechanisms())
def test_create_attention_builds_the_registered_class(mechanism):
  def build():
    module = fa.create_attention(mechanism, num_heads=4, head_dim=8,
                                 num_kv_heads=2, name="attn")
    assert type(module) is registry.get_mechanism(mechanism)
    assert isinstance(module, fa.AttentionModule)
    assert module.mechanism == mechanism
    assert module.module_name == "attn"
    assert (module.config.num_heads, module.config.head_dim,
            module.config.num_kv_heads) == (4, 8, 2)

  hk.transform(build).init(None)


def test_known_mechanisms_are_registered():
  assert set(KNOWN) <= set(fa.available_mechanisms())


def test_create_attention_outside_a_transform_is_haikus_error():
  with pytest.raises(ValueError, match=r"hk.transform"):
    fa.create_attention("vanilla", num_heads=2, head_dim=8)


def test_unknown_or_non_string_name_lists_the_valid_ones():
  valid = ", ".join(fa.available_mechanisms())
  for name in ("vanila", None):
    build = lambda name=name: fa.create_attention(name, num_heads=2,
                                                  head_dim=8)
    with pytest.raises(ValueError, match=rf"unknown attention mechanism "
                       rf"{name!r}; valid names: {valid}"):
      hk.transform(build).init(None)


EASYDEL_ALIASES = {
    "flash_attn2": "flash", "pallas_flash": "flash",
    "jax_flash_attn2": "blockwise", "sharded_vanilla": "vanilla",
    "legacy_sharded_vanilla": "vanilla", "local_ring": "ring",
    "wise_ring": "ring", "sdpa": "auto",
}


@pytest.mark.parametrize("alias, name", EASYDEL_ALIASES.items())
def test_easydel_names_are_documented_aliases(alias, name):
  assert registry.ALIASES[alias] == name
  assert alias not in fa.available_mechanisms()
  assert registry.get_mechanism(alias) is registry.get_mechanism(name)
  assert fa.capabilities(alias) == fa.capabilities(name)

  def build():
    module = fa.create_attention(alias, num_heads=4, head_dim=8)
    assert module.mechanism == name  # The real name, in errors too.

  hk.transform(build).init(None)


def test_an_alias_cannot_be_registered():
  with pytest.raises(ValueError, match="alias of mechanism 'flash'"):
    registry.register_mechanism("flash_attn2")(ToyAttention)


# --- Registering a mechanism --------------------------------------------------


class ToyAttention(base.AttentionModule):
  """The dense reference kernel, float32 only, no masks: a toy mechanism."""

  capabilities = registry.Capabilities(
      dtypes=("float32",), mask=False, block_size_fields=("block_b",),
      notes="test toy")

  @classmethod
  def make_kernel(cls, config, request):
    return lambda inputs, dropout: reference.dense_attention(
        inputs.query, inputs.key, inputs.value, inputs.bias,
        inputs.visibility, dropout, sm_scale=config.scale)


@contextlib.contextmanager
def registered(name: str, cls: type):
  """Registers `cls` as `name` for the duration of a test, then removes it."""
  registry.register_mechanism(name)(cls)
  try:
    yield name
  finally:
    del registry._REGISTRY[name]  # pylint: disable=protected-access


def test_registered_mechanism_is_known_everywhere_then_removed():
  before = fa.available_mechanisms()
  with registered("toy", ToyAttention) as name:
    assert fa.available_mechanisms() == before + (name,)
    assert fa.capabilities(name) is ToyAttention.capabilities
    assert ToyAttention.mechanism == name
    assert name in registry.mechanisms_supporting("bias")
    assert name not in registry.mechanisms_supporting("mask")
    assert f"| `{name}` |" in fa.support_table()
    with pytest.raises(ValueError, match=r"mechanism 'toy' is already "
                       r"registered"):
      registry.register_mechanism(name)(ToyAttention)

    rng = helpers.rng_for("toy")
    q, k, v = helpers.random_qkv(rng, 2, 9, 11, 4, 2, 8)
    ct = helpers.random_array(rng, q.shape)
    bias = helpers.random_array(rng, (1, 4, 9, 11))
    call = dict(causal=True, kv_lengths=jnp.asarray([11, 5]))
    result = helpers.run_mechanism(
        name, q, k, v, ct, bias=bias, call=call,
        options=dict(block_sizes=fa.BlockSizes(block_b=1)))
    ref = helpers.reference_vjp(q, k, v, ct, bias=bias, call=call)
    helpers.assert_matches_reference(result, ref.out, ref.grads, name)
    # Its capabilities are enforced by the base class.
    with pytest.raises(NotImplementedError, match=r"feature 'mask' is not "
                       r"supported by mechanism 'toy'"):
      helpers.call_mechanism(name, q, k, v, mask=jnp.ones((9, 11), bool))
    # `auto` only ever picks among its own candidates.
    assert name not in auto.candidates(_request("cpu", "float32"))
  assert fa.available_mechanisms() == before
  with pytest.raises(ValueError, match=r"unknown attention mechanism 'toy'"):
    fa.capabilities("toy")


# --- Capabilities -------------------------------------------------------------


@pytest.mark.parametrize("mechanism", fa.available_mechanisms())
def test_capabilities_record_is_well_formed(mechanism):
  caps = fa.capabilities(mechanism)
  assert isinstance(caps, fa.Capabilities)
  assert caps.platforms and set(caps.platforms) <= {"cpu", "gpu", "tpu"}
  assert caps.dtypes and set(caps.dtypes) <= {"float32", "bfloat16",
                                              "float16", "float64"}
  block_fields = {f.name for f in dataclasses.fields(fa.BlockSizes)}
  assert set(caps.block_size_fields) <= block_fields
  for feature in FEATURES + ("sharded_sequence",):
    assert isinstance(caps.supports(feature), bool)
  with pytest.raises(ValueError, match=r"unknown feature 'masks'"):
    caps.supports("masks")


def test_vanilla_is_the_one_mechanism_returning_weights():
  supporting = set(registry.mechanisms_supporting("weights"))
  assert supporting - {"auto"} == {"vanilla"}


def test_known_capabilities():
  vanilla, blockwise, cudnn = (fa.capabilities(n) for n in
                               ("vanilla", "blockwise", "cudnn"))
  assert all(vanilla.supports(f) for f in FEATURES)
  assert [f for f in FEATURES if not blockwise.supports(f)] == ["weights"]
  assert set(blockwise.block_size_fields) == {"block_q", "block_k",
                                              "block_q_dkv", "block_k_dkv"}
  assert vanilla.block_size_fields == ()
  assert cudnn.platforms == ("gpu",)
  assert set(cudnn.dtypes) == {"bfloat16", "float16"}
  # auto's record is the union of its candidates'.
  caps = fa.capabilities("auto")
  candidates = ("vanilla", "blockwise", "cudnn", "flash", "splash")
  assert set(caps.platforms) == {
      p for n in candidates for p in fa.capabilities(n).platforms}
  assert set(caps.dtypes) == {
      d for n in candidates for d in fa.capabilities(n).dtypes}
  for f in FEATURES:
    assert caps.supports(f) == any(fa.capabilities(n).supports(f)
                                   for n in candidates)
  assert set(caps.block_size_fields) == {
      field for n in candidates
      for field in fa.capabilities(n).block_size_fields}


# --- auto ---------------------------------------------------------------------


def _request(platform, dtype, features=(), *, batch=2, q_len=128, kv_len=128,
             heads=8, kv_heads=8, head_dim=64, window=None, blocks=()):
  dims = AttentionDims(batch=batch, q_len=q_len, kv_len=kv_len,
                       num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=head_dim, value_dim=head_dim)
  return fa.AttentionRequest(dims=dims, dtype=dtype, platform=platform,
                             features=frozenset(features),
                             block_size_fields=tuple(blocks), window=window)


LARGE = dict(batch=1, heads=4, q_len=4096, kv_len=4096)  # 2**26 scores.


@pytest.mark.parametrize("request_kwargs,expected", [
    # CPU: vanilla while the score matrix is small, then blockwise.
    (dict(platform="cpu", dtype="float32"), "vanilla"),
    (dict(platform="cpu", dtype="float32", **LARGE), "blockwise"),
    (dict(platform="cpu", dtype="bfloat16", features=("causal",), **LARGE),
     "blockwise"),
    # Weights: only vanilla returns them, at any size.
    (dict(platform="cpu", dtype="float32", features=("weights",), **LARGE),
     "vanilla"),
    (dict(platform="gpu", dtype="bfloat16", features=("weights",)),
     "vanilla"),
    # Block sizes only blockwise reads move small CPU calls to it.
    (dict(platform="cpu", dtype="float32", blocks=("block_q",)),
     "blockwise"),
    # GPU: cudnn when it accepts the call, else flash, else blockwise.
    (dict(platform="gpu", dtype="bfloat16", features=("causal", "gqa")),
     "cudnn"),
    (dict(platform="gpu", dtype="float16", **LARGE), "cudnn"),
    (dict(platform="gpu", dtype="float32"), "flash"),
    (dict(platform="gpu", dtype="bfloat16", features=("dropout",)),
     "flash"),
    (dict(platform="gpu", dtype="bfloat16", features=("segments",)),
     "flash"),
    (dict(platform="gpu", dtype="bfloat16", head_dim=60), "flash"),
    (dict(platform="gpu", dtype="bfloat16", q_len=64,
          features=("causal",)), "flash"),
    (dict(platform="gpu", dtype="bfloat16", head_dim=320), "blockwise"),
    # TPU: splash, then flash (JAX's TPU kernels), then the CPU rule.
    (dict(platform="tpu", dtype="bfloat16", features=("causal",)), "splash"),
    (dict(platform="tpu", dtype="float32", **LARGE), "splash"),
    (dict(platform="tpu", dtype="bfloat16", features=("causal", "bias")),
     "flash"),
    (dict(platform="tpu", dtype="bfloat16", features=("dropout",)),
     "vanilla"),
    (dict(platform="tpu", dtype="bfloat16", features=("dropout",), **LARGE),
     "blockwise"),
])
def test_auto_follows_its_rule(request_kwargs, expected):
  assert fa.select_mechanism(_request(**request_kwargs)) == expected


_SPLASH_REFUSES_BIAS = r"feature 'bias' is not supported by mechanism 'splash'"


@pytest.mark.parametrize("dtype,features,shape,expected,passed_over", [
    # A plain causal call: splash.
    ("bfloat16", ("causal",), {}, "splash", {}),
    # A bias: of the TPU kernels, only flash's has one.
    ("bfloat16", ("causal", "bias"), {}, "flash",
     {"splash": _SPLASH_REFUSES_BIAS}),
    # What both TPU kernels refuse: the CPU rule.
    ("bfloat16", ("dropout",), {}, "vanilla", {
        "splash": r"feature 'dropout' is not supported by mechanism 'splash'",
        "flash": r"on TPU, feature 'dropout' is not supported by mechanism "
                 r"'flash'"}),
    ("float32", ("mask",), LARGE, "blockwise", {
        "splash": r"feature 'mask' is not supported by mechanism 'splash'",
        "flash": r"on TPU, feature 'mask' is not supported by mechanism "
                 r"'flash'"}),
    ("float16", ("causal",), {}, "vanilla", {
        "splash": r"supports dtypes float32, bfloat16, not float16",
        "flash": r"on TPU, mechanism 'flash' supports dtypes float32, "
                 r"bfloat16, not float16"}),
    # A bias with what flash's TPU kernel refuses besides the features.
    ("bfloat16", ("causal", "gqa", "bias"), dict(kv_heads=2), "vanilla", {
        "splash": _SPLASH_REFUSES_BIAS,
        "flash": r"feature 'gqa' together with 'causal'"}),
    ("bfloat16", ("causal", "bias"), dict(q_len=64), "vanilla", {
        "splash": _SPLASH_REFUSES_BIAS,
        "flash": r"aligns its causal mask top-left"}),
])
def test_auto_on_tpu_passes_over_the_kernels_that_refuse(
    dtype, features, shape, expected, passed_over):
  """On TPU, auto tries splash, then flash, then the CPU order, and passes
  over exactly the kernels that refuse the call, for their reasons."""
  request = _request("tpu", dtype, features, **shape)
  order = auto.candidates(request)
  assert order[:2] == ("splash", "flash")
  assert fa.select_mechanism(request) == expected
  assert set(order[:order.index(expected)]) == set(passed_over)
  for name, pattern in passed_over.items():
    reason = registry.unsupported_reason(name, request)
    assert reason is not None and re.search(pattern, reason), (name, reason)


@pytest.mark.parametrize("platform,block_q,expected,passed_over", [
    ("tpu", 64, "blockwise", {"splash": "multiple of 128",
                              "flash": "multiple of 128",
                              "vanilla": "not read by mechanism 'vanilla'"}),
    ("tpu", 256, "splash", {}),
    ("gpu", 48, "blockwise", {"cudnn": "not read by mechanism 'cudnn'",
                              "flash": "power of two >= 16"}),
    ("gpu", 64, "flash", {"cudnn": "not read by mechanism 'cudnn'"}),
])
def test_auto_passes_over_kernels_that_cannot_use_the_tile_sizes(
    platform, block_q, expected, passed_over):
  """A module's request carries the BlockSizes values: auto skips the
  kernels whose tile constraints they break instead of failing in them."""
  blocks = fa.BlockSizes(block_q=block_q)
  request = dataclasses.replace(
      _request(platform, "bfloat16", ("causal",), blocks=("block_q",)),
      block_sizes=blocks)
  assert fa.select_mechanism(request) == expected
  for name, pattern in passed_over.items():
    reason = registry.refusal_reason(name, request)
    assert reason is not None and re.search(pattern, reason), (name, reason)


def test_module_requests_carry_the_block_size_values(monkeypatch):
  seen = []
  select = auto.select_mechanism
  monkeypatch.setattr(auto, "select_mechanism",
                      lambda request: seen.append(request) or select(request))
  blocks = fa.BlockSizes(block_q=16)
  q = jnp.zeros((1, 16, 2, 8))
  module = hk.transform(lambda q: fa.create_attention(
      "auto", num_heads=2, head_dim=8, block_sizes=blocks)(
          q, q, q).attention_outputs)
  module.apply(module.init(jax.random.PRNGKey(0), q), None, q)
  assert seen and all(r.block_sizes == blocks for r in seen)
  assert seen[0].block_size_fields == ("block_q",)


def test_auto_builds_the_compiled_tpu_kernels():
  """auto's options have no `interpret`: on TPU, splash and flash build
  their compiled Pallas TPU kernels from them."""
  config = auto.AutoConfig(num_heads=8, head_dim=64, num_kv_heads=8)
  kernel = auto.AutoAttention.make_kernel(
      config, _request("tpu", "bfloat16", ("causal",)))
  assert kernel.func is splash_tpu.splash_attention
  assert kernel.keywords["interpret"] is False
  kernel = auto.AutoAttention.make_kernel(
      config, _request("tpu", "bfloat16", ("causal", "bias")))
  assert kernel.func is flash_tpu.flash_attention
  # A TPU tile that is no power of two: flash's config (which auto hands
  # it) leaves the tile rule to the platform's kernel.
  blocks = fa.BlockSizes(block_q=384)
  config = dataclasses.replace(config, block_sizes=blocks)
  request = dataclasses.replace(
      _request("tpu", "bfloat16", ("bias",), blocks=("block_q",)),
      block_sizes=blocks)
  assert fa.select_mechanism(request) == "flash"
  kernel = auto.AutoAttention.make_kernel(config, request)
  assert kernel.keywords["block_sizes"] == blocks
  assert "power of two" in registry.refusal_reason(
      "flash", dataclasses.replace(request, platform="gpu"))


def test_auto_hands_the_mechanism_it_picks_that_mechanisms_config(
    monkeypatch):
  """The mechanism `auto` runs receives its own config type, the common
  options carried over and its own at their defaults."""
  seen = []
  vanilla = registry.get_mechanism("vanilla")
  make_kernel = vanilla.make_kernel
  monkeypatch.setattr(vanilla, "make_kernel", classmethod(
      lambda cls, config, request: seen.append(config) or make_kernel(
          config, request)))
  q = jnp.zeros((1, 8, 2, 8))
  module = hk.transform(lambda q: fa.create_attention(
      "auto", num_heads=2, head_dim=8, sm_scale=0.5)(
          q, q, q, return_weights=True).attention_outputs)
  module.apply(module.init(jax.random.PRNGKey(0), q), None, q)
  assert seen and all(type(c) is base.AttentionConfig for c in seen)
  assert seen[0].sm_scale == 0.5
  config = auto.AutoConfig(num_heads=2, head_dim=8, num_kv_heads=1,
                           autotune=True)
  as_flash = config.for_mechanism(flash.FlashConfig)
  assert type(as_flash) is flash.FlashConfig
  assert (as_flash.num_kv_heads, as_flash.interpret, as_flash.launch) == (
      1, False, None)
  assert config.for_mechanism(auto.AutoConfig) is config


def test_request_options_are_a_read_only_hashable_mapping():
  request = dataclasses.replace(_request("tpu", "bfloat16"),
                                options=(("precision", "highest"),))
  assert isinstance(request.options, registry.Options)
  assert request.options == {"precision": "highest"}
  assert request.options.get("interpret") is None
  with pytest.raises(TypeError):
    request.options["precision"] = None  # pytype: disable=unsupported-operands
  assert hash(request) == hash(dataclasses.replace(
      request, options={"precision": "highest"}))
  config = flash.FlashConfig(num_heads=2, head_dim=8, num_kv_heads=2)
  assert dict(config.request_options()) == dict(
      precision=None, interpret=False, launch=None)


def _request_grid():
  feature_sets = [(), ("causal",), ("causal", "window"), ("segments",),
                  ("mask",), ("bias",), ("softcap",), ("dropout",),
                  ("weights",), ("cache", "positions", "kv_lengths"),
                  ("gqa", "kv_lengths"), ("weights", "dropout", "mask")]
  shapes = [dict(), dict(q_len=1), dict(head_dim=60), LARGE]
  for platform, dtype, features, shape, blocks in itertools.product(
      ("cpu", "gpu", "tpu"), ("float32", "bfloat16", "float16"), feature_sets,
      shapes, ((), ("block_q",), ("block_b",))):
    window = (8, 0) if "window" in features else None
    yield _request(platform, dtype, features, window=window, blocks=blocks,
                   **shape)


def test_auto_never_picks_a_mechanism_that_refuses():
  picked = set()
  for request in _request_grid():
    reasons = {name: registry.unsupported_reason(name, request)
               for name in auto.candidates(request)}
    try:
      name = fa.select_mechanism(request)
    except NotImplementedError as e:
      # Only when every candidate refuses, and then it says why.
      assert all(reasons.values()), (request, reasons)
      for reason in reasons.values():
        assert reason in str(e)
      assert registry.unsupported_reason("auto", request) is not None
      continue
    assert reasons[name] is None, (request, name, reasons[name])
    assert registry.unsupported_reason("auto", request) is None
    if request.platform != "gpu":
      assert name != "cudnn"
    picked.add((request.platform, name))
  assert {("cpu", "vanilla"), ("cpu", "blockwise"), ("gpu", "cudnn"),
          ("gpu", "flash"), ("gpu", "vanilla"), ("tpu", "splash"),
          ("tpu", "flash"), ("tpu", "vanilla"), ("tpu", "blockwise")} <= picked
  assert ("cpu", "cudnn") not in picked


def _traced(mechanism, q, k, v, **call):
  return str(jax.make_jaxpr(lambda q, k, v: helpers.call_mechanism(
      mechanism, q, k, v, **call))(q, k, v))


def test_auto_module_runs_the_mechanism_its_rule_picks():
  """On CPU: vanilla for a small call, blockwise for a large one; and the
  program `auto` traces is exactly the one its pick traces (it adds no
  work, so on a GPU its time is the served mechanism's, up to noise)."""
  backend = jax.default_backend()
  rng = helpers.rng_for("auto module")
  small = helpers.random_qkv(rng, 1, 64, 64, 4, 4, 8)
  # Traced only (no compilation): 4 * 4096**2 = 2**26 scores.
  large = [jax.ShapeDtypeStruct((1, 4096, 4, 8), jnp.float32)] * 3
  picks = [fa.select_mechanism(_request(
      backend, "float32", ("causal",), batch=1, heads=4, q_len=n, kv_len=n,
      head_dim=8)) for n in (64, 4096)]
  if backend == "cpu":
    assert picks == ["vanilla", "blockwise"]
  # blockwise traces to its custom_vjp, vanilla to plain dense code.
  assert "custom_vjp" not in _traced("vanilla", *small, causal=True)
  assert "custom_vjp" in _traced("blockwise", *small, causal=True)
  for pick, inputs in zip(picks, (small, large)):
    traced = _traced("auto", *inputs, causal=True)
    assert ("custom_vjp" in traced) == (pick == "blockwise"), pick
    assert traced == _traced(pick, *inputs, causal=True), pick


def test_auto_module_returns_weights_through_vanilla():
  rng = helpers.rng_for("auto weights")
  q, k, v = helpers.random_qkv(rng, 1, 2048, 2048, 8, 8, 8)
  # Large enough that auto would pick blockwise without weights.
  request = _request(jax.default_backend(), "float32", ("weights",),
                     batch=1, heads=8, q_len=2048, kv_len=2048, head_dim=8)
  assert request.score_elements > auto.DENSE_SCORE_LIMIT
  q, k, v = (x[:, :16] for x in (q, k, v))  # Run it small.
  result = helpers.run_mechanism("auto", q, k, v, call=dict(
      return_weights=True, causal=True))
  ref = helpers.reference_vjp(q, k, v, None, call=dict(causal=True),
                              return_weights=True)
  helpers.assert_close(result.weights, ref.weights, jnp.float32,
                       "auto weights")
  helpers.assert_close(result.out, ref.out, jnp.float32, "auto output")
  assert fa.select_mechanism(request) == "vanilla"


def test_auto_refuses_only_what_no_candidate_accepts():
  request = _request("cpu", "float32", ("weights",), blocks=("block_q",))
  with pytest.raises(NotImplementedError, match=r"auto: no mechanism accepts "
                     r"this call: .*'vanilla'.*\| .*'weights'"):
    fa.select_mechanism(request)
