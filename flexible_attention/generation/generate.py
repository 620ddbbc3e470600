"""Greedy generation with a KV cache, checked against a full forward.

`run_generation(config)` (called by `scripts/generate.py`) builds the small
transformer of `generation/transformer.py`, prefills a random prompt, then
greedily decodes `new_tokens` tokens in one jitted `lax.fori_loop` whose
cache is donated (`donate_argnums`), so each step writes its token into the
cache in place. It does so for each chosen mechanism and cache kind:

- `dense`: `fa.MultiHeadAttention(..., decode=True)`, the cache in Haiku
  state (`hk.transform_with_state`);
- `paged`: one `fa.PagedKVCache` per layer passed as `cache=` and carried
  through the loop; pages come from `allocate_pages` (the job is the caller
  that owns page allocation): row b gets `ceil(L / page_size)` pages,
  numbered in order (`contiguous`) or a random permutation of the pool
  (`shuffled`) (`core.cache.allocate_pages`, the decode benchmark's
  allocator too).

It reports tokens per second (compile time apart) and checks the logits
produced step by step (the prefill's last, then one per decoded token)
against the logits of one causal forward over the final sequence with the
same parameters and no cache (`check_mechanism`), to `LOGIT_TOLERANCE` of
the model's dtype. With `attention_fraction`, it also times one decoding step
of the whole model and the same step's attention calls alone (each jitted,
the caches donated and fed back), and reports their ratio.

Glossary of shapes:
- B: batch size; T: prompt tokens; N: decoded tokens; V: vocabulary size.
- L: cache length (tokens a row can hold; `max_length`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from typing import Any, Callable

from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flexible_attention import timing
from flexible_attention.comparison.compare import format_table
from flexible_attention.comparison.compare import format_value
from flexible_attention.comparison.compare import relative_error
from flexible_attention.comparison.decode import FedBack
from flexible_attention.core.cache import allocate_pages
from flexible_attention.core.cache import init_paged_cache
from flexible_attention.core.cache import KVCache
from flexible_attention.generation.transformer import Transformer
from flexible_attention.generation.transformer import TransformerConfig
from flexible_attention.mechanisms import registry
from flexible_attention.sharding.mesh import make_mesh

CACHE_KINDS = ("dense", "paged")

# max |step-by-step logits - full forward's| / max |full forward's|. The two
# runs differ only in summation order (cache vs no cache, decode vs training
# kernels); in bfloat16 the residual stream rounds differently through the
# layers, hence the looser bound.
LOGIT_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def cache_lengths(cache) -> jax.Array:
  """`[B]` tokens held, from either kind's cache (the first layer's)."""
  if isinstance(cache, dict):  # Haiku state: {module: {"cache_lengths"...}}.
    return cache[min(cache)]["cache_lengths"]
  return cache[0].lengths


def with_lengths(cache, lengths):
  """`cache` with every layer's lengths set to `lengths [B]`."""
  if isinstance(cache, dict):
    return {name: {**entries, "cache_lengths": lengths}
            for name, entries in cache.items()}
  return [c._replace(lengths=lengths) for c in cache]


def explicit_caches(cache) -> list[Any]:
  """One explicit cache per layer (Haiku state becomes `fa.KVCache`s)."""
  if isinstance(cache, dict):
    return [KVCache(entries["cached_keys"], entries["cached_values"],
                    entries["cache_lengths"])
            for _, entries in sorted(cache.items())]
  return list(cache)


def _jit_compiled(fn, *args, donate_argnums=()):
  """`(compiled, seconds)`: `fn` jitted (donating those arguments), lowered
  and compiled for `args`."""
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
  return compiled, time.perf_counter() - start


