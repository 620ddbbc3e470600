"""Generation: a small decoder-only transformer and its greedy decoding job."""
