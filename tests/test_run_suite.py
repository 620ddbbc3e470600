"""`run_suite.plan`: which pytest processes the suite runs, in what order."""

import json
import pathlib

import run_suite


def _files(tmp_path: pathlib.Path, sizes: dict[str, int]):
  for name, size in sizes.items():
    (tmp_path / name).write_text("#" * size)
  return sorted(tmp_path / name for name in sizes)


def _names(runs):
  return [[f.name for f in run] for run in runs]


def test_long_files_alone_longest_first_and_short_ones_packed(tmp_path):
  seconds = {"a.py": 200.0, "b.py": 300.0, "c.py": 40.0, "d.py": 45.0,
             "e.py": 10.0, "f.py": 60.0, "g.py": 5.0}
  runs = run_suite.plan(_files(tmp_path, dict.fromkeys(seconds, 1)),
                        seconds)
  # f (60 s) is not short (SMALL_SECONDS: 50); d, c, e and g (45 + 40 + 10
  # + 5 = 100 s) fit in one process of PACK_SECONDS (100), longest first.
  assert _names(runs) == [["b.py"], ["a.py"], ["d.py", "c.py", "e.py",
                                               "g.py"], ["f.py"]]
  every = sorted(f.name for run in runs for f in run)
  assert every == sorted(seconds)


def test_a_file_the_record_lacks_runs_first_and_alone(tmp_path):
  seconds = {"a.py": 100.0, "c.py": 20.0}
  runs = run_suite.plan(_files(tmp_path, {"a.py": 1, "c.py": 1,
                                          "new.py": 1}), seconds)
  assert _names(runs) == [["new.py"], ["a.py"], ["c.py"]]


def test_without_a_record_sizes_rank_the_files_one_process_each(tmp_path):
  runs = run_suite.plan(_files(tmp_path, {"a.py": 10, "b.py": 300,
                                          "c.py": 50}), {})
  assert _names(runs) == [["b.py"], ["c.py"], ["a.py"]]


def test_record_mode_runs_one_process_per_file(tmp_path):
  seconds = {"a.py": 10.0, "b.py": 5.0}
  runs = run_suite.plan(_files(tmp_path, {"a.py": 1, "b.py": 1}), seconds,
                        pack=False)
  assert _names(runs) == [["a.py"], ["b.py"]]


def test_the_record_names_every_test_file():
  """A file missing from `suite_durations.json` runs alone and first, so
  the record is refreshed (`python tests/run_suite.py --record`) when a
  test file is added or removed."""
  records = json.loads(run_suite.DURATIONS.read_text())
  assert "0.10" in records  # The version CI runs.
  recorded = set(records.get(run_suite.jax_version(), records["0.10"]))
  files = {f.name for f in run_suite.TESTS.glob("test_*.py")}
  assert recorded == files, ("refresh the record: python tests/run_suite.py "
                             "--record")