class Generator:
  """Prefill and greedy decoding of one model with one kind of cache.

  `init_cache()`, `prefill(...)` and `decode(...)` are the job's steps, each
  a jitted program with the cache donated; `generate` runs them in order,
  and a test may change the cache between them.
  """

  def __init__(self, model: TransformerConfig, kind: str, *, batch_size: int,
               page_size: int = 16, page_order: str = "shuffled",
               seed: int = 0):
    if kind not in CACHE_KINDS:
      raise ValueError(f"kind must be one of {CACHE_KINDS}, got {kind!r}.")
    self.model, self.kind, self.batch_size = model, kind, batch_size
    self.page_size, self.page_order, self.seed = page_size, page_order, seed
    self.compile_seconds: dict[str, float] = {}
    self._compiled: dict[Any, Any] = {}
    if kind == "dense":
      self._transformed = hk.transform_with_state(
          lambda tokens, positions: Transformer(model, "dense")(
              tokens, positions, last=1))
    else:
      self._transformed = hk.without_apply_rng(hk.transform(
          lambda tokens, positions, caches: Transformer(model, "paged")(
              tokens, positions, caches, last=1)))

  def apply(self, params, cache, tokens, positions):
    """`(logits [B, 1, V] of the last token, new cache)`."""
    if self.kind == "dense":
      return self._transformed.apply(params, cache, None, tokens, positions)
    return self._transformed.apply(params, tokens, positions, cache)

  def init_cache(self):
    """An empty cache for every layer (L = the model's `max_length`)."""
    m, batch = self.model, self.batch_size
    if self.kind == "dense":
      tokens = jnp.zeros((batch, 1), jnp.int32)
      shapes = jax.eval_shape(self._transformed.init, jax.random.PRNGKey(0),
                              tokens, tokens)[1]
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    pages_per_row = -(-m.max_length // self.page_size)
    table = allocate_pages(batch, pages_per_row, order=self.page_order,
                           seed=self.seed)
    # Every layer gets buffers of its own (the cache is donated: one buffer
    # must not be two arguments), the same page ids.
    return [init_paged_cache(
        batch * pages_per_row, self.page_size, m.num_kv_heads, m.head_dim,
        jnp.dtype(m.dtype), batch_size=batch,
        max_pages_per_row=pages_per_row)._replace(
            page_table=jnp.array(table))
            for _ in range(m.num_layers)]

  def _compile(self, name: str, fn: Callable, *args, static=()):
    """`fn` jitted with its argument 1 (the cache) donated, compiled once per
    argument shapes (the compile time added to `compile_seconds[name]`)."""
    key = (name, static) + tuple(
        (x.shape, x.dtype) for x in jax.tree.leaves(args[2:]))
    if key not in self._compiled:
      self._compiled[key], seconds = _jit_compiled(fn, *args,
                                                   donate_argnums=(1,))
      self.compile_seconds[name] = (self.compile_seconds.get(name, 0.0) +
                                    seconds)
    return self._compiled[key]

  def prefill(self, params, cache, prompt, *, chunk: int | None = None):
    """Appends `prompt [B, T]` to `cache` (in chunks of `chunk` tokens).

    Returns:
      `(logits [B, V] of the prompt's last token, the new cache)`.
    """
    length = prompt.shape[1]
    chunk = chunk or length
    start, logits = 0, None
    while start < length:
      tokens = prompt[:, start:start + chunk]
      positions = jnp.broadcast_to(
          jnp.arange(start, start + tokens.shape[1], dtype=jnp.int32),
          tokens.shape)
      prefill = self._compile("prefill", self.apply, params, cache, tokens,
                              positions)
      logits, cache = prefill(params, cache, tokens, positions)
      start += tokens.shape[1]
    return logits[:, -1], cache

  def decode(self, params, cache, token, steps: int):
    """Greedy decoding of `steps` tokens in one jitted `fori_loop`.

    Args:
      params: the model's parameters.
      cache: the cache after the prompt (donated).
      token: `[B]` the first token to feed (the prompt's argmax).
      steps: N, tokens fed (each at its row's cache length).

    Returns:
      `(logits [B, N, V] float32, tokens [B, N] int32, the new cache)`: step
      i feeds `token` i (the input's, then each step's argmax), at position
      `lengths + i`, and its logits give token i + 1 (`tokens[:, i]`).
    """
    return self.compile_decode(params, cache, token, steps)(params, cache,
                                                            token)

  def compile_decode(self, params, cache, token, steps: int):
    """The compiled program of `decode(params, cache, token, steps)`."""
    return self._compile("decode", functools.partial(self._decode,
                                                     steps=steps),
                         params, cache, token, static=steps)

  def _decode(self, params, cache, token, *, steps):
    vocab = self.model.vocab_size
    batch = token.shape[0]

    def body(i, carry):
      cache, token, all_logits, all_tokens = carry
      positions = cache_lengths(cache)[:, None]  # [B, 1]
      logits, cache = self.apply(params, cache, token[:, None], positions)
      logits = logits[:, 0]  # [B, V]
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      return (cache, token, all_logits.at[:, i].set(logits),
              all_tokens.at[:, i].set(token))

    init = (cache, token.astype(jnp.int32),
            jnp.zeros((batch, steps, vocab), jnp.float32),
            jnp.zeros((batch, steps), jnp.int32))
    cache, _, logits, tokens = jax.lax.fori_loop(0, steps, body, init)
    return logits, tokens, cache

  def step_fn(self) -> Callable:
    """`(params, cache, token [B]) -> (logits [B, 1, V], cache)`: one
    decoding step at `lengths - 1` (the last slot rewritten), the lengths
    left unchanged, so that it can be timed repeatedly on one cache."""

    def step(params, cache, token):
      lengths = cache_lengths(cache)
      logits, new = self.apply(params, with_lengths(cache, lengths - 1),
                               token[:, None], (lengths - 1)[:, None])
      return logits, with_lengths(new, lengths)

    return step

  def attention_step_fn(self) -> Callable:
    """`(caches, q, k, v) -> (outs, caches)`: the attention calls of one
    decoding step alone (one per layer, on explicit caches), at `lengths -
    1` like `step_fn`."""
    m = self.model
    options = dict(m.attention_options)

    def attend(caches, q, k, v):
      outs, new = [], []
      for i, cache in enumerate(caches):
        lengths = cache.lengths
        result = registry.create_attention(
            m.mechanism, num_heads=m.num_heads, head_dim=m.head_dim,
            num_kv_heads=m.num_kv_heads, name=f"attention_{i}", **options)(
                q, k, v, cache=cache._replace(lengths=lengths - 1),
                causal=True)
        outs.append(result.attention_outputs)
        new.append(result.cache._replace(lengths=lengths))
      return outs, new

    apply = hk.without_apply_rng(hk.transform(attend)).apply
    return lambda caches, q, k, v: apply({}, caches, q, k, v)


@dataclasses.dataclass
class LogitCheck:
  """Step-by-step logits against the full forward's."""

  error: float  # max |step - full| / max |full|.
  tolerance: float  # LOGIT_TOLERANCE of the model's dtype.

  @property
  def passed(self) -> bool:
    return bool(np.isfinite(self.error) and self.error <= self.tolerance)


def full_logits(params, model: TransformerConfig, tokens, *, last: int):
  """The logits of the last `last` tokens of one causal forward over
  `tokens [B, S]` with no cache: `[B, last, V]` float32."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                               tokens.shape)
  return _full_forward(model, last)(params, tokens, positions)


@functools.lru_cache(maxsize=16)
def _full_forward(model: TransformerConfig, last: int):
  """The jitted `(params, tokens, positions) -> logits` of `full_logits`."""
  forward = hk.without_apply_rng(hk.transform(
      lambda tokens, positions: Transformer(model, "full")(
          tokens, positions, last=last)))
  return jax.jit(forward.apply)


def check_logits(step_logits, full, dtype: str) -> LogitCheck:
  """Compares `[B, N+1, V]` step-by-step logits with the full forward's."""
  return LogitCheck(relative_error(step_logits, full),
                    LOGIT_TOLERANCE[jnp.dtype(dtype).name])


@dataclasses.dataclass
class GenerationResult:
  """One (mechanism, cache kind) run of the job.

  Seconds exclude compiling (prefill: its wall time less its programs'
  compile time; decode: one run of the compiled loop). Tokens per second
  count every row: `B * T / prefill_seconds`, `B * N / decode_seconds`.
  `attention_fraction` = `attention_ms / step_ms` (`generate`).
  """

  mechanism: str
  cache: str
  status: str = "ok"
  prefill_compile_seconds: float | None = None
  decode_compile_seconds: float | None = None
  prefill_seconds: float | None = None
  decode_seconds: float | None = None
  prefill_tokens_per_second: float | None = None
  tokens_per_second: float | None = None
  logit_error: float | None = None
  logit_tolerance: float | None = None
  step_ms: float | None = None
  attention_ms: float | None = None
  attention_fraction: float | None = None


def init_params(model: TransformerConfig, *, seed: int = 0):
  """Random parameters of the model (one tree for every mode), in its dtype.

  The tree is the model's (`hk.transform(...).init` under `jax.eval_shape`);
  the values come from numpy, which costs no compilation of random number
  generators: weights `w [fan_in, fan_out]` normal over `sqrt(fan_in)`,
  embeddings normal, norms' scales one, biases and offsets zero.
  """
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  init = hk.transform(lambda tokens, positions: Transformer(model, "full")(
      tokens, positions)).init
  shapes = jax.eval_shape(init, jax.random.PRNGKey(seed), tokens, tokens)
  rng = np.random.default_rng(seed)

  def value(name, shape):
    if name == "w":
      return rng.standard_normal(shape, np.float32) / np.sqrt(shape[0])
    if name == "embeddings":
      return rng.standard_normal(shape, np.float32)
    return np.full(shape, 1.0 if name == "scale" else 0.0, np.float32)

  return {module: {name: jnp.asarray(value(name, leaf.shape), model.dtype)
                   for name, leaf in sorted(entries.items())}
          for module, entries in sorted(shapes.items())}


def generate(generator: Generator, params, prompt, new_tokens: int, *,
             check_model: TransformerConfig,
             prefill_chunk: int | None = None,
             attention_fraction: bool = False, repeats: int = 20,
             ) -> GenerationResult:
  """Prefills `prompt [B, T]`, decodes N = `new_tokens`, checks the logits.

  Args:
    generator: the model and its kind of cache.
    params: the model's parameters.
    prompt: `[B, T]` token ids, `T + N <= L`.
    new_tokens: N.
    check_model: the model config of the full forward (its mechanism).
    prefill_chunk: prefill in chunks of this many tokens (default: whole).
    attention_fraction: also time a step and its attention calls alone.
    repeats: timed samples of those (median).

  Returns:
    A `GenerationResult`; its status is `error: ...` when the check fails.
  """
  model = generator.model
  batch, length = prompt.shape
  if length + new_tokens > model.max_length:
    raise ValueError(f"prompt ({length}) + new_tokens ({new_tokens}) exceed "
                     f"the cache length L = {model.max_length}.")
  result = GenerationResult(model.mechanism, generator.kind)
  cache = generator.init_cache()
  start = time.perf_counter()
  last, cache = jax.block_until_ready(
      generator.prefill(params, cache, prompt, chunk=prefill_chunk))
  prefill_wall = time.perf_counter() - start
  result.prefill_compile_seconds = generator.compile_seconds["prefill"]
  result.prefill_seconds = prefill_wall - result.prefill_compile_seconds
  result.prefill_tokens_per_second = batch * length / result.prefill_seconds
  first = jnp.argmax(last, axis=-1).astype(jnp.int32)
  # Compile first (timed apart), then time the loop alone.
  generator.compile_decode(params, cache, first, new_tokens)
  result.decode_compile_seconds = generator.compile_seconds["decode"]
  start = time.perf_counter()
  logits, tokens, cache = jax.block_until_ready(
      generator.decode(params, cache, first, new_tokens))
  result.decode_seconds = time.perf_counter() - start
  result.tokens_per_second = batch * new_tokens / result.decode_seconds

  sequence = jnp.concatenate([prompt, first[:, None], tokens[:, :-1]], axis=1)
  full = full_logits(params, check_model, sequence, last=new_tokens + 1)
  steps = jnp.concatenate([last[:, None], logits], axis=1)  # [B, N+1, V]
  check = check_logits(steps, full, model.dtype)
  result.logit_error, result.logit_tolerance = check.error, check.tolerance
  if not check.passed:
    result.status = (f"error: step-by-step logits differ from the full "
                     f"forward's (relative error {check.error:.1e} > "
                     f"{check.tolerance:.0e})")
  if attention_fraction:
    _time_attention_fraction(generator, params, cache, tokens[:, -1], result,
                             repeats)
  return result


def _time_attention_fraction(generator: Generator, params, cache, token,
                             result: GenerationResult, repeats: int):
  """Times one decoding step and its attention calls alone (module
  docstring), on the cache after decoding."""
  m = generator.model
  step, _ = _jit_compiled(
      lambda cache, params, token: generator.step_fn()(params, cache, token),
      cache, params, token, donate_argnums=(0,))
  holder = {"cache": cache}
  step_ms = 1e3 * timing.median_seconds(FedBack(holder, step, params, token),
                                        repeats=repeats)
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), m.dtype)
  batch = token.shape[0]
  q = normal(batch, 1, m.num_heads, m.head_dim)
  k, v = (normal(batch, 1, m.num_kv_heads, m.head_dim) for _ in range(2))
  caches = explicit_caches(holder.pop("cache"))
  attend, _ = _jit_compiled(generator.attention_step_fn(), caches, q, k, v,
                            donate_argnums=(0,))
  holder = {"cache": caches}
  attention_ms = 1e3 * timing.median_seconds(FedBack(holder, attend, q, k, v),
                                             repeats=repeats)
  result.step_ms, result.attention_ms = step_ms, attention_ms
  result.attention_fraction = attention_ms / step_ms


