"""`fa.compare_attentions`, the benchmark rows and the absl scripts."""

import ast
import gzip
import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention import timing
from flexible_attention.comparison import baselines
from flexible_attention.comparison import cells
from flexible_attention.comparison import compare
from flexible_attention.comparison import measure
from flexible_attention.comparison import report
import helpers

ROOT = helpers.ROOT


@pytest.fixture
def wrong_mechanism():
  """A registered mechanism whose output is 1% off."""
  with helpers.wrong_mechanism("test_wrong") as name:
    yield name


def test_rows_check_every_mechanism_against_the_reference(wrong_mechanism):
  report = fa.compare_attentions(
      ["vanilla", "blockwise", "cudnn", wrong_mechanism], batch_size=2,
      sequence_length=24, kv_sequence_length=40, num_heads=4, num_kv_heads=2,
      head_dim=8, causal=True, sliding_window=9, num_segments=0,
      block_sizes=fa.BlockSizes(block_q=8, block_k=16), repeats=1)
  rows = {r.mechanism: r for r in report.rows}
  for name in ("vanilla", "blockwise"):
    row = rows[name]
    assert row.status == "ok", row.status
    assert max(row.out_error, row.dq_error, row.dk_error, row.dv_error) < 1e-5
    assert row.forward_ms > 0 and row.forward_backward_ms > 0
    assert row.compile_seconds > 0
  assert rows[wrong_mechanism].status.startswith(
      "error: differs from the reference")
  assert rows[wrong_mechanism].forward_ms is None  # Never timed.
  if jax.default_backend() != "gpu":
    assert rows["cudnn"].status.startswith("unsupported: ")
  table = report.table()
  assert all(name in table for name in rows)
  assert json.loads(report.to_json())["setup"]["kv_len"] == 40


def test_auto_row_names_the_mechanism_that_served_it():
  report = fa.compare_attentions(["auto"], batch_size=1, sequence_length=16,
                                 num_heads=2, head_dim=8, repeats=1)
  assert report.rows[0].status == "ok"
  assert report.rows[0].served_by in fa.available_mechanisms()


def _run_script(*args):
  # XLA_FLAGS: tests/conftest.py's 8 CPU devices and fast CPU compiles.
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_compare_script_writes_one_report_per_mesh(tmp_path):
  _run_script(
      "scripts/compare_attention.py", "--config=configs/compare.py",
      "--config.sequence_length=32", "--config.head_dim=8",
      "--config.repeats=1", "--config.meshes=((1, 1, 1, 1), (2, 1, 4, 1))",
      f"--config.output_dir={tmp_path}", "--config.plot=False")
  results = json.loads((tmp_path / "compare.json").read_text())
  assert [r["mesh"] for r in results["reports"]] == [
      {"dp": 1, "fsdp": 1, "tp": 1, "sp": 1},
      {"dp": 2, "fsdp": 1, "tp": 4, "sp": 1}]
  for mesh_report in results["reports"]:
    names = [row["mechanism"] for row in mesh_report["rows"]]
    assert names == list(fa.available_mechanisms())
    statuses = {row["mechanism"]: row["status"]
                for row in mesh_report["rows"]}
    assert statuses["vanilla"] == statuses["blockwise"] == "ok"


def test_benchmark_script_checks_before_timing(tmp_path):
  result = _run_script(
      "scripts/benchmark.py", "--config=configs/benchmark.py",
      "--config.sequence_lengths=(64, 96)", "--config.check_rows=16",
      "--config.repeats=1", f"--config.output_dir={tmp_path}",
      "--config.baselines=pallas_in_tree", "--config.fresh_process_peak=True",
      "--config.peak_mechanisms=blockwise", "--config.peak_lengths=(64,)")
  results = json.loads((tmp_path / "cpu.json").read_text())
  rows = results["rows"]
  assert [(r["mechanism"], r["sequence_length"]) for r in rows] == [
      (name, length) for length in (64, 96)
      for name in ("vanilla", "blockwise", "pallas_in_tree")]
  for row in rows:
    if row["mechanism"] == "pallas_in_tree":
      if jax.default_backend() != "gpu":
        assert row["status"].startswith(("unsupported: ", "unavailable: "))
      continue
    assert row["status"] == "ok"
    assert row["out_error"] < 1e-5 and row["grad_error"] < 1e-5
    assert row["memory_ratio"] == row["program_bytes"] / row["minimum_bytes"]
  assert [s["cell"] for s in results["summary"]] == [
      "S64 D64 causal", "S96 D64 causal"]
  # blockwise's fresh-process peak at S = 64 (two fresh processes) ran: a
  # failure would be logged; without memory statistics it is None.
  assert "no fresh-process peak" not in result.stderr, result.stderr[-3000:]
  if not jax.devices()[0].memory_stats():
    assert rows[1]["fresh_peak_bytes"] is None
  assert results["summary"][0]["speed_vs"]["vanilla"] > 0
  assert results["environment"]["jax_version"] == jax.__version__
  has_matplotlib = importlib.util.find_spec("matplotlib") is not None
  assert (tmp_path / "cpu.png").exists() == has_matplotlib


