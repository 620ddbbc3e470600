"""`fa.compare_attentions` and the absl scripts built on it."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import flexible_attention as fa
from flexible_attention.core.types import KernelOutput
from flexible_attention.mechanisms import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def wrong_mechanism():
  """A registered mechanism that returns a slightly wrong output."""

  @fa.register_mechanism("test_wrong")
  class Wrong(fa.AttentionModule):
    capabilities = fa.Capabilities()

    @classmethod
    def make_kernel(cls, config, request):
      vanilla = registry.get_mechanism("vanilla").make_kernel(config, request)
      return lambda inputs, dropout: KernelOutput(
          vanilla(inputs, dropout).out * 1.01)

  yield "test_wrong"
  del registry._REGISTRY["test_wrong"]  # pylint: disable=protected-access


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
  env = dict(os.environ, PYTHONPATH=ROOT)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
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
  for report in results["reports"]:
    names = [row["mechanism"] for row in report["rows"]]
    assert names == list(fa.available_mechanisms())
    statuses = {row["mechanism"]: row["status"] for row in report["rows"]}
    assert statuses["vanilla"] == statuses["blockwise"] == "ok"


def test_benchmark_script_checks_before_timing(tmp_path):
  _run_script(
      "scripts/benchmark.py", "--config=configs/benchmark.py",
      "--config.sequence_lengths=(64, 96)", "--config.check_rows=16",
      "--config.repeats=1", f"--config.output_dir={tmp_path}")
  results = json.loads((tmp_path / "cpu.json").read_text())
  rows = results["rows"]
  assert [(r["mechanism"], r["sequence_length"]) for r in rows] == [
      ("vanilla", 64), ("blockwise", 64), ("vanilla", 96), ("blockwise", 96)]
  for row in rows:
    assert row["status"] == "ok"
    assert row["out_error"] < 1e-5 and row["grad_error"] < 1e-5
  assert results["environment"]["jax_version"] == jax.__version__


def test_readme_support_table_is_generated_from_the_registry():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  assert fa.support_table() in readme, (
      "README.md's mechanism table is stale; paste fa.support_table().")
