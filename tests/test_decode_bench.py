"""The decode benchmark: cells, the XLA baseline, check before timing."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from flexible_attention.comparison import benchmark
from flexible_attention.comparison import decode
import helpers

ROOT = helpers.ROOT


def _config(**overrides):
  """The decode_cpu variant of configs/benchmark.py with `overrides`."""
  return helpers.job_config("benchmark", "decode_cpu", repeats=2, **overrides)


@pytest.fixture
def wrong_mechanism():
  """A registered mechanism whose output is 1% off."""
  with helpers.wrong_mechanism("test_wrong_decode") as name:
    yield name


@pytest.mark.parametrize("cache", ["dense", "paged16"])
def test_rows_are_checked_against_the_reference_then_timed(cache,
                                                           wrong_mechanism):
  # L = 40 does not fill a row's last page; 3 new tokens attend causally.
  cell = decode.DecodeCell(batch=2, length=40, num_heads=4, num_kv_heads=2,
                           head_dim=8, dtype="float32", cache=cache,
                           new_tokens=3)
  # The wrong row on the dense cell only (its compile is the test's cost).
  wrong = [wrong_mechanism] if cache == "dense" else []
  rows = decode.benchmark_decode_cell(["vanilla", "xla_decode"] + wrong,
                                      _config(), cell)
  by_name = {r.mechanism: r for r in rows}
  for name in ("vanilla", "xla_decode"):
    row = by_name[name]
    assert row.status == "ok", row.status
    assert row.out_error < 1e-5
    assert row.microseconds > 0 and row.compile_seconds > 0
    assert row.kv_bytes == 2 * 2 * 40 * 2 * 8 * 4
    assert row.tb_per_second == pytest.approx(
        row.kv_bytes / row.microseconds / 1e6)
    assert row.fraction_of_peak is None  # No peak known for a CPU.
  assert by_name["vanilla"].served_by == "vanilla"
  if wrong:
    assert by_name[wrong_mechanism].status.startswith(
        "error: differs from the reference")
    assert by_name[wrong_mechanism].microseconds is None


def test_the_timing_loop_computes_the_checked_call():
  """`looped` runs the checked step `calls` times (the queries chained
  through `0 * out`): the last call's output is the float32 reference's,
  and it and the cache are exactly one call's."""
  cell = decode.DecodeCell(batch=2, length=24, num_heads=4, num_kv_heads=2,
                           head_dim=8, dtype="float32", cache="paged16",
                           new_tokens=2)
  cache, q, k, v = decode.cell_inputs(cell)
  step = decode.step_fn("xla_decode", cell)
  want_out, want_cache = jax.jit(step)(cache, q, k, v)
  out, got_cache = jax.jit(decode.looped(step, 3))(cache, q, k, v)
  np.testing.assert_allclose(np.asarray(out),
                             decode.reference_output(cell, cache, q, k, v),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
  for got, want in zip(got_cache, want_cache):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_cell_whose_cache_does_not_fit_is_skipped():
  cell = decode.DecodeCell(batch=1, length=64, num_heads=2, num_kv_heads=2,
                           head_dim=8, dtype="float32", cache="dense",
                           new_tokens=1)
  rows = decode.benchmark_decode_cell(["vanilla"], _config(
      memory_fraction=1e-12), cell)
  assert rows[0].status.startswith("skipped: the cache needs")


def test_dense_and_paged_cells_are_timed_together():
  """The cells that differ only in the cache kind form one timing group
  (one by one where their caches do not fit together), and each checked
  row says which cells it was timed with."""
  cells = decode.decode_cells(_config())
  groups = decode.timing_groups(cells, budget=None)
  assert len(groups) == len(cells) // 2
  for group in groups:
    assert [cell.cache for cell in group] == ["dense", "paged16"]
    assert len({dataclasses.replace(cell, cache="") for cell in group}) == 1
  small = min(cells[:2], key=lambda cell: cell.cache_bytes)
  assert decode.timing_groups(cells[:2], budget=small.cache_bytes + 1) == [
      [cells[0]], [cells[1]]]
  pair = [decode.DecodeCell(batch=1, length=24, num_heads=2, num_kv_heads=1,
                            head_dim=8, dtype="float32", cache=cache,
                            new_tokens=1) for cache in ("dense", "paged8")]
  rows = decode.benchmark_decode_cells(["xla_decode"], _config(), pair)
  assert [r.cache for r in rows] == ["dense", "paged8"]
  for row in rows:
    assert row.status == "ok" and row.microseconds > 0
    assert row.timed_with == [cell.name for cell in pair]


def test_cells_cover_every_combination_and_count_bytes():
  cells = decode.decode_cells(_config())
  assert len(cells) == 2 * 2 * 1 * 1 * 2 * 2
  paged = [c for c in cells if c.cache == "paged16" and c.length == 200]
  assert paged[0].pages_per_row == 13
  assert paged[0].cache_bytes == paged[0].kv_bytes * 208 // 200
  assert cells[0].name == "B1 L200 H4/2 D32 dense new1"
  assert decode.DecodeCell(8, 32768, 32, 8, 128, "bfloat16", "paged128",
                           4).name == "B8 L32k H32/8 D128 paged128 new4"
  with pytest.raises(ValueError, match="paged<page size>"):
    decode.page_size_of("pages16")


def test_peak_bandwidth_by_device_kind():
  assert decode.peak_bandwidth_tbps("NVIDIA H200") == 4.8
  assert decode.peak_bandwidth_tbps("NVIDIA H100 80GB HBM3") == 3.35
  assert decode.peak_bandwidth_tbps("cpu") is None


def test_the_benchmark_runs_the_decode_variant_and_writes_json(tmp_path):
  config = _config(mechanisms="", decode_batches=(2,), decode_lengths=(48,),
                   decode_new_tokens=(1,), decode_caches="dense",
                   output_dir=str(tmp_path))
  rows = benchmark.run_benchmark(config)
  assert [(r.mechanism, r.cell, r.status) for r in rows] == [
      ("xla_decode", "B2 L48 H4/2 D32 dense new1", "ok")]
  results = json.loads((tmp_path / "cpu-decode.json").read_text())
  assert results["rows"][0]["microseconds"] == rows[0].microseconds
  assert results["environment"]["jax_version"] == jax.__version__
  assert results["environment"]["peak_hbm_tbps"] is None
  assert "TB/s" in decode.table(rows)


def test_the_write_check_reads_each_row_slots_back():
  cell = decode.DecodeCell(batch=2, length=40, num_heads=4, num_kv_heads=2,
                           head_dim=8, dtype="float32", cache="paged16",
                           new_tokens=3)
  cache, _, k, v = decode.cell_inputs(cell)
  positions = np.asarray(cache.lengths)[:, None] + np.arange(3)  # [B, n]
  key_pages, value_pages = np.array(cache.key_pages), np.array(
      cache.value_pages)
  page = np.take_along_axis(np.asarray(cache.page_table), positions // 16, 1)
  key_pages[page, positions % 16] = k
  value_pages[page, positions % 16] = v
  written = cache._replace(key_pages=key_pages, value_pages=value_pages)
  assert decode._wrote(written, positions, k, v)  # pylint: disable=protected-access
  swapped = written._replace(page_table=written.page_table[::-1])
  assert not decode._wrote(swapped, positions, k, v)  # pylint: disable=protected-access
