"""Pure attention kernels (no Haiku inside): functions of arrays."""
