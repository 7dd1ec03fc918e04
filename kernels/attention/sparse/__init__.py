"""Attention policies: which KV pages each decode query reads (selection.py is the seam; registry.py names them)."""
