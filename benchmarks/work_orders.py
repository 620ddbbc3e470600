"""Candidate work orders for the persistent Mosaic forward, to time.

The forward (`mosaic_fwd`) runs `mosaic_common.WorkOrder`'s query tiles:
under a causal mask, chunks of two items (a tile and its mirror, equal in
work) dealt round-robin to the programs. With C chunks over P programs
some programs run ceil(C / P) chunks and the rest one fewer: at the
standard grid's causal cells (B·S = 16k, H·D = 2048: 1024 chunks over an
H100's 132 multiprocessors) 8 against 7.76 on average, 3% of the forward
idle in the tail.

`SnakeOrder` deals single items instead, sorted by their work (the
heaviest query tiles of every head first) and boustrophedon (programs 0
to P - 1, then P - 1 to 0, ...), so each program's items pair heavy with
light across passes: in a model of the work (tile t of a head costs t +
1 key tiles, plus one for its start) the busiest program has 1.000-1.002x
the mean work from 4k tokens up, against 1.031x; at 1k-2k the two are
equal. The cost: the programs running at once work on every head at once
(a few tiles each) instead of a few heads, so K and V are shared in L2 by
fewer programs. Calls without causal structure keep `WorkOrder`'s order.

`benchmarks/flash_ab.py --snake` times it beside this tree's order; the
kernel only calls `programs`, `count` and `item`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from flexible_attention.kernels.flash import mosaic_common


@dataclasses.dataclass(frozen=True)
class SnakeOrder(mosaic_common.WorkOrder):
  """`WorkOrder`'s interface; under a causal mask, items dealt heaviest
  first (all heads), boustrophedon over the programs."""

  @property
  def per_chunk(self) -> int:
    return 1

  def _position(self, p, n):
    """Program `p`'s place in the `n`-th pass over the programs."""
    return jnp.where(n % 2 == 0, p, self.programs - 1 - p)

  def count(self, p):
    if not self.causal:
      return super().count(p)
    passes, rest = divmod(self.items, self.programs)
    return passes + (self._position(p, passes) < rest).astype(jnp.int32)

  def item(self, p, n):
    if not self.causal:
      return super().item(p, n)
    g = n * self.programs + self._position(p, n)
    level, bh = g // (self.batch * self.heads), g % (self.batch * self.heads)
    return self.tiles - 1 - level, bh // self.heads, bh % self.heads