def model_config(config, mechanism: str, *,
                 sharded: bool = True) -> TransformerConfig:
  """The job config's model, attending with `mechanism` (flash and splash
  run in Pallas' interpreter on CPU unless `config.interpret` says), its
  attention layers sharded over `config.mesh_shape` when `sharded`."""
  interpret = config.interpret
  if interpret is None:
    interpret = (jax.default_backend() == "cpu" and
                 mechanism in ("flash", "splash"))
  options = {"interpret": True} if interpret else {}
  if sharded and config.mesh_shape:
    options["mesh"] = make_mesh(mesh_shape(config.mesh_shape))
  return TransformerConfig(
      vocab_size=config.vocab_size, num_layers=config.num_layers,
      num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
      head_dim=config.head_dim, mlp_size=config.mlp_size,
      max_length=config.cache_length, model_size=config.model_size,
      mechanism=mechanism, dtype=config.dtype,
      attention_options=tuple(sorted(options.items())))


def mesh_shape(text: str) -> tuple[int, ...]:
  """`"dp,fsdp,tp,sp"` sizes (e.g. `"1,1,2,4"`) as `fa.make_mesh`'s
  `axis_dims`."""
  try:
    dims = tuple(int(n) for n in _names(text))
  except ValueError:
    dims = ()
  if len(dims) != 4 or any(d < 1 for d in dims):
    raise ValueError(f"mesh_shape must be four positive sizes (dp, fsdp, tp, "
                     f"sp), e.g. '1,1,2,4', got {text!r}.")
  return dims


