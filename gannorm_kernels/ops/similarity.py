"""The pairwise similarity penalty (cosine, rbf) as torch operators: the mean over ordered pairs
i != j of k(f_i, f_j), with memory linear in the batch (nothing N x N is materialised).
Algorithms: triton/similarity.py; registration and the eager path: ops/__init__.py.

Launch budget (held by tests): 2 forward / 1 backward (both kernels).
"""

from __future__ import annotations

import torch

from .. import backends, checks, reference
from ..dtypes import acc_dtype
from . import KernelPair

KERNELS = ("cosine", "rbf")


_cosine = KernelPair(
    "similarity_cosine_fwd(Tensor features, float eps, str backend) -> (Tensor, Tensor, Tensor)",
    "similarity_cosine_bwd(Tensor grad_penalty, Tensor features, Tensor s, Tensor norms, float eps, str backend) "
    "-> Tensor",
    lambda f, eps, backend=None: (f.new_empty(()), f.new_empty((f.shape[1],), dtype=acc_dtype(f.dtype)),
                                  f.new_empty((f.shape[0],), dtype=acc_dtype(f.dtype))),
    lambda grad, f, s, norms, eps, backend=None: f.new_empty(f.shape),
    lambda f, eps: reference.pairwise_similarity_penalty(f, "cosine", 1.0, eps))

_rbf = KernelPair(
    "similarity_rbf_fwd(Tensor features, float bandwidth, str backend) -> Tensor",
    "similarity_rbf_bwd(Tensor grad_penalty, Tensor features, float bandwidth, str backend) -> Tensor",
    lambda f, bandwidth, backend=None: f.new_empty(()),
    lambda grad, f, bandwidth, backend=None: f.new_empty(f.shape),
    lambda f, bandwidth: reference.pairwise_similarity_penalty(f, "rbf", bandwidth, 1e-12))

def _gather_global_batch(features: torch.Tensor) -> torch.Tensor:
    """All ranks' features, concatenated, differentiable (torch.distributed.nn's all_gather)."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_functional

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("global_batch=True needs an initialised torch.distributed process group")
    return torch.cat(dist_functional.all_gather(features), dim=0)


def pairwise_similarity_penalty(features: torch.Tensor, kernel: str = "cosine", bandwidth: float = 1.0, *,
                                eps: float = 1e-12, global_batch: bool = False,
                                backend: str = "auto") -> torch.Tensor:
    """Mean over ordered pairs i != j of k(f_i, f_j): a penalty on a batch whose samples look
    alike (mode collapse). Features (N, ...) are flattened to (N, D); N >= 2.

    Args:
        features: (N, ...) floating-point features, e.g. a discriminator's activations.
        kernel: ``"cosine"`` (``<f_i, f_j> / (||f_i|| ||f_j||)``, norms guarded by ``eps`` as
            in ``F.normalize``) or ``"rbf"`` (``exp(-||f_i - f_j||^2 / (2 bandwidth^2))``).
        bandwidth: the rbf kernel's width, > 0.
        eps: the cosine kernel's guard against zero rows.
        global_batch: under torch.distributed, take the penalty over every rank's features
            (gathered with autograd, so each rank's gradient covers its own samples' part).
        backend: "auto", "reference", "triton", "cuda" or "cuda-emu".

    Returns a scalar of the features' dtype (computed in fp32 for fp16/bf16). Memory stays
    O(N D): cosine uses ``(||sum_i f^_i||^2 - sum_i ||f^_i||^2) / (N (N - 1))`` in one pass, rbf
    tiles over pairs and reduces on chip. Kernel backends: 2 launches forward, 1 backward.
    """
    checks.float_tensor(features, "features")
    if features.dim() < 2:
        raise ValueError(f"features must have shape (N, ...) with at least 2 dims (samples first), got a "
                         f"{features.dim()}-d tensor")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}: expected 'cosine' or 'rbf'")
    bandwidth = checks.positive_number(bandwidth, "bandwidth")
    eps = checks.positive_number(eps, "eps")
    if global_batch:
        features = _gather_global_batch(features)
    if features.shape[0] < 2:
        raise ValueError(f"features must hold at least 2 samples to form pairs, got N={features.shape[0]}")
    name = backends.resolve(backend, features.device)
    flat = features.flatten(1)
    if name == "reference":
        return reference.pairwise_similarity_penalty(flat, kernel, bandwidth, eps)
    if kernel == "cosine":
        return _cosine(flat, eps, name)[0]
    return _rbf(flat, bandwidth, name)[0]
