"""Attention mechanisms: one module per algorithm, all in the registry.

Imported in registration order (the order of `fa.available_mechanisms()`).
"""

# pylint: disable=g-bad-import-order
from flexible_attention.mechanisms import vanilla
from flexible_attention.mechanisms import blockwise
from flexible_attention.mechanisms import cudnn
from flexible_attention.mechanisms import flash
from flexible_attention.mechanisms import splash
from flexible_attention.mechanisms import ring
from flexible_attention.mechanisms import ulysses
from flexible_attention.mechanisms import auto