def _names(text: str) -> list[str]:
  return [n.strip() for n in text.split(",") if n.strip()]


def run_generation(config) -> list[GenerationResult]:
  """Runs the job of `config` (configs/generate.py); logs a table.

  Returns:
    One `GenerationResult` per (mechanism, cache kind).

  Raises:
    RuntimeError: if any run failed its logit check or raised.
  """
  device = jax.devices()[0]
  logging.info("Generation on %s (%s), jax %s", device.device_kind,
               jax.default_backend(), jax.__version__)
  prompt_length = config.prompt_length or (config.cache_length -
                                           config.new_tokens)
  rng = np.random.default_rng(config.seed)
  prompt = jnp.asarray(rng.integers(0, config.vocab_size,
                                    (config.batch_size, prompt_length)),
                       jnp.int32)
  base = model_config(config, "vanilla", sharded=False)
  params = init_params(base, seed=config.seed)
  check_model = model_config(config, config.check_mechanism, sharded=False)
  results = []
  for mechanism in _names(config.mechanisms):
    for kind in _names(config.caches):
      generator = Generator(model_config(config, mechanism), kind,
                            batch_size=config.batch_size,
                            page_size=config.page_size,
                            page_order=config.page_order, seed=config.seed)
      try:
        result = generate(generator, params, prompt, config.new_tokens,
                          check_model=check_model,
                          prefill_chunk=config.prefill_chunk or None,
                          attention_fraction=config.attention_fraction,
                          repeats=config.repeats)
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("%s, %s cache", mechanism, kind)
        result = GenerationResult(
            mechanism, kind, status=f"error: {type(e).__name__}: "
            f"{str(e)[:300]}")
      logging.info("%s", result)
      results.append(result)
  logging.info("B = %d, prompt %d tokens, %d new tokens, L = %d, %s%s:\n%s",
               config.batch_size, prompt_length, config.new_tokens,
               config.cache_length, config.dtype,
               f", mesh {config.mesh_shape}" if config.mesh_shape else "",
               table(results))
  if config.output_path:
    write_json(config, results)
  failed = [r for r in results if r.status != "ok"]
  if failed:
    raise RuntimeError(
        "generation failed: " + "; ".join(
            f"{r.mechanism} ({r.cache}): {r.status}" for r in failed))
  return results