def test_plot_writes_a_png_and_closes_its_figure(tmp_path):
  pytest.importorskip("matplotlib")
  row = lambda mechanism, cell, length, tflops: measure.BenchmarkRow(
      mechanism=mechanism, sequence_length=length, status="ok", cell=cell,
      forward_backward_tflops=tflops)
  rows = [row("flash", "S1024 D128 causal", 1024, 100.0),
          row("flash", "S4096 D128 causal", 4096, 200.0),
          row("cudnn", "S4096 D64 full", 4096, 300.0),
          measure.BenchmarkRow(mechanism="cudnn", sequence_length=4096,
                                 status="unsupported: x", cell="S4096 D64 "
                                 "packed")]
  path = tmp_path / "plot.png"
  report.plot(rows, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  assert not plt.get_fignums()  # Closed after saving.


def test_plot_without_matplotlib_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(report.plotting, "pyplot", lambda: None)
  path = tmp_path / "plot.png"
  report.plot([measure.BenchmarkRow(
      mechanism="flash", sequence_length=64, status="ok", cell="S64 D8 full",
      forward_backward_tflops=1.0)], str(path))
  assert not path.exists()


def _benchmark_config(**overrides):
  """The cpu variant of configs/benchmark.py with `overrides`."""
  return helpers.job_config("benchmark", check_rows=16, repeats=1,
                            **overrides)


# Grouped-query and packed: K/V at the KV-head count, segment ids.
_TINY = cells.Cell(batch=2, seq_len=64, num_heads=4, num_kv_heads=2,
                       head_dim=8, causal=True, packed=True)


def test_minimum_bytes_counts_fused_inputs_outputs_and_logsumexp():
  # Q, O, dO, dQ: 2*64*4*8 = 4096 elements; K, V, dK, dV: 2048; bf16 (2 B);
  # the float32 log-sum-exp [B, H, S]: 512 elements.
  assert cells.minimum_bytes(_TINY, "bfloat16") == (
      2 * (4 * 4096 + 4 * 2048) + 4 * 512)
  assert cells.minimum_bytes(_TINY, "float32") == (
      4 * (4 * 4096 + 4 * 2048) + 4 * 512)


def _causal_visible(b, s, window, ids) -> np.ndarray:
  """`[B, S, S]`: the mask the semantics builds for a causal call with a
  sliding window or segment ids."""
  q = jnp.zeros((b, s, 1, 8))
  record = fa.canonicalize(
      q, q, q, causal=True, sliding_window=window,
      segment_ids=None if ids is None else jnp.asarray(ids))
  return np.asarray(record.visibility.dense())[:, 0]


@pytest.mark.parametrize("window, packed", [(None, False), (37, False),
                                             (None, True)])
def test_causal_pairs_count_the_visible_pairs(window, packed):
  """`cells.causal_pairs` against the visible pairs of the mask the
  semantics builds: causal, with a window, or within packed documents."""
  s, b = 4096, 2
  ids = cells.packed_segment_ids(b, s, seed=3) if packed else None
  got = cells.causal_pairs(s, window=window, segment_ids=ids)
  assert got == _causal_visible(b, s, window, ids).sum() / b
  assert (got < s * (s + 1) / 2) == (packed or window is not None)


@pytest.mark.parametrize("window, packed, blocks", [
    (None, False, (128, 128)), (37, False, (64, 32)),
    (300, False, (128, 128)), (None, True, (128, 64))])
def test_visible_tiles_count_the_tiles_with_a_visible_pair(window, packed,
                                                           blocks):
  """`cells.visible_tiles` against the tiles of the semantics' mask that
  hold a visible pair (S not a multiple of the tiles)."""
  s, b = 3000, 2  # Packed: 3 and 4 documents.
  ids = cells.packed_segment_ids(b, s, seed=1) if packed else None
  got = cells.visible_tiles(s, *blocks, window=window, segment_ids=ids)
  visible = _causal_visible(b, s, window, ids)
  bq, bk = blocks
  padded = np.pad(visible, ((0, 0), (0, -s % bq), (0, -s % bk)))
  tiles = padded.reshape(b, padded.shape[1] // bq, bq, -1, bk).any((2, 4))
  assert got == tiles.sum() / b


def test_forward_backward_program_holds_q_k_v_ct_and_returns_grads():
  forward = baselines.forward_fn("vanilla", _TINY)
  q = jnp.ones((2, 64, 4, 8), jnp.bfloat16)
  kv = jnp.ones((2, 64, 2, 8), jnp.bfloat16)
  compiled = timing.compile_fn(baselines.forward_backward_fn(forward),
                               q, kv, kv, q)
  assert compiled.fn.memory_analysis().argument_size_in_bytes == (
      2 * q.nbytes + 2 * kv.nbytes)
  assert [(o.shape, o.dtype) for o in compiled.fn.out_info] == [
      (q.shape, q.dtype), (kv.shape, kv.dtype), (kv.shape, kv.dtype)]


@pytest.mark.parametrize("name", ["vanilla", "blockwise"])
def test_benchmark_row_checks_vjp_gradients_and_reports_memory(name):
  row = measure.benchmark_one(name, _benchmark_config(), _TINY)
  assert row.status == "ok", row.status
  assert row.out_error < 1e-5 and row.grad_error < 1e-5
  assert row.forward_backward_ms > 0
  assert row.minimum_bytes == cells.minimum_bytes(_TINY, "float32")
  assert row.program_bytes > 0
  assert row.memory_ratio == row.program_bytes / row.minimum_bytes
  assert row.fresh_peak_bytes is None  # Not asked for (cpu variant).


def test_pallas_in_tree_row_is_a_clean_refusal_off_gpu():
  config = _benchmark_config()
  mha = cells.Cell(batch=1, seq_len=128, num_heads=2, num_kv_heads=2,
                       head_dim=16, causal=True)
  rows = [measure.benchmark_one("pallas_in_tree", config, cell)
          for cell in (mha, _TINY)]
  if jax.default_backend() != "gpu":
    assert rows[0].status.startswith(("unsupported: ", "unavailable: "))
  assert rows[1].status.startswith(("unsupported: ", "unavailable: "))
  if rows[1].status.startswith("unsupported: "):
    assert "grouped-query" in rows[1].status
  assert all(r.forward_ms is None for r in rows)


def test_summary_ratios_from_hand_made_rows():
  row = lambda name, cell, ms=None, status="ok", **kw: measure.BenchmarkRow(
      name, 1024, status, cell=cell, forward_backward_ms=ms, **kw)
  rows = [
      row("flash", "A", 2.0, memory_ratio=1.1, fresh_peak_ratio=1.3),
      row("cudnn", "A", 1.0),
      row("vanilla", "A", status="skipped: needs 90 GiB"),
      row("auto", "A", 1.25, served_by="cudnn"),
      row("pallas_in_tree", "A", 4.0),
      row("flash", "B", 1.0),
      row("cudnn", "B", status="unsupported: segment ids"),
      row("cudnn_dense_mask", "B", 12.0),
  ]
  a, b = report.summarize(rows)
  assert a == dict(
      cell="A", subject="flash", subject_ms=2.0,
      speed_vs=dict(cudnn=0.5, cudnn_dense_mask=None, pallas_in_tree=2.0),
      fastest="cudnn", fastest_ms=1.0, auto_served_by="cudnn",
      auto_vs_fastest=0.8, memory_ratio=1.1, fresh_peak_ratio=1.3)
  assert b["speed_vs"] == dict(cudnn=None, cudnn_dense_mask=12.0,
                               pallas_in_tree=None)
  assert (b["fastest"], b["auto_vs_fastest"]) == ("flash", None)
  lines = report.summary_table(rows).splitlines()
  assert lines[0].startswith("| cell | flash fwd+bwd ms | flash / cudnn |")
  assert lines[2] == ("| A | 2.00 | 0.50 | - | 2.00 | cudnn | 0.80 (cudnn) "
                      "| 1.10 | 1.30 |")
  assert report.summarize(rows, subject="cudnn", versus=["flash"])[0][
      "speed_vs"] == dict(flash=2.0)


def test_readme_support_table_is_generated_from_the_registry():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  assert fa.support_table() in readme, (
      "README.md's mechanism table is stale; paste fa.support_table().")


def test_timing_samples_round_robin_in_shuffled_order_and_batches_short_calls(
    monkeypatch):
  """Each sample of a short call batches several calls (so host dispatch
  does not dominate it); every round takes one sample of each compared
  call, in an order that changes from round to round."""
  log = []

  def make(name, sleep):
    def fn():
      log.append(name)
      time.sleep(sleep)
    return fn

  wait = jax.block_until_ready
  monkeypatch.setattr(jax, "block_until_ready",
                      lambda x: (log.append("|"), wait(x))[1])
  # A 20 ms sample: far above what one call of `f` takes even on a loaded
  # machine (a 1 ms sample let one slow calibration call leave it unbatched).
  calls = [(make("f", 0.0), ()), (make("a", 25e-3), ()),
           (make("b", 25e-3), ())]
  seconds = timing.median_seconds_each(calls, repeats=8, warmup=1,
                                       min_sample_seconds=20e-3)
  assert seconds[1] >= 25e-3 and seconds[2] >= 25e-3
  assert seconds[0] < 1e-3
  samples = "".join(log).split("|")[:-1]
  # Warm-up and one calibration call each, one call per wait.
  assert samples[:6] == ["f", "f", "a", "a", "b", "b"]
  rounds = [samples[i:i + 3] for i in range(6, len(samples), 3)]
  assert len(rounds) == 8
  for r in rounds:
    assert sorted(s[0] for s in r) == ["a", "b", "f"]
    assert all(len(s) == 1 for s in r if s[0] != "f")
    assert all(len(s) > 1 for s in r if s[0] == "f")  # Batched.
  assert len({tuple(s[0] for s in r) for r in rounds}) > 1  # Shuffled.

def test_reference_check_fails_a_nan_gradient_whatever_its_place():
  """One rule for `compare_attentions` and the benchmark: every error must
  be finite and within the dtype's tolerance (a NaN in any place fails)."""
  q = jnp.ones((1, 8, 2, 4))
  kv = jnp.ones((1, 8, 2, 4))
  reference = compare.reference_outputs(q, kv, kv, q, causal=True,
                                        sm_scale=0.5, rows=4)
  out, (dq, dk, dv) = reference
  assert out.shape == dq.shape == (1, 4, 2, 4) and dk.shape == (1, 8, 2, 4)
  full = lambda x: jnp.concatenate([jnp.zeros_like(x), x], axis=1)
  check = compare.check_against_reference(full(out), (full(dq), dk, dv),
                                          reference, "float32", rows=4)
  assert check.failure is None and check.grad_error == 0.0
  for bad in range(3):
    grads = [full(dq), dk, dv]
    grads[bad] = grads[bad].at[0, -1, 0, 0].set(jnp.nan)
    check = compare.check_against_reference(full(out), grads, reference,
                                            "float32", rows=4)
    assert np.isnan(check.grad_error)
    assert check.failure.startswith("error: differs from the reference")


def test_fresh_peak_does_not_import_the_benchmark_that_starts_it():
  path = os.path.join(ROOT, "flexible_attention", "comparison",
                      "fresh_peak.py")
  with open(path) as f:
    tree = ast.parse(f.read())
  imported = {f"{node.module}.{alias.name}" for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module
              for alias in node.names}
  assert not imported & {"flexible_attention.comparison.benchmark",
                         "flexible_attention.comparison.measure"}


def test_device_kernel_times_reads_a_perfetto_trace(tmp_path):
  """The device's kernels per (line, name), the host's events left out."""
  events = [
      {"ph": "M", "name": "process_name", "pid": 1,
       "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2,
       "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7,
       "args": {"name": "Stream #14(Compute)"}},
      {"ph": "X", "name": "kernel_a", "pid": 1, "tid": 7, "dur": 3.0},
      {"ph": "X", "name": "kernel_a", "pid": 1, "tid": 7, "dur": 5.0},
      {"ph": "X", "name": "kernel_b", "pid": 1, "tid": 7, "dur": 1.5},
      {"ph": "X", "name": "host_op", "pid": 2, "tid": 1, "dur": 9.0},
  ]
  path = tmp_path / "plugins" / "profile" / "run"
  path.mkdir(parents=True)
  with gzip.open(path / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  assert timing.device_kernel_times(str(tmp_path)) == {
      ("Stream #14(Compute)", "kernel_a"): [3.0, 5.0],
      ("Stream #14(Compute)", "kernel_b"): [1.5]}


def test_traced_kernel_times_traces_the_calls_after_a_warm_up():
  """`timing.traced_kernel_times` calls the program once untraced, then
  `calls` times in the trace it reads back (no device lines on a CPU)."""
  seen = []
  fn = jax.jit(lambda x: x * 2)

  def call():
    seen.append(1)
    return fn(jnp.ones(4))

  assert timing.traced_kernel_times(call, 3) == {}
  assert len(seen) == 4
