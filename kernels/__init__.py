"""Triton source for rlhf_fast, installed as ``rlhf_fast.kernels``; the only code that imports triton."""