def table(results) -> str:
  """A fixed-width table of the results."""
  fmt = format_value
  lines = [("mechanism", "cache", "status", "logit err", "tolerance",
            "compile s", "prefill tok/s", "decode tok/s", "step ms",
            "attention ms", "attention share")]
  for r in results:
    status = r.status if len(r.status) <= 50 else r.status[:47] + "..."
    compile_s = None
    if r.prefill_compile_seconds is not None:
      compile_s = r.prefill_compile_seconds + (r.decode_compile_seconds or 0)
    lines.append((r.mechanism, r.cache, status, fmt(r.logit_error, "{:.1e}"),
                  fmt(r.logit_tolerance, "{:.0e}"), fmt(compile_s, "{:.1f}"),
                  fmt(r.prefill_tokens_per_second, "{:.0f}"),
                  fmt(r.tokens_per_second, "{:.0f}"),
                  fmt(r.step_ms, "{:.3f}"), fmt(r.attention_ms, "{:.3f}"),
                  fmt(r.attention_fraction, "{:.2f}")))
  return format_table(lines)


def write_json(config, results) -> str:
  """Writes the results with the machine and config to `output_path` (its
  `{device}` filled with the device kind); returns the path."""
  device = jax.devices()[0]
  slug = re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-")
  path = config.output_path.format(device=slug)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(dict(device_kind=device.device_kind,
                   backend=jax.default_backend(), jax_version=jax.__version__,
                   config=config.to_dict(),
                   results=[dataclasses.asdict(r) for r in results]),
              f, indent=2, default=str)
  logging.info("Wrote %s", path)
  return path
