"""The generation job: greedy decoding with dense and paged caches, checked."""

import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.generation import generate as gen
from flexible_attention.generation.transformer import TransformerConfig
import helpers

# One layer is enough to exercise the cache; two KV heads for four query
# heads make it grouped-query.
_MODEL = TransformerConfig(vocab_size=64, num_layers=1, num_heads=4,
                           num_kv_heads=2, head_dim=8, mlp_size=32,
                           max_length=24)
_PROMPT, _NEW = 12, 6


@pytest.fixture(scope="module")
def params():
  return gen.init_params(_MODEL, seed=0)


@pytest.fixture(scope="module")
def prompt():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.integers(0, _MODEL.vocab_size, (2, _PROMPT)),
                     jnp.int32)


_GENERATORS = {}


def _generator(mechanism, kind):
  """One generator per (mechanism, kind): its compiled programs are reused
  by the tests that use it."""
  if (mechanism, kind) not in _GENERATORS:
    _GENERATORS[mechanism, kind] = gen.Generator(
        _MODEL.with_mechanism(mechanism), kind, batch_size=2, page_size=4,
        page_order="shuffled")
  return _GENERATORS[mechanism, kind]


_RUNS = {"dense": ("vanilla", "dense"), "paged": ("blockwise", "paged")}


@pytest.mark.parametrize("mechanism, kind", list(_RUNS.values()))
def test_step_by_step_logits_match_one_full_forward(mechanism, kind, params,
                                                    prompt):
  result = gen.generate(_generator(mechanism, kind), params, prompt, _NEW,
                        check_model=_MODEL, prefill_chunk=4)
  assert result.status == "ok", result.status
  assert result.logit_error < result.logit_tolerance == 1e-4
  assert result.tokens_per_second > 0 and result.decode_compile_seconds > 0


@pytest.mark.parametrize("kind", ["dense", "paged"])
def test_a_wrong_cache_fails_the_check(kind, params, prompt):
  generator = _generator(*_RUNS[kind])
  last, cache = generator.prefill(params, generator.init_cache(), prompt,
                                  chunk=4)
  if kind == "dense":  # Forget the last prompt token.
    cache = gen.with_lengths(cache, gen.cache_lengths(cache) - 1)
  else:  # Swap the rows' pages.
    cache = [c._replace(page_table=c.page_table[::-1]) for c in cache]
  first = jnp.argmax(last, -1).astype(jnp.int32)
  logits, tokens, _ = generator.decode(params, cache, first, _NEW)
  sequence = jnp.concatenate([prompt, first[:, None], tokens[:, :-1]], 1)
  full = gen.full_logits(params, _MODEL, sequence, last=_NEW + 1)
  steps = jnp.concatenate([last[:, None], logits], 1)
  check = gen.check_logits(steps, full, "float32")
  assert not check.passed and check.error > 100 * check.tolerance


def test_allocate_pages_gives_each_row_distinct_pages():
  shuffled = gen.allocate_pages(3, 4, order="shuffled", seed=1)
  assert shuffled.shape == (3, 4) and shuffled.dtype == np.int32
  assert sorted(shuffled.ravel().tolist()) == list(range(12))
  np.testing.assert_array_equal(gen.allocate_pages(3, 4, order="contiguous"),
                                np.arange(12).reshape(3, 4))
  with pytest.raises(ValueError, match="order"):
    gen.allocate_pages(3, 4, order="random")


def test_the_prompt_and_new_tokens_must_fit_the_cache(params, prompt):
  with pytest.raises(ValueError, match="cache length"):
    gen.generate(_generator("vanilla", "dense"), params, prompt, 14,
                 check_model=_MODEL)


def test_paged_layers_own_their_buffers():
  # The decoding loop donates the caches: a buffer shared by two layers
  # would be donated twice.
  model = TransformerConfig(num_layers=3, max_length=16)
  caches = gen.Generator(model, "paged", batch_size=2, page_size=4
                        ).init_cache()
  buffers = [x.unsafe_buffer_pointer() for c in caches for x in c]
  assert len(set(buffers)) == len(buffers) == 3 * 4
  assert all((np.asarray(c.page_table) == np.asarray(caches[0].page_table)
              ).all() for c in caches)


@pytest.mark.parametrize("mechanism, kind", [("vanilla", "dense"),
                                             ("flash", "paged")])
def test_decoding_on_a_head_and_sequence_mesh(mechanism, kind, params,
                                              prompt):
  """The attention layers on tp = 2, sp = 4: chunks of 4 prompt tokens
  shard the queries, each decoded token reads the cache in shards of 6
  slots (flash: its decode kernel on each shard); the logits equal the
  unsharded full forward's."""
  options = {"mesh": fa.make_mesh((1, 1, 2, 4))}
  if mechanism == "flash":
    options["interpret"] = True
  generator = gen.Generator(_MODEL.with_mechanism(mechanism, **options),
                            kind, batch_size=2, page_size=4,
                            page_order="shuffled")
  result = gen.generate(generator, params, prompt, _NEW, check_model=_MODEL,
                        prefill_chunk=4)
  assert result.status == "ok", result.status
  assert result.logit_error < result.logit_tolerance == 1e-4


def test_the_job_config_gives_the_mesh():
  config = helpers.job_config("generate", mesh_shape="1,1,2,4")
  model = gen.model_config(config, "vanilla")
  assert dict(model.attention_options)["mesh"].shape == {
      "dp": 1, "fsdp": 1, "tp": 2, "sp": 4}
  assert not gen.model_config(config, "vanilla", sharded=False
                              ).attention_options
  config.mesh_shape = "2,4"
  with pytest.raises(ValueError, match="mesh_shape must be four positive "
                     "sizes.*'2,4'"):
    gen.model_config(config, "vanilla")
