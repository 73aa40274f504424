"""Servers the benchmark sets beside lstm-serve, driven through the same native API."""
