"""Benchmarks for vrpo: kernels against eager PyTorch and peers (``python -m benchmarks.kernels``)."""
