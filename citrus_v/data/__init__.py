"""Datasets: rows, synthetic phantoms."""
