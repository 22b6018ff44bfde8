"""The ops on plain tensors, for users who manage their own parameters."""

from .ops.weight_norm import weight_norm

__all__ = ["weight_norm"]
