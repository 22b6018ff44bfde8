"""Triton kernels, one file per family. The launchers here have the same names, signatures and
results as the compiled ops (torch.ops.gannorm_cuda.*), so the dispatch layer treats every
kernel backend alike.

CPU tensors run under Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported.
"""

from .common import INTERPRETED, launch_count
from .minibatch_discrimination import minibatch_discrimination_bwd, minibatch_discrimination_fwd
from .minibatch_stddev import minibatch_stddev_bwd, minibatch_stddev_fwd
from .similarity import similarity_cosine_bwd, similarity_cosine_fwd, similarity_rbf_bwd, similarity_rbf_fwd
from .spectral_norm import spectral_norm_bwd, spectral_norm_fwd, spectral_norm_vector_bwd, spectral_norm_vector_fwd
from .weight_norm import weight_norm_bwd, weight_norm_fwd

__all__ = [
    "INTERPRETED",
    "launch_count",
    "minibatch_discrimination_bwd",
    "minibatch_discrimination_fwd",
    "minibatch_stddev_bwd",
    "minibatch_stddev_fwd",
    "similarity_cosine_bwd",
    "similarity_cosine_fwd",
    "similarity_rbf_bwd",
    "similarity_rbf_fwd",
    "spectral_norm_bwd",
    "spectral_norm_fwd",
    "spectral_norm_vector_bwd",
    "spectral_norm_vector_fwd",
    "weight_norm_bwd",
    "weight_norm_fwd",
]
