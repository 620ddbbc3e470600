"""Shared test helpers: random inputs, the reference call, tolerances, runners.

One place for what every test of the battery needs:

- `rng_for(name)`: a numpy generator seeded from a test/case name, so each case
  gets its own fresh random data (never zeros), reproducibly.
- `random_qkv`, `random_array`: random query/key/value and cotangents.
- `reference_vjp`: the float32 oracle (`fa.reference_attention` on the record
  built by `fa.canonicalize`) with the gradients of q, k, v (and bias) for a
  given cotangent.
- `run_mechanism`: a mechanism through `fa.create_attention` inside
  `hk.transform`, returning its output and the gradients of q, k, v (and bias)
  for the loss `sum(out * ct)`.
- `module_dropout_key`: the key a module's dropout uses for a given apply rng,
  so the reference can apply the very same dropout.
- `TOLERANCES` / `assert_close`: the comparison every test uses.

Tolerances (measured, see `assert_close`): the error of an array is
`max |actual - expected| / max |expected|` (relative to the largest reference
magnitude; absolute when the reference is all zeros), against the float32
reference computed from the very same (already rounded) inputs:

  dtype      CPU      GPU      TPU
  float32    1e-5     5e-3     2e-2   (GPU/TPU default matmul precision is
  bfloat16   1.5e-2   1.5e-2   1.5e-2  TF32 / bf16 passes: not measured here)
  float16    2e-3     2e-3     2e-3

On CPU the largest errors measured over the conformance battery (vanilla,
blockwise, ring, ulysses, auto; outputs and gradients) were 1.3e-6
(float32), 4.0e-3 (bfloat16) and 5.6e-4 (float16): the table keeps a margin
of about 4x to 8x,
while a real bug (a wrong mask, a missing scale, a flipped dropout decision)
gives errors of order 1e-2 to 1. Set `FA_TEST_ERROR_LOG=/path` to log every
comparison's error when re-measuring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import zlib
from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import flexible_attention as fa
from flexible_attention.core import dropout as dropout_lib
from flexible_attention.core.types import KernelOutput
from flexible_attention.mechanisms import registry

# --- Compilation ------------------------------------------------------------

# On CPU, compiling dominates the suite's time: the battery's jits use XLA's
# backend optimisation level 0, which roughly halves compile times. Only the
# speed of the compiled code changes, never the semantics (the tolerances
# below were measured with it). Other backends compile with their defaults.
COMPILER_OPTIONS = ({"xla_backend_optimization_level": 0}
                    if jax.default_backend() == "cpu" else None)


def jit(fn):
  """`jax.jit` with the suite's `COMPILER_OPTIONS`."""
  return jax.jit(fn, compiler_options=COMPILER_OPTIONS)


# --- Tolerances -------------------------------------------------------------

TOLERANCES = {
    "cpu": {"float32": 1e-5, "bfloat16": 1.5e-2, "float16": 2e-3},
    "gpu": {"float32": 5e-3, "bfloat16": 1.5e-2, "float16": 2e-3},
    "tpu": {"float32": 2e-2, "bfloat16": 1.5e-2, "float16": 2e-3},
}


_ERROR_LOG = os.environ.get("FA_TEST_ERROR_LOG")  # Measuring the table.


def tolerance(dtype, backend: str | None = None) -> float:
  """The relative-to-max tolerance of `dtype` on `backend` (default: now)."""
  backend = backend or jax.default_backend()
  return TOLERANCES.get(backend, TOLERANCES["gpu"])[np.dtype(dtype).name]


