"""`benchmarks/mosaic_ir.py`: its digests tell kernels apart by their IR,
whatever the source lines (the lowering runs on a CPU)."""

from __future__ import annotations

import os
import sys

from flexible_attention.kernels.flash import mosaic_bwd_rows
from flexible_attention.kernels.flash import mosaic_common
from flexible_attention.kernels.flash import mosaic_schedule

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "benchmarks"))
import mosaic_ir  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_digests_follow_the_kernels_not_the_source(monkeypatch):
  """The fused backward's call lowers the forward and the fused dK/dV
  kernel; the same call gives the same digests, and a change of the dK/dV
  step's schedule changes that kernel's digest only."""
  name = "d128_full_fused"
  forward, backward = mosaic_ir.call_digests(name)
  assert mosaic_ir.call_digests(name) == [forward, backward]
  monkeypatch.setattr(mosaic_bwd_rows, "STAGGER", False)
  changed = mosaic_ir.call_digests(name)
  assert changed[0] == forward and changed[1] != backward


def test_narrow_dkv_steps_lower_and_change_the_dkv_kernel_only(monkeypatch):
  """`mosaic_common.WIDE_DKV_STEPS` off (64-row steps at D = 64, the
  default's 128): the dK/dV kernel lowers for CUDA with them, and the
  forward and dQ kernels of the call are the default's."""
  forward, dkv, dq = mosaic_ir.call_digests("d64_causal")
  monkeypatch.setattr(mosaic_common, "WIDE_DKV_STEPS", False)
  narrow = mosaic_ir.call_digests("d64_causal")
  assert narrow[0] == forward and narrow[2] == dq and narrow[1] != dkv


def test_ranked_order_lowers_and_changes_the_forward_only(monkeypatch):
  """`mosaic_schedule.RANKED_ORDER` (the forward's tiles by rank, with segment
  ids): the forward lowers for CUDA with it and the backward's kernels are
  the ones without."""
  name = "d128_segments_dropout"
  forward, *backward = mosaic_ir.call_digests(name)
  monkeypatch.setattr(mosaic_schedule, "RANKED_ORDER", True)
  ranked, *ranked_backward = mosaic_ir.call_digests(name)
  assert ranked != forward and ranked_backward == backward


def test_ranked_bwd_order_lowers_and_changes_the_backward_only(monkeypatch):
  """`mosaic_schedule.RANKED_BWD_ORDER` (the dK/dV and dQ kernels' tiles
  by rank, with segment ids): both lower for CUDA with it, the forward is
  the one without."""
  name = "d128_segments_dropout"
  forward, dkv, dq = mosaic_ir.call_digests(name)
  monkeypatch.setattr(mosaic_schedule, "RANKED_BWD_ORDER", True)
  ranked = mosaic_ir.call_digests(name)
  assert ranked[0] == forward and ranked[1] != dkv and ranked[2] != dq
