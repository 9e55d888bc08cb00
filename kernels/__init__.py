"""Triton device code of kvtier, shipped as ``kvtier.kernels``: arithmetic only, no policy."""

__all__: list[str] = []