def relative_error(actual, expected) -> float:
  """`max |actual - expected| / max |expected|` (absolute if expected is 0)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = np.max(np.abs(expected), initial=0.0)
  err = np.max(np.abs(actual - expected), initial=0.0)
  return float(err / scale) if scale > 0 else float(err)


def to_float32(x) -> np.ndarray:
  """`x` (a JAX or numpy array of any float dtype) as a float32 numpy array,
  converted on the host: exact from bfloat16 and float16, and no op-by-op
  program for XLA to compile per shape and dtype (hundreds in the suite)."""
  return np.asarray(x).astype(np.float32)


def finite_relative_error(actual, expected) -> float:
  """`relative_error` of an `actual` that must be finite."""
  actual = to_float32(actual)
  assert np.all(np.isfinite(actual)), "non-finite values"
  return relative_error(actual, expected)


def assert_close(actual, expected, dtype, what: str):
  """Asserts finite `actual` within `tolerance(dtype)` of `expected`."""
  actual = to_float32(actual)
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
  err = relative_error(actual, expected)
  tol = tolerance(dtype)
  if _ERROR_LOG:
    with open(_ERROR_LOG, "a") as f:
      f.write(f"{np.dtype(dtype).name}\t{err:.3g}\t{what}\n")
  assert err <= tol, (f"{what}: relative-to-max error {err:.3g} > "
                      f"{tol:.3g} ({np.dtype(dtype).name})")


# --- Random inputs ------------------------------------------------------------


def rng_for(*names: Any) -> np.random.Generator:
  """A numpy generator seeded from `names` (fresh data per case,
  reproducible)."""
  return np.random.default_rng(zlib.crc32(repr(names).encode()))


def random_array(rng: np.random.Generator, shape, dtype=jnp.float32,
                 scale: float = 1.0) -> jax.Array:
  """Standard normal values (times `scale`), cast to `dtype`.

  Cast by numpy and put on the device as they are (the values
  `jnp.asarray(x, dtype)` gives, without a program compiled per shape)."""
  dtype = jax.dtypes.canonicalize_dtype(dtype)
  return jax.device_put(np.asarray(rng.standard_normal(shape) * scale, dtype))


def random_qkv(rng, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim,
               value_dim=None, dtype=jnp.float32):
  """Random `q [B, Sq, H, D]`, `k [B, Sk, Hkv, D]`, `v [B, Sk, Hkv, Dv]`.

  Queries are scaled by 2 so that softmaxes are far from uniform (a wrong
  mask or scale then shows clearly).
  """
  value_dim = value_dim or head_dim
  q = random_array(rng, (batch, q_len, num_heads, head_dim), dtype, 2.0)
  k = random_array(rng, (batch, kv_len, num_kv_heads, head_dim), dtype)
  v = random_array(rng, (batch, kv_len, num_kv_heads, value_dim), dtype)
  return q, k, v


# --- The reference ------------------------------------------------------------


def _split_call(call: dict[str, Any]):
  """Splits call keyword arguments into static ones and array ones."""
  static = {k: v for k, v in call.items()
            if isinstance(v, (bool, type(None))) or k in ("causal",)}
  arrays = {k: v for k, v in call.items() if k not in static}
  return static, arrays


def reference_vjp(q, k, v, ct, *, bias=None, call=None, sliding_window=None,
                  sm_scale=None, logits_soft_cap=None, dropout=None,
                  return_weights=False):
  """The float32 oracle, its gradients, and (optionally) its weights.

  Args:
    q, k, v: the inputs (any float dtype; the reference works in float32).
    ct: the cotangent of the output (`None`: no gradients).
    bias: differentiable bias or `None`.
    call: the other call arguments (mask, causal, segment_ids, kv_lengths,
      q_positions, kv_positions; `return_weights` and `deterministic` are
      ignored here).
    sliding_window, sm_scale, logits_soft_cap: the module options.
    dropout: a `Dropout` (see `reference_dropout`) or `None`.
    return_weights: also return the weights.

  Returns:
    A `Reference`.
  """
  call = {k: v for k, v in (call or {}).items()
          if k not in ("return_weights", "deterministic")}
  static_call, arrays = _split_call(call)
  sm_scale = q.shape[-1]**-0.5 if sm_scale is None else sm_scale
  f32 = lambda x: None if x is None else jax.device_put(to_float32(x))
  out, grads, weights, empty = _reference_fwd_bwd(
      f32(q), f32(k), f32(v), f32(bias), arrays, dropout, f32(ct),
      static_call=tuple(sorted(static_call.items())),
      sliding_window=(tuple(sliding_window)
                      if isinstance(sliding_window, list) else sliding_window),
      sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
      return_weights=return_weights)
  if grads is not None:
    grads = tuple(np.asarray(g) for g in grads if g is not None)
  return Reference(
      out=np.asarray(out), grads=grads,
      weights=None if weights is None else np.asarray(weights),
      empty_rows=np.moveaxis(np.asarray(empty), 1, 2))


# One jitted function for every reference call: calls with the same shapes
# and static configuration (common across mechanisms and meshes) reuse one
# compiled program.
@functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS,
                   static_argnames=("static_call", "sliding_window",
                                    "sm_scale", "logits_soft_cap",
                                    "return_weights"))
def _reference_fwd_bwd(q, k, v, bias, arrays, dropout, ct, *, static_call,
                       sliding_window, sm_scale, logits_soft_cap,
                       return_weights):
  """`reference_vjp`'s program: out, grads, weights and the empty rows."""

  def f(q, k, v, bias):
    inputs = fa.canonicalize(q, k, v, bias=bias, sliding_window=sliding_window,
                             **dict(static_call), **arrays)
    result = fa.reference_attention(
        inputs.query, inputs.key, inputs.value, inputs.bias,
        inputs.visibility, dropout, sm_scale=sm_scale,
        softcap=logits_soft_cap, return_weights=return_weights)
    return result.out, result.weights, jnp.isneginf(result.lse)

  (out, weights, empty), vjp = _vjp_with_aux(f, q, k, v, bias)
  grads = None
  if ct is not None:
    grads = vjp((ct, None if weights is None else jnp.zeros_like(weights)))
  return out, grads, weights, empty


