"""Benchmarks (``defocus-vlm bench``): kernels, encoders, streaming, and the timing they share."""
