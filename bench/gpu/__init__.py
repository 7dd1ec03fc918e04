"""Benchmarks and checks that need a CUDA GPU (not run by the CPU test suite)."""
