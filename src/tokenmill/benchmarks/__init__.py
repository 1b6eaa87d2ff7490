"""Benchmarks that compare tokenmill with a baseline side by side, in one run."""
