"""Benchmarks of relu_doctor (not part of the installed package)."""
