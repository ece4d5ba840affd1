"""Triton kernels and their launchers (installed as ``hybridops.kernels``)."""
