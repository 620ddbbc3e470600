"""Comparing and timing mechanisms against the reference."""
