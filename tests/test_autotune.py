"""`auto`'s measurements: the shipped winners table and `autotune=True`."""

import json

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.core.inputs import AttentionDims
from flexible_attention.mechanisms import auto
from flexible_attention.mechanisms import tuning

import helpers


def _request(platform="cpu", dtype="float32", q_len=1024, head_dim=64,
             features=("causal",)):
  dims = AttentionDims(batch=1, q_len=q_len, kv_len=q_len, num_heads=4,
                       num_kv_heads=4, head_dim=head_dim, value_dim=head_dim)
  return fa.AttentionRequest(dims=dims, dtype=dtype, platform=platform,
                             features=frozenset(features))


def test_measured_winner_goes_first_where_measured():
  # CPU, float32, D = 64, causal, S in [512, 32768]: blockwise measured
  # faster than vanilla (benchmarks/results/cpu.json), though the rule alone
  # would pick vanilla for this small score matrix.
  request = _request()
  assert auto.rule_candidates(request)[0] == "vanilla"
  assert tuning.measured_winner(request) == "blockwise"
  assert fa.select_mechanism(request) == "blockwise"
  # Outside the measured cell the rule decides.
  for other in (_request(q_len=128), _request(head_dim=32),
                _request(features=()), _request(dtype="bfloat16")):
    assert tuning.measured_winner(other) is None
    assert fa.select_mechanism(other) == auto.rule_candidates(other)[0]


def test_gpu_entries_apply_only_to_their_device_kind():
  request = _request(platform="gpu", dtype="bfloat16", q_len=4096,
                     head_dim=128)
  expected = "cudnn" if tuning._device_kind("gpu") == "NVIDIA H200" else None  # pylint: disable=protected-access
  assert tuning.measured_winner(request) == expected


def test_table_entries_name_registered_mechanisms_and_their_source():
  for entry in tuning._entries():  # pylint: disable=protected-access
    assert entry["winner"] in fa.available_mechanisms()
    assert entry["source"].startswith("benchmarks/results/")


def test_autotune_times_candidates_once_then_reads_the_cache(tmp_path,
                                                             monkeypatch):
  cache = tmp_path / "autotune.json"
  rng = helpers.rng_for("autotune")
  q, k, v = helpers.random_qkv(rng, 1, 64, 64, 4, 2, 16)

  served = []

  def forward(q, k, v):
    attention = fa.create_attention("auto", num_heads=4, head_dim=16,
                                    num_kv_heads=2, autotune=True,
                                    autotune_cache=str(cache))
    out = attention(q, k, v, causal=True).attention_outputs
    served.append(attention.selected_mechanism)
    return out

  apply = hk.without_apply_rng(hk.transform(forward)).apply
  out = apply({}, q, k, v)
  entries = json.loads(cache.read_text())
  (entry,) = entries.values()
  assert set(entry["seconds"]) == {"vanilla", "blockwise"}
  assert served == [entry["winner"]]
  assert entry["winner"] == min(entry["seconds"], key=entry["seconds"].get)
  expected = helpers.reference_vjp(q, k, v, None, call={"causal": True})
  helpers.assert_close(out, expected.out, jnp.float32, "autotuned auto")

  def no_timing(*args, **kwargs):
    raise AssertionError("timed again despite the cache")

  monkeypatch.setattr(tuning, "_time_candidate", no_timing)
  out_again = jax.jit(apply)({}, q, k, v)
  assert served == [entry["winner"]] * 2
  np.testing.assert_allclose(out_again, out, rtol=1e-6, atol=1e-6)


def test_autotune_still_refuses_what_nobody_accepts(tmp_path):
  q = jnp.ones((1, 8, 2, 8), jnp.float32)
  with pytest.raises(NotImplementedError, match="block_b"):
    hk.transform(lambda q: fa.create_attention(
        "auto", num_heads=2, head_dim=8, autotune=True,
        autotune_cache=str(tmp_path / "c.json"),
        block_sizes=fa.BlockSizes(block_b=2))(q, q, q)).init(None, q)
  assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("xla_flags,expected", [
    (None, False),
    ("", False),
    ("--xla_force_host_platform_device_count=8", False),
    ("--xla_gpu_deterministic_ops", True),
    ("--xla_gpu_deterministic_ops=true", True),
    ("--xla_gpu_deterministic_ops=1", True),
    ("--xla_gpu_deterministic_ops=false", False),
    ("--xla_gpu_exclude_nondeterministic_ops=true", True),
    # The last occurrence of a flag counts, as XLA reads them.
    ("--xla_gpu_deterministic_ops=true --xla_gpu_deterministic_ops=false",
     False),
    ("--xla_gpu_deterministic_ops=false "
     "--xla_gpu_exclude_nondeterministic_ops", True),
    ("--xla_gpu_deterministic_ops_extra=true", False),
])
def test_xla_deterministic_ops_reads_xla_flags(monkeypatch, xla_flags,
                                               expected):
  if xla_flags is None:
    monkeypatch.delenv("XLA_FLAGS", raising=False)
  else:
    monkeypatch.setenv("XLA_FLAGS", xla_flags)
  assert tuning.xla_deterministic_ops() is expected


def test_deterministic_gpu_ops_put_flash_before_cudnn(monkeypatch):
  # cuDNN's backward is deterministic only under XLA's deterministic ops,
  # where it measured slower than flash's fixed-order backward; the rule
  # then tries flash first. Off a GPU nothing changes.
  gpu = _request(platform="gpu", dtype="bfloat16", q_len=4096,
                 head_dim=128)
  cpu = _request()
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=false")
  assert auto.rule_candidates(gpu)[:2] == ("cudnn", "flash")
  assert fa.select_mechanism(gpu) == "cudnn"
  cpu_default = fa.select_mechanism(cpu)
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
  assert auto.rule_candidates(gpu)[:2] == ("flash", "cudnn")
  assert fa.select_mechanism(gpu) == "flash"
  assert fa.select_mechanism(cpu) == cpu_default
  # A feature flash lacks still goes on down the order.
  weights = _request(platform="gpu", dtype="bfloat16",
                     features=("causal", "weights"))
  assert fa.select_mechanism(weights) == "vanilla"


def test_gpu_entries_hold_in_the_xla_mode_they_were_measured_in(
    monkeypatch):
  entry = dict(platform="gpu", dtype="bfloat16", head_dim=128, causal=True,
               features=[], seq_range=[1024, 16384], winner="cudnn",
               source="benchmarks/results/test.json")
  deterministic_entry = dict(entry, winner="blockwise",
                             deterministic_ops=True)
  monkeypatch.setattr(tuning, "_entries",
                      lambda: (entry, deterministic_entry))
  request = _request(platform="gpu", dtype="bfloat16", q_len=4096,
                     head_dim=128)
  monkeypatch.setenv("XLA_FLAGS", "")
  assert tuning.measured_winner(request) == "cudnn"
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops")
  assert tuning.measured_winner(request) == "blockwise"
  monkeypatch.setattr(tuning, "_entries", lambda: (entry,))
  assert tuning.measured_winner(request) is None


def test_autotune_cache_keys_the_xla_mode_on_gpu(monkeypatch):
  cfg = auto.AutoConfig(num_heads=4, head_dim=64, num_kv_heads=4)
  gpu = _request(platform="gpu", dtype="bfloat16")
  cpu = _request()
  monkeypatch.setenv("XLA_FLAGS", "")
  keys = tuning.cache_key(gpu, cfg), tuning.cache_key(cpu, cfg)
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
  assert tuning.cache_key(gpu, cfg) != keys[0]
  assert tuning.cache_key(cpu, cfg) == keys[1]
