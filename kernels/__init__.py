"""Fused kernels for makemore: ``cross_entropy`` (kernels/loss.py; kernels/README.md has the layout)."""

from .loss import cross_entropy

__all__ = ["cross_entropy"]
