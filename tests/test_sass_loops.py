"""`benchmarks/sass_loops.py` without CUDA tools: its reading of a SASS
listing (instructions, opcodes, the step loops), of an Nsight Compute page
and `--compile`'s check of its cells (a dump's PTX modules:
`test_deviceless.py`)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "benchmarks"))
import sass_loops  # pylint: disable=g-import-not-at-top,wrong-import-position

# As `cuobjdump -sass` prints it: an outer loop [0x10, 0x60] around an inner
# one [0x20, 0x50]; after EXIT a barrier wait's retry, returning into the
# inner loop by an unconditional backward branch.
LISTING = """
        Function : kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;                       /* 0x00000a0000017a02 */
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ; /* 0x00e0000004187 */
        /*0020*/                   LDL.64 R2, [R1+0x8] ;                        /* 0x0000080001027983 */
        /*0030*/              @!P2 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ; /* 0x00e0000008187 */
        /*0040*/                   STL [R1], R2 ;                               /* 0x0000000201007387 */
        /*0050*/               @P0 BRA 0x20 ;                                   /* 0xfffffffc00f00947 */
        /*0060*/              @!P1 BRA 0x10 ;                                   /* 0xfffffffc00e89947 */
        /*0070*/                   EXIT ;                                       /* 0x000000000000794d */
        /*0080*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R3], R4 ; /* 0x0000000403007 */
        /*0090*/                   BRA 0x30 ;                                   /* 0xffffff9000ec7947 */
"""


def test_opcode_drops_predicate_and_modifiers():
  assert sass_loops.opcode("@!P2 HGMMA.64x64x16.F32.BF16 R24, R24") == "HGMMA"
  assert sass_loops.opcode("@UPT LDL.64 R2, [R1+0x8]") == "LDL"
  assert sass_loops.opcode("FFMA R1, R2, R3, R4") == "FFMA"


def test_step_loops_are_the_innermost_predicated_ones_with_hgmma():
  code = sass_loops.instructions(LISTING)
  assert [address for address, _ in code] == list(range(0, 0xa0, 0x10))
  loops = sass_loops.step_loops(code)
  assert [(loop.start, loop.end) for loop in loops] == [(0x20, 0x50)]
  (loop,) = loops
  assert loop.opcodes == {"LDL": 1, "HGMMA": 1, "STL": 1, "BRA": 1}
  assert loop.size == 4


# An Nsight Compute source page as `--page source --csv` writes it (columns
# cut to those read): a wgmma wait, a barrier's retry branch after its
# PHASECHK, and a plain branch.
PAGE = '''"Kernel Name","kernel",
"Address","Source","Warp Stall Sampling (All Samples)","stall_barrier","stall_long_sb","stall_long_sb (Not Issued)"
"0x10","      WARPGROUP.DEPBAR.LE gsb0, 0x0","30","30","0","0"
"0x20","      SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR8], R2","0","0","0","0"
"0x30","      @!P1  BRA 0x90","60","0","60","60"
"0x40","      @P0   BRA 0x10","10","0","10","10"
'''


def test_stall_samples_shares_by_reason_kind_and_instruction():
  stalls = sass_loops.stall_samples(PAGE, top=2)
  assert stalls["samples"] == 100
  assert stalls["reasons"] == {"long_sb": 0.7, "barrier": 0.3}
  assert stalls["kinds"] == {"barrier wait": 0.6, "wgmma wait": 0.3,
                             "other": 0.1}
  assert [(row["address"], row["share"], row["reason"])
          for row in stalls["top"]] == [("0x30", 0.6, "long_sb"),
                                        ("0x10", 0.3, "barrier")]


def test_compile_refuses_an_unknown_cell_before_compiling():
  with pytest.raises(sass_loops.app.UsageError, match="documents"):
    sass_loops.compile_cells(["plain", "docs"], seq=128)
