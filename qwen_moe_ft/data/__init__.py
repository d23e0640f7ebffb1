"""Rows to tokens (rows.py), tokens to packed or padded micro-batches (packing.py), micro-batches per rank
and step (loader.py)."""