def _vjp_with_aux(f, *args):
  """`jax.vjp` of `f -> (out, weights, aux)` over `(out, weights)`."""
  def split(*args):
    out, weights, aux = f(*args)
    return (out, weights), aux
  (out, weights), vjp, aux = jax.vjp(split, *args, has_aux=True)
  return (out, weights, aux), vjp


@dataclasses.dataclass
class Reference:
  """What `reference_vjp` returns (float32 numpy arrays).

  Attributes:
    out: `[B, Sq, H, Dv]`.
    grads: `(dq, dk, dv[, dbias])` or `None`.
    weights: `[B, H, Sq, Sk]` or `None`.
    empty_rows: bool `[B, Sq, H]`, the queries that see no key.
  """

  out: np.ndarray
  grads: tuple[np.ndarray, ...] | None
  weights: np.ndarray | None
  empty_rows: np.ndarray


def module_dropout_key(rng):
  """The key a module's dropout draws for `apply(..., rng=rng)`.

  The module calls `hk.next_rng_key()` exactly once per call; a transform
  that calls it once in the same position gets the same key.
  """
  return hk.transform(hk.next_rng_key).apply({}, rng)


def reference_dropout(rng, rate: float):
  """The `Dropout` the module uses for `apply(..., rng=rng)`."""
  return dropout_lib.make_dropout(module_dropout_key(rng), rate)


# --- Running a mechanism ------------------------------------------------------


@dataclasses.dataclass
class MechanismResult:
  """What `run_mechanism` returns (numpy arrays)."""

  out: np.ndarray
  grads: tuple[np.ndarray, ...] | None
  weights: np.ndarray | None
  dtype: Any


def attention_fn(mechanism: str, num_heads: int, head_dim: int,
                 num_kv_heads: int, options: dict[str, Any],
                 static_call: dict[str, Any],
                 wrap: Callable | None = None):
  """A Haiku function `(q, k, v, bias, arrays) -> AttentionOutput`."""

  def attend(q, k, v, bias, arrays):
    attn = fa.create_attention(mechanism, num_heads=num_heads,
                               head_dim=head_dim, num_kv_heads=num_kv_heads,
                               **options)
    kwargs = dict(static_call, **arrays)
    if bias is not None:
      kwargs["bias"] = bias
    return attn(q, k, v, **kwargs)

  if wrap is None:
    return attend
  return lambda *args: wrap(attend)(*args)


def run_mechanism(mechanism: str, q, k, v, ct=None, *, bias=None, call=None,
                  options=None, rng=None, use_jit: bool = True,
                  wrap: Callable | None = None) -> MechanismResult:
  """Runs `mechanism` (inside `hk.transform`) and differentiates it.

  Args:
    mechanism: a registered name.
    q, k, v: inputs.
    ct: cotangent of the output for the loss `sum(out * ct)`, or `None` for a
      forward pass only.
    bias: differentiable bias or `None`.
    call: the other call arguments (static ones like `causal` and arrays).
    options: module options for `fa.create_attention`.
    rng: the apply rng (needed for dropout).
    use_jit: whether to `jit` the forward+backward.
    wrap: a Haiku transform applied to the attention function (e.g.
      `hk.remat`).

  Returns:
    A `MechanismResult`; `grads` is `(dq, dk, dv[, dbias])`.
  """
  static_call, arrays = _split_call(call or {})
  fn = hk.transform(attention_fn(mechanism, q.shape[2], q.shape[3],
                                 k.shape[2], options or {}, static_call,
                                 wrap))

  def fwd_bwd(q, k, v, bias, arrays, ct, rng):
    def f(q, k, v, bias):
      result = fn.apply({}, rng, q, k, v, bias, arrays)
      return result.attention_outputs, result.attention_weights

    if ct is None:
      return f(q, k, v, bias), None
    (out, weights), vjp = jax.vjp(f, q, k, v, bias)
    grads = vjp((ct, None if weights is None else jnp.zeros_like(weights)))
    return (out, weights), grads

  if use_jit:
    fwd_bwd = jit(fwd_bwd)
  (out, weights), grads = fwd_bwd(q, k, v, bias, arrays, ct, rng)
  if grads is not None:
    grads = tuple(to_float32(g) for g in grads if g is not None)
  return MechanismResult(
      out=to_float32(out), grads=grads,
      weights=None if weights is None else np.asarray(weights),
      dtype=q.dtype)


