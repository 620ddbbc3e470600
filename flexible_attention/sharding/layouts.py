"""Token layouts for sequence sharding (load balancing causal attention).

Splitting a causal sequence into contiguous shards gives the last shard all
the work (its queries see every key) and the first almost none. Permuting the
tokens first balances it:

- `"zigzag"`: cut the sequence into `2n` chunks; shard `i` holds chunks `i`
  and `2n - 1 - i` (one early, one late), so every shard sees the same number
  of visible pairs (Brandon et al., 2023; Llama 3's context parallelism).
- `"striped"`: token `t` goes to shard `t % n` (Brandon et al., 2023).
- `"contiguous"`: no permutation.

The attention semantics never depend on the layout: positions, segment ids
and kv indices travel with their tokens, so any layout gives exactly the same
result. Users who permute once at the model boundary call `permute_sequence`
on their embeddings, pass `sequence_positions(...)` (for RoPE and as explicit
`q_positions` / `kv_positions`) and `unpermute_sequence` at the end.
"""

from __future__ import annotations

import numpy as np

LAYOUTS = ("contiguous", "zigzag", "striped")


def layout_permutation(layout: str, seq_len: int, num_shards: int
                      ) -> np.ndarray:
  """Indices `perm` such that `x[:, perm]` is `x` in `layout`.

  Args:
    layout: one of `LAYOUTS`.
    seq_len: S.
    num_shards: n, the number of sequence shards.

  Returns:
    int32 `[S]`: the natural position of each token of the permuted sequence.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
  if not isinstance(num_shards, int) or num_shards <= 0:
    raise ValueError(f"num_shards must be a positive int, got {num_shards!r}.")
  chunks = {"contiguous": num_shards, "zigzag": 2 * num_shards,
            "striped": num_shards}[layout]
  if seq_len % chunks:
    raise ValueError(f"layout {layout!r} over {num_shards} shards needs a "
                     f"sequence length divisible by {chunks}, got {seq_len}.")
  natural = np.arange(seq_len, dtype=np.int32)
  if layout == "contiguous":
    return natural
  if layout == "striped":
    return natural.reshape(-1, num_shards).T.reshape(-1)
  pieces = natural.reshape(2 * num_shards, -1)
  order = [j for i in range(num_shards) for j in (i, 2 * num_shards - 1 - i)]
  return pieces[order].reshape(-1)


def sequence_positions(layout: str, seq_len: int, num_shards: int
                      ) -> np.ndarray:
  """The positions of the tokens of a permuted sequence (`[S]` int32)."""
  return layout_permutation(layout, seq_len, num_shards)


def permute_sequence(x, layout: str, num_shards: int, axis: int = 1):
  """Puts the sequence axis of `x` (natural order) into `layout`."""
  perm = layout_permutation(layout, x.shape[axis], num_shards)
  return x.take(perm, axis=axis) if hasattr(x, "take") else np.take(
      x, perm, axis=axis)


def unpermute_sequence(x, layout: str, num_shards: int, axis: int = 1):
  """Inverse of `permute_sequence`: back to natural order."""
  inverse = np.argsort(layout_permutation(layout, x.shape[axis], num_shards))
  return x.take(inverse, axis=axis) if hasattr(x, "take") else np.take(
      x, inverse, axis=axis)
