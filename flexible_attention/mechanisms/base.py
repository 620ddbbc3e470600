"""The base class of every attention mechanism, and how to write one.

`AttentionModule` owns everything that is not the algorithm: canonicalisation
of the call, capability checks, the KV cache (explicit or in Haiku state),
dropout keys, dtype handling and sharding over a mesh. Its options live in an
`AttentionConfig` (`config.py`), which validates itself when built (by the
module or by hand). A call runs in five steps: attach the cache, canonicalise
the arguments into `AttentionInputs`, describe the call as an
`AttentionRequest`, select the mechanism that serves it (refusing clearly what
it cannot), and run its pure kernel, under `shard_map` when there is a mesh.

Writing a mechanism: subclass `AttentionModule`, decorate it with
`@fa.register_mechanism("name")` and override what applies:

- `make_kernel(config, request)` (required): the pure function
  `(AttentionInputs, Dropout | None) -> KernelOutput` of the call; no `hk.*`
  inside. `request` is the call's static description, already accepted.
  The record's optional parts are the kernel's to apply when it declares
  them: `sinks`, and `mods` (`score_mod` / `mask_mod`: `core/mods.py`'s
  `Mods`, whose batch/head offsets the base class sets per shard).
- `capabilities`: a `fa.Capabilities` record of the platforms, dtypes,
  features, `precision` support and `BlockSizes` fields it supports; the
  default `unsupported_reason`, `auto`, the README's table and the
  conformance battery all read it.
- `platform_capabilities`: `{platform: Capabilities}` for platforms where
  the mechanism runs other kernels that support less (`flash` on TPU). It
  replaces `capabilities` for calls on that platform (unless the call runs
  in Pallas' interpreter, `interpret=True`) and adds a row to the table.
- `config_class`: an `AttentionConfig` subclass with the mechanism's own
  options as fields with defaults (its `__post_init__` calls
  `super().__post_init__()`, then checks them); its extra fields become
  keyword options of the module, and the request's `options` carry them.
  `InterpretConfig` adds the `interpret` flag of Pallas mechanisms.
- `unsupported_reason(request)`: why it cannot serve a call (None when it
  can). The default checks `platforms`, dtypes, features, sequence
  sharding, block size fields and `precision` against the capabilities;
  override it (calling `super()` first) for limits a record cannot say,
  such as shape constraints. A refusal becomes `NotImplementedError`.
- `block_size_reason(request)`: why the `BlockSizes` values cannot serve
  this call when that depends on the call (e.g. the platform's tile rule);
  it becomes `ValueError`. Checks that do not depend on the call belong in
  the config.
- `platforms(request)`: the platforms that can serve the call (default: the
  capabilities', or all of them with `interpret=True`).
- `token_layout(config)`: the token layout (`fa.LAYOUTS`) its kernel wants on
  a sequence-sharded mesh (default `"contiguous"`); the base class permutes
  the inputs into it and the output back.
- `sequence_parallel`: True when the kernel shards the sequence itself
  (`ring`, `ulysses`: it receives its local query and key shards and
  communicates); otherwise it gets its query shard and all-gathered keys.
- `resolve(request)`: the class that serves the call (itself; `auto`
  returns the mechanism it picks, which receives `config.for_mechanism(
  its config_class)`).

A registered mechanism gets the conformance battery (`tests/
test_conformance.py`) for free: its capabilities decide which cases it must
run against the reference and which it must refuse.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flexible_attention.core import cache as cache_lib
from flexible_attention.core import dropout as dropout_lib
from flexible_attention.core import inputs as inputs_lib
from flexible_attention.core.types import AttentionOutput
from flexible_attention.core.types import BlockSizes
from flexible_attention.core.types import KernelOutput
from flexible_attention.core.cache import KVCache
from flexible_attention.mechanisms import registry
from flexible_attention.mechanisms.config import AttentionConfig
# Mechanisms subclass `base.InterpretConfig`; it lives in `config.py`.
# pylint: disable-next=unused-import
from flexible_attention.mechanisms.config import InterpretConfig
from flexible_attention.sharding import shard as shard_lib
from flexible_attention.sharding.mesh import PartitionAxis


def feature_refusal(mechanism: str, feature: str, what: str) -> str:
  """The refusal of a feature, naming the mechanisms that support it."""
  others = [m for m in registry.mechanisms_supporting(feature)
            if m != mechanism]
  return (f"{what} is not supported by mechanism {mechanism!r}; mechanisms "
          f"that support it: {', '.join(others) or 'none'}.")


class _Keys(NamedTuple):
  """The key side of a call once the KV cache, if any, is attached."""

  key: jax.Array  # [B, Sk, Hkv, D]
  value: jax.Array  # [B, Sk, Hkv, Dv]
  kv_lengths: jax.Array | None  # [B]
  q_positions: jax.Array | None  # [B, Sq]
  kv_positions: jax.Array | None  # [B, Sk]
  uses_cache: bool = False
  cache: Any = None  # The updated cache to return.
  overflow: jax.Array | None = None  # [B]: new tokens did not fit.
  q_valid: jax.Array | None = None  # [B, Sq]: slots holding a new token.
  pages: Any = None  # The updated paged cache, for kernels that read pages.

  @property
  def explicit_positions(self) -> bool:
    return self.q_positions is not None or self.kv_positions is not None


class AttentionModule(hk.Module):
  """Multi-head attention over given queries, keys and values.

  Computes, per query head `h` and its KV head `h // (H // Hkv)`:

    out = dropout(softmax(mod(cap(q kᵀ * sm_scale) + bias), over visible
                  keys)) v

  with visibility from causal / sliding window / segment ids / kv lengths /
  mask / `mask_mod`, `mod` the user's `score_mod` (if any), positions
  aligned bottom-right by default, and a query that sees no key giving
  zeros. The semantics are those of DESIGN.md; every subclass
  computes the same function and refuses clearly what it cannot (see the
  module docstring for what a subclass overrides).

  Glossary of shapes:
  - B: batch size.
  - Sq: query sequence length.
  - Sk: key/value sequence length (the cache length L when decoding).
  - H: number of query heads.
  - Hkv: number of key/value heads (H is a multiple of it).
  - D: query/key head size.
  - Dv: value head size.
  """

  mechanism: ClassVar[str] = "base"
  capabilities: ClassVar[registry.Capabilities] = registry.Capabilities()
  # Records replacing `capabilities` on one platform, where the mechanism
  # runs other kernels (e.g. `flash` on TPU): platform -> Capabilities.
  platform_capabilities: ClassVar[dict[str, registry.Capabilities]] = {}
  # The options record; a mechanism with options of its own subclasses
  # `AttentionConfig` (adding fields with defaults) and names it here.
  config_class: ClassVar[type] = AttentionConfig
  # Whether `make_kernel`'s kernel shards the sequence itself (ring); other
  # kernels get their query shard and all-gathered keys on a sequence mesh.
  sequence_parallel: ClassVar[bool] = False

  def __init__(
      self,
      num_heads: int,
      head_dim: int,
      *,
      num_kv_heads: int | None = None,
      value_dim: int | None = None,
      sm_scale: float | None = None,
      dropout_rate: float = 0.0,
      logits_soft_cap: float | None = None,
      sliding_window: int | tuple[int, int] | None = None,
      dtype: Any = None,
      precision: Any = None,
      softmax_dtype: Any = jnp.float32,
      block_sizes: BlockSizes | None = None,
      mesh: jax.sharding.Mesh | None = None,
      partition_axis: PartitionAxis | None = None,
      decode: bool = False,
      max_cache_length: int | None = None,
      score_mod: Callable | None = None,
      mask_mod: Callable | None = None,
      name: str | None = None,
      **mechanism_options: Any,
  ):
    """Initialises the module.

    Args:
      num_heads: H, the number of query heads.
      head_dim: D, the query/key head size.
      num_kv_heads: Hkv (default H); H must be a multiple of it.
      value_dim: Dv (default D).
      sm_scale: softmax scale (default `D ** -0.5`).
      dropout_rate: attention dropout rate in [0, 1), applied when called
        with `deterministic=False` (needs an rng: `hk.next_rng_key()`).
      logits_soft_cap: `c` in `s = c * tanh(s / c)`, or None.
      sliding_window: `int w` (`(w, 0)` with causal, `(w, w)` without) or
        `(left, right)`: a key is visible iff
        `q_pos - left <= kv_pos <= q_pos + right`.
      dtype: compute dtype; q, k and v are cast to it and the output is cast
        back to the query's dtype. Default: the inputs' dtype.
      precision: matmul precision (`jax.lax.Precision`) for mechanisms that
        run XLA matmuls.
      softmax_dtype: dtype of logits and softmax statistics (float32).
      block_sizes: `fa.BlockSizes` for mechanisms that tile.
      mesh: a `jax.sharding.Mesh` to shard the computation over.
      partition_axis: `fa.PartitionAxis` mapping attention axes to mesh axes
        (default `fa.PartitionAxis()`).
      decode: keep a KV cache in Haiku state (use `hk.transform_with_state`).
      max_cache_length: L, the number of cache slots when `decode=True`.
      score_mod: `score_mod(score, batch, head, q_pos, kv_pos, *mod_args)
        -> score`, applied to the logits after soft cap and bias; and
      mask_mod: `mask_mod(batch, head, q_pos, kv_pos, *mod_args) -> bool`,
        and-ed with the structured mask: pure JAX functions called on
        broadcast arrays (the contract: `core/mods.py`), their arrays
        passed per call as `mod_args`.
      name: module name.
      **mechanism_options: options of this mechanism only (the extra fields
        of its `config_class`, e.g. `ring`'s `layout`).
    """
    super().__init__(name=name)
    own = self.config_class.own_fields()
    unknown = set(mechanism_options) - set(own)
    if unknown:
      raise TypeError(
          f"mechanism {self.mechanism!r} got unknown options "
          f"{sorted(unknown)}; its own options: {sorted(own) or 'none'}.")
    self.config = self.config_class(
        **mechanism_options,
        num_heads=num_heads, head_dim=head_dim,
        num_kv_heads=num_heads if num_kv_heads is None else num_kv_heads,
        value_dim=value_dim, sm_scale=sm_scale, dropout_rate=dropout_rate,
        logits_soft_cap=logits_soft_cap, sliding_window=sliding_window,
        dtype=dtype, precision=precision, softmax_dtype=softmax_dtype,
        block_sizes=BlockSizes() if block_sizes is None else block_sizes,
        mesh=mesh,
        partition_axis=(PartitionAxis() if partition_axis is None else
                        partition_axis),
        decode=decode, max_cache_length=max_cache_length,
        score_mod=score_mod, mask_mod=mask_mod)
    # The mechanism that served the last call (differs from `mechanism` for
    # `auto`); for logs and comparisons.
    self.selected_mechanism = None

  # --- The hooks (see the module docstring) ---------------------------------

  @classmethod
  def make_kernel(cls, config: AttentionConfig,
                  request: registry.AttentionRequest) -> shard_lib.Kernel:
    """Returns the mechanism's pure kernel for a call. Subclasses implement.

    Args:
      config: the module's options, as this mechanism's `config_class`.
      request: the static description of the call (already accepted by
        `unsupported_reason`).

    Returns:
      A pure function `(AttentionInputs, Dropout | None) -> KernelOutput`
      (no `hk.*` inside) that computes the semantics on whatever part of the
      problem it is given (all of it, or one shard).
    """
    raise NotImplementedError

  @classmethod
  def capabilities_for(cls, request: registry.AttentionRequest
                      ) -> registry.Capabilities:
    """The record that decides `request`: its platform's entry of
    `platform_capabilities` when there is one and the call runs compiled
    (not `interpret=True`, which runs the portable kernels), else
    `capabilities`."""
    if request.options.get("interpret"):
      return cls.capabilities
    return cls.platform_capabilities.get(request.platform, cls.capabilities)

  @classmethod
  def unsupported_reason(cls, request: registry.AttentionRequest
                        ) -> str | None:
    """Why this mechanism cannot serve `request` (None when it can).

    The default checks platform, dtype, features, sequence sharding, block
    size fields and `precision` against `capabilities_for(request)` (a
    platform's own record is named in the message: "on TPU, ...");
    subclasses add their own limits.
    """
    caps, name = cls.capabilities_for(request), cls.mechanism
    where = ("" if caps is cls.capabilities else
             f"on {request.platform.upper()}, ")
    platforms = cls.platforms(request)
    if request.platform not in platforms:
      return (f"mechanism {name!r} runs on {', '.join(platforms)}, not "
              f"on {request.platform!r}.")
    if request.dtype not in caps.dtypes:
      return (f"{where}mechanism {name!r} supports dtypes "
              f"{', '.join(caps.dtypes)}, not {request.dtype}.")
    for feature in inputs_lib.FEATURES:
      if feature in request.features and not caps.supports(feature):
        return where + feature_refusal(name, feature, f"feature {feature!r}")
    if request.sequence_sharded and not caps.sharded_sequence:
      return where + feature_refusal(name, "sharded_sequence",
                                     "sharding a sequence axis over the mesh")
    extra = set(request.block_size_fields) - set(caps.block_size_fields)
    if extra:
      reads = ", ".join(caps.block_size_fields) or "none"
      return (f"{where}BlockSizes fields {sorted(extra)} are not read by "
              f"mechanism {name!r} (it reads: {reads}); leave them None.")
    if not caps.precision and request.options.get("precision") is not None:
      return (f"{where}mechanism {name!r} has no matmul precision setting; "
              "leave precision=None.")
    return None

  @classmethod
  def block_size_reason(cls, request: registry.AttentionRequest
                        ) -> str | None:
    """Why the request's `BlockSizes` values cannot serve this mechanism
    (None when they can): a bad argument (`ValueError` when called), where
    `unsupported_reason` is a missing capability. Only tile constraints
    that depend on the call (e.g. the platform) live here; the rest are
    checked when the config is built."""
    del request
    return None

  @classmethod
  def poisons_overflow(cls, request: registry.AttentionRequest) -> bool:
    """Whether the kernel of this cache call makes the rows of
    `AttentionInputs.overflow` NaN itself (`inputs.poison_overflow`'s
    rule; off a mesh). False: the module does it after the kernel."""
    del request
    return False

  @classmethod
  def platforms(cls, request: registry.AttentionRequest) -> tuple[str, ...]:
    """The platforms that can serve `request`: the capabilities', or every
    platform for Pallas mechanisms built with `interpret=True` (their
    kernels then run in Pallas' interpreter)."""
    if request.options.get("interpret"):
      return ("cpu", "gpu", "tpu")
    return cls.capabilities.platforms

  @classmethod
  def token_layout(cls, config: AttentionConfig) -> str:
    """The token layout (`fa.LAYOUTS`) the kernel wants on a sequence mesh;
    the base class permutes natural-order inputs into it and back."""
    del config
    return "contiguous"

  @classmethod
  def resolve(cls, request: registry.AttentionRequest) -> type:
    """The mechanism class that serves `request` (itself, except `auto`)."""
    del request
    return cls

  # --- The call -------------------------------------------------------------

  def __call__(
      self,
      query: jax.Array,
      key: jax.Array,
      value: jax.Array,
      *,
      mask: jax.Array | None = None,
      bias: jax.Array | None = None,
      causal: bool = False,
      segment_ids: Any = None,
      kv_lengths: jax.Array | None = None,
      q_positions: jax.Array | None = None,
      kv_positions: jax.Array | None = None,
      cache: Any = None,
      q_lengths: jax.Array | None = None,
      sinks: jax.Array | None = None,
      mod_args: tuple[Any, ...] = (),
      deterministic: bool = True,
      return_weights: bool = False,
      return_lse: bool = False,
  ) -> AttentionOutput:
    """Attends `query` to `key`/`value`.

    Args:
      query: `[B, Sq, H, D]`.
      key: `[B, Sk, Hkv, D]` (with a cache: the `Sq` new keys).
      value: `[B, Sk, Hkv, Dv]` (with a cache: the `Sq` new values).
      mask: bool, broadcastable to `[B, H, Sq, Sk]`; True = visible.
      bias: float, broadcastable to `[B, H, Sq, Sk]`, added to the logits.
      causal: key `j` visible to query `i` only if `kv_pos[j] <= q_pos[i]`.
      segment_ids: `(q_ids [B, Sq], kv_ids [B, Sk])` or one `[B, S]` array
        (Sq == Sk); a key is visible only within its query's segment.
      kv_lengths: `[B]`; key `j` of row `b` is visible only if
        `j < kv_lengths[b]`.
      q_positions: `[B, Sq]` ints (default `arange(Sq) + Sk - Sq`).
      kv_positions: `[B, Sk]` ints (default `arange(Sk)`).
      cache: a `fa.KVCache` (`[B, L, Hkv, D|Dv]`) or a `fa.PagedKVCache`
        (`core/cache.py`): the new keys/values are written at each row's
        length, the queries sit at those slots (positions = token indices)
        and attend to the row's tokens (Sk = L, a paged cache's `max_pages
        * page_size`); positions and kv lengths come from the cache and must
        not be passed. A row whose new tokens do not fit gets NaN outputs.
      q_lengths: `[B]` ints in `[0, Sq]`, with a cache: the new tokens of
        each row (default all `Sq`); a row's slots from `q_lengths[b]` on
        are padding: they give zeros (lse -inf) and write nothing.
      sinks: `[H]` float sink logits: head h's softmax denominator gains
        `exp(sinks[h])` (a key with a zero value; lse counts it).
      mod_args: the extra arguments of the module's `score_mod` /
        `mask_mod` (a tuple of arrays, whole on every shard; gradients flow
        to its floating ones); only with a mod.
      deterministic: when False and `dropout_rate > 0`, applies dropout with
        a key from `hk.next_rng_key()`.
      return_weights: also return the `[B, H, Sq, Sk]` applied weights.
      return_lse: also return the `[B, H, Sq]` float32 log-sum-exp.

    Returns:
      `fa.AttentionOutput(attention_outputs [B, Sq, H, Dv], attention_weights
      [B, H, Sq, Sk] or None, cache, lse [B, H, Sq] or None)`.
    """
    for name, flag in (("deterministic", deterministic),
                       ("return_weights", return_weights),
                       ("return_lse", return_lse)):
      if not isinstance(flag, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {flag!r}.")
    out_dtype = getattr(query, "dtype", None)
    if self.config.dtype is not None:
      query, key, value = (jnp.asarray(x).astype(self.config.dtype)
                           for x in (query, key, value))
    keys = self._attach_cache(
        query, _Keys(key, value, kv_lengths, q_positions, kv_positions),
        cache, segment_ids, q_lengths)
    inputs = self._canonicalize(query, keys, mask=mask, bias=bias,
                                causal=causal, segment_ids=segment_ids,
                                sinks=sinks, mod_args=mod_args)
    apply_dropout = self.config.dropout_rate > 0 and not deterministic
    request = self._request(inputs, keys, dropout=apply_dropout,
                            weights=bool(return_weights),
                            lse=bool(return_lse))
    mechanism = self._select(request)
    dropout = self._dropout() if apply_dropout else None
    kernel_poisons = (keys.overflow is not None and self.config.mesh is None
                      and mechanism.poisons_overflow(request))
    if kernel_poisons:
      # The kernel makes the overflowing rows NaN itself (no pass over the
      # output after it).
      inputs = dataclasses.replace(inputs, overflow=keys.overflow)
    result = self._run(mechanism, request, inputs, dropout)
    return _output(result, keys, out_dtype, bool(return_weights),
                   bool(return_lse), kernel_poisons)

  # --- The steps of a call ----------------------------------------------------

  def _attach_cache(self, query, keys: _Keys, cache, segment_ids,
                    q_lengths) -> _Keys:
    """Writes the new keys into the cache (explicit, or Haiku state with
    `decode=True`) and returns the cache as the call's keys (`cache_lib`);
    `keys` unchanged without a cache."""
    config = self.config
    if cache is None and not config.decode:
      if q_lengths is not None:
        raise ValueError("q_lengths counts the new tokens of each row of a "
                         "cache call; pass cache= (or build the module with "
                         "decode=True).")
      return keys
    if cache is not None and config.decode:
      raise ValueError("pass either cache= or build the module with "
                       "decode=True (Haiku state), not both.")
    for name, arg in (("kv_lengths", keys.kv_lengths),
                      ("segment_ids", segment_ids),
                      ("q_positions", keys.q_positions),
                      ("kv_positions", keys.kv_positions)):
      if arg is not None:
        raise ValueError(f"{name} cannot be combined with a KV cache: the "
                         "cache defines positions and lengths.")
    if cache is None:
      cache = self._state_cache(query, keys.key, keys.value)
    cache_lib.check(cache, query, keys.key, keys.value, q_lengths)
    new_len = keys.key.shape[1]
    q_positions, q_valid = cache_lib.query_slots(cache, new_len, q_lengths)
    new_cache, overflow = cache_lib.write(cache, keys.key, keys.value,
                                          q_lengths)
    key, value = cache_lib.dense_view(new_cache)
    batch, length = key.shape[:2]
    kv_positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                    (batch, length))
    pages = new_cache if isinstance(new_cache, cache_lib.PagedKVCache) else (
        None)
    kv_lengths = new_cache.lengths
    if config.decode:
      hk.set_state("cached_keys", new_cache.keys)
      hk.set_state("cached_values", new_cache.values)
      hk.set_state("cache_lengths", new_cache.lengths)
      new_cache = None
    return _Keys(key, value, kv_lengths, q_positions, kv_positions,
                 uses_cache=True, cache=new_cache, overflow=overflow,
                 q_valid=None if q_lengths is None else q_valid, pages=pages)

  def _canonicalize(self, query, keys: _Keys, **call
                   ) -> inputs_lib.AttentionInputs:
    """The call's `AttentionInputs`, checked against the module's sizes."""
    config = self.config
    inputs = inputs_lib.canonicalize(
        query, keys.key, keys.value, kv_lengths=keys.kv_lengths,
        q_positions=keys.q_positions, kv_positions=keys.kv_positions,
        sliding_window=config.sliding_window, score_mod=config.score_mod,
        mask_mod=config.mask_mod, **call)
    self._check_dims(inputs.dims)
    return dataclasses.replace(inputs, pages=keys.pages)

  def _request(self, inputs: inputs_lib.AttentionInputs, keys: _Keys,
               **flags: bool) -> registry.AttentionRequest:
    """The static description of the call (`flags`: dropout, weights,
    lse)."""
    config = self.config
    sequence_sharded = config.mesh is not None and shard_lib.check_partition(
        config.mesh, config.partition_axis, inputs)
    features = inputs_lib.used_features(
        inputs, explicit_positions=keys.explicit_positions,
        softcap=config.logits_soft_cap is not None, cache=keys.uses_cache,
        **flags)
    return registry.AttentionRequest(
        dims=inputs.dims, dtype=np.dtype(inputs.query.dtype).name,
        platform=self._platform(), features=features,
        block_size_fields=config.block_sizes.set_fields(),
        block_sizes=config.block_sizes, sequence_sharded=sequence_sharded,
        window=inputs.visibility.window, options=config.request_options())

  def _select(self, request: registry.AttentionRequest) -> type:
    """The mechanism class that serves `request`; raises its refusal."""
    mechanism = self.resolve(request)
    self.selected_mechanism = mechanism.mechanism
    reason = mechanism.unsupported_reason(request)
    if reason is not None:
      raise NotImplementedError(reason)
    reason = mechanism.block_size_reason(request)
    if reason is not None:
      raise ValueError(f"mechanism {mechanism.mechanism!r}: {reason}")
    return mechanism

  def _dropout(self) -> dropout_lib.Dropout:
    rng = hk.maybe_next_rng_key()
    if rng is None:
      raise ValueError(
          f"dropout_rate={self.config.dropout_rate} with deterministic=False "
          "needs a random key: pass an rng to the transformed function's "
          "apply (or call with deterministic=True).")
    return dropout_lib.make_dropout(rng, self.config.dropout_rate)

  def _run(self, mechanism: type, request: registry.AttentionRequest,
           inputs: inputs_lib.AttentionInputs,
           dropout: dropout_lib.Dropout | None) -> KernelOutput:
    """Runs the mechanism's kernel, under `shard_map` on a mesh."""
    config = self.config.for_mechanism(mechanism.config_class)
    kernel = mechanism.make_kernel(config, request)
    if config.mesh is None:
      return kernel(inputs, dropout)
    # On a mesh, kernels read a paged cache through its dense view.
    return shard_lib.run_sharded(
        kernel, config.mesh, config.partition_axis,
        dataclasses.replace(inputs, pages=None), dropout,
        layout=(mechanism.token_layout(config) if request.sequence_sharded
                else "contiguous"),
        return_weights="weights" in request.features,
        return_lse="lse" in request.features,
        gather_keys=not mechanism.sequence_parallel)

  # --- Helpers ------------------------------------------------------------

  def _platform(self) -> str:
    if self.config.mesh is not None:
      return self.config.mesh.devices.flat[0].platform
    return jax.default_backend()

  def _check_dims(self, dims: inputs_lib.AttentionDims):
    config = self.config
    expected = (("H (query heads)", dims.num_heads, config.num_heads),
                ("D (head size)", dims.head_dim, config.head_dim),
                ("Hkv (KV heads)", dims.num_kv_heads, config.num_kv_heads),
                ("Dv (value size)", dims.value_dim,
                 config.value_dim or config.head_dim))
    for what, got, want in expected:
      if got != want:
        raise ValueError(f"{self.mechanism}: the module was built for "
                         f"{what} = {want}, the inputs have {got}.")

  def _state_cache(self, query, key, value) -> KVCache:
    batch = query.shape[0]
    length = self.config.max_cache_length
    init = lambda shape, dtype: jnp.zeros(shape, dtype)
    return KVCache(
        keys=hk.get_state("cached_keys", (batch, length) + key.shape[2:],
                          key.dtype, init=init),
        values=hk.get_state("cached_values", (batch, length) + value.shape[2:],
                            value.dtype, init=init),
        lengths=hk.get_state("cache_lengths", (batch,), jnp.int32, init=init))


def _output(result: KernelOutput, keys: _Keys, out_dtype,
            return_weights: bool, return_lse: bool,
            kernel_poisons: bool) -> AttentionOutput:
  """The call's `AttentionOutput` from its kernel's: padded query slots
  (`q_lengths`) give zeros (weights 0, lse -inf), and rows whose new tokens
  did not fit the cache give NaN in every slot, padded or not (here, or in
  the kernel when `kernel_poisons`)."""
  out = result.out.astype(out_dtype)  # [B, Sq, H, Dv]
  weights = result.weights if return_weights else None  # [B, H, Sq, Sk]
  lse = result.lse if return_lse else None  # [B, H, Sq]
  if return_lse and lse is None:
    raise RuntimeError("the mechanism's kernel returned no log-sum-exp "
                       "although its capabilities say it does.")
  if keys.q_valid is not None:
    valid = keys.q_valid  # [B, Sq]
    if kernel_poisons:  # Keep the kernel's NaN rows whole.
      valid = valid | keys.overflow[:, None]
    out = jnp.where(valid[:, :, None, None], out, 0)
    if weights is not None:
      weights = jnp.where(valid[:, None, :, None], weights, 0)
    if lse is not None:
      lse = jnp.where(valid[:, None, :], lse, -jnp.inf)
  # Rows whose new tokens did not fit the cache: what did not fit was
  # dropped, so their result would be wrong. NaN says so (unless the kernel
  # did).
  if not kernel_poisons:
    out, lse = inputs_lib.poison_overflow(out, lse, keys.overflow)
  return AttentionOutput(attention_outputs=out, attention_weights=weights,
                         cache=keys.cache, lse=lse)
