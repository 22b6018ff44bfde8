"""The pairwise similarity penalty (cosine, rbf) as torch operators: the mean over ordered pairs
i != j of k(f_i, f_j), with memory linear in the batch (nothing N x N is materialised).
Declared as SIMILARITY_COSINE and SIMILARITY_RBF (ops/__init__.py derives the rest); kernels:
triton/similarity.py, csrc/similarity.cu.

Launch budget (held by tests, from `cost`): 2 forward / 1 backward (both kernels).
"""

from __future__ import annotations

import torch

from .. import backends, checks, reference
from ..dtypes import acc_dtype, element_size
from . import Cost, OpSpec

KERNELS = ("cosine", "rbf")


def cost(n: int, d: int, dtype, kernel: str, backward: bool = False) -> Cost:
    """cosine: forward reads the features twice (norms, unit-row sums) and writes per-program
    partial sums; backward reads them twice and writes the gradient. rbf: every pair's distance
    (3 flops per feature), forward once, backward once per 32-column chunk of D it writes."""
    s, acc = element_size(dtype), element_size(acc_dtype(dtype))
    partials = -(-n // 16) * d * acc
    if kernel == "cosine":
        return Cost(1, 3 * n * d * s + d * acc) if backward else Cost(2, 2 * n * d * s + 2 * partials)
    chunks = -(-d // 32)
    if backward:
        return Cost(1, 2 * n * d * s, 3 * n * n * d * chunks + 4 * n * n * min(d, 32) * chunks)
    return Cost(2, n * d * s, 3 * n * n * d)


def _triton_cosine():
    from ..triton import similarity as kernels
    return kernels.similarity_cosine_fwd, kernels.similarity_cosine_bwd


def _triton_rbf():
    from ..triton import similarity as kernels
    return kernels.similarity_rbf_fwd, kernels.similarity_rbf_bwd


# s: the sum of the unit rows (acc dtype), norms: the rows' guarded norms, both for backward
SIMILARITY_COSINE = OpSpec(
    "similarity_cosine_fwd(Tensor features, float eps) -> (Tensor penalty, Tensor s, Tensor norms)",
    "similarity_cosine_bwd(Tensor grad_penalty, Tensor features, Tensor s, Tensor norms, float eps) "
    "-> Tensor grad_features",
    forward_fake=lambda f, eps: (f.new_empty(()), f.new_empty((f.shape[1],), dtype=acc_dtype(f.dtype)),
                                 f.new_empty((f.shape[0],), dtype=acc_dtype(f.dtype))),
    backward_fake=lambda grad, f, s, norms, eps: f.new_empty(f.shape),
    reference=lambda f, s, norms, eps: reference.pairwise_similarity_penalty(f, "cosine", 1.0, eps),
    triton=_triton_cosine, cost=cost)

SIMILARITY_RBF = OpSpec(
    "similarity_rbf_fwd(Tensor features, float bandwidth) -> Tensor penalty",
    "similarity_rbf_bwd(Tensor grad_penalty, Tensor features, float bandwidth) -> Tensor grad_features",
    forward_fake=lambda f, bandwidth: f.new_empty(()),
    backward_fake=lambda grad, f, bandwidth: f.new_empty(f.shape),
    reference=lambda f, bandwidth: reference.pairwise_similarity_penalty(f, "rbf", bandwidth, 1e-12),
    triton=_triton_rbf, cost=cost)


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
            (gathered with autograd: each rank's gradient is world_size times its own samples'
            share, which DistributedDataParallel's averaging of gradients divides out).
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
    if checks.flag(global_batch, "global_batch"):
        features = _gather_global_batch(features)
    if features.shape[0] < 2:
        raise ValueError(f"features must hold at least 2 samples to form pairs, got N={features.shape[0]}")
    name = backends.resolve(backend, features.device)
    flat = features.flatten(1)
    if name == "reference":
        return reference.pairwise_similarity_penalty(flat, kernel, bandwidth, eps)
    if kernel == "cosine":
        return SIMILARITY_COSINE(flat, eps, name)[0]
    return SIMILARITY_RBF(flat, bandwidth, name)[0]