def call_mechanism(mechanism: str, q, k, v, *, options=None, rng=None,
                   **call):
  """One forward call of `mechanism` (no jit): for refusals and errors."""
  def attend(q, k, v):
    attn = fa.create_attention(mechanism, num_heads=q.shape[2],
                               head_dim=q.shape[3], num_kv_heads=k.shape[2],
                               **(options or {}))
    return attn(q, k, v, **call)

  return hk.transform(attend).apply({}, rng, q, k, v)


GRAD_NAMES = ("dq", "dk", "dv", "dbias")


def assert_matches_reference(result: MechanismResult, expected_out,
                             expected_grads, what: str):
  """Compares output and every gradient of `result` with the reference."""
  assert_close(result.out, expected_out, result.dtype, f"{what}: output")
  if expected_grads is not None:
    assert result.grads is not None
    assert len(result.grads) == len(expected_grads)
    for name, got, want in zip(GRAD_NAMES, result.grads, expected_grads):
      assert_close(got, want, result.dtype, f"{what}: {name}")


@contextlib.contextmanager
def wrong_mechanism(name: str):
  """Registers `name`: `vanilla` with its output 1% off (a mechanism that
  every reference check must catch); unregistered on exit."""
  @fa.register_mechanism(name)
  class Wrong(fa.AttentionModule):  # pylint: disable=unused-variable
    capabilities = fa.Capabilities()

    @classmethod
    def make_kernel(cls, config, request):
      vanilla = registry.get_mechanism("vanilla").make_kernel(config, request)
      return lambda inputs, dropout: KernelOutput(
          vanilla(inputs, dropout).out * 1.01)

  try:
    yield name
  finally:
    del registry._REGISTRY[name]  # pylint: disable=protected-access


# `mosaic_bwd_rows`' flags that choose the schedule of the Mosaic dK/dV step.
STEP_SCHEDULE_FLAGS = ("DQ_ADD_BESIDE_DK", "DQ_LAG", "STAGGER")


def use_step_schedule(monkeypatch, flags):
  """Sets the step schedule flags named in `flags` (an iterable of
  `STEP_SCHEDULE_FLAGS`, or a "+"-separated string of them) and clears the
  others, whatever their defaults."""
  # Imported here: the Mosaic GPU modules load only for the tests that
  # set a schedule.
  from flexible_attention.kernels.flash import mosaic_bwd_rows  # pylint: disable=g-import-not-at-top
  if isinstance(flags, str):
    flags = tuple(filter(None, flags.split("+")))
  unknown = set(flags) - set(STEP_SCHEDULE_FLAGS)
  assert not unknown, unknown
  for flag in STEP_SCHEDULE_FLAGS:
    monkeypatch.setattr(mosaic_bwd_rows, flag, flag in flags)


def lower_for_cuda(fn, *args) -> str:
  """`fn`'s StableHLO for CUDA, lowered on any machine: the Pallas ->
  Triton and Mosaic GPU lowerings run, so what they refuse fails here
  (Mosaic GPU reads the device kind of an abstract H100 mesh)."""
  device = getattr(jax.sharding, "AbstractDevice", None)
  context = contextlib.nullcontext()
  if device is not None:
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device(
        device_kind="NVIDIA H100", num_cores=None, platform="gpu"))
    context = jax.sharding.use_abstract_mesh(mesh)
  with context:
    return jax.jit(fn).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_config(name: str, variant: str | None = None, **overrides):
  """`configs/<name>.py`'s `get_config(variant)` (its default variant when
  None), unlocked fields updated with `overrides`."""
  spec = importlib.util.spec_from_file_location(
      f"{name}_config", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config() if variant is None else module.get_config(
      variant)
  config.update(overrides)
  return config
