"""Attacks: one module per method (see ALGORITHMS.md)."""
