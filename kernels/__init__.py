"""Triton kernels, each beside the pure-torch reference it must match. Triton is imported lazily."""
