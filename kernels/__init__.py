"""Fused kernels for makemore; see makemore.kernels.cross_entropy."""

from .cross_entropy import cross_entropy

__all__ = ["cross_entropy"]
