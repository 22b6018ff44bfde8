"""The ops on plain tensors, for users who manage their own parameters."""

from .ops.spectral_norm import spectral_norm
from .ops.weight_norm import weight_norm

__all__ = ["spectral_norm", "weight_norm"]
