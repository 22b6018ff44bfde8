"""The ops on plain tensors, for users who manage their own parameters."""

from .ops.minibatch_discrimination import minibatch_discrimination
from .ops.minibatch_stddev import minibatch_stddev
from .ops.similarity import pairwise_similarity_penalty
from .ops.spectral_norm import spectral_norm, spectral_norm_group, spectral_norm_topk
from .ops.weight_norm import weight_norm

__all__ = ["minibatch_discrimination", "minibatch_stddev", "pairwise_similarity_penalty", "spectral_norm",
           "spectral_norm_group", "spectral_norm_topk", "weight_norm"]
