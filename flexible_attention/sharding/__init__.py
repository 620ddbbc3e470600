"""Meshes, partition axes and running kernels under `shard_map`."""
