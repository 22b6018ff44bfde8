"""Minibatch penalties as torch operators: pairwise similarity (cosine, rbf), minibatch
discrimination and the minibatch standard deviation. Each keeps memory linear in the batch:
nothing pairwise (N x N, or N x N x B x C) is ever materialised. Algorithms: see
triton/minibatch.py; registration and the eager path: ops/__init__.py.

Launch budget (held by tests): similarity penalty 2 forward / 1 backward (both kernels);
minibatch discrimination's pairwise part 1 / 1 (plus torch's matmul and concatenation);
minibatch stddev 1 / 1.
"""

from __future__ import annotations

import math

import torch

from .. import backends, reference
from ..dtypes import FLOAT_DTYPES, acc_dtype
from . import KernelPair

KERNELS = ("cosine", "rbf")



def _check_float_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


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

_discrimination = KernelPair(
    "minibatch_discrimination_fwd(Tensor m, str backend) -> Tensor",
    "minibatch_discrimination_bwd(Tensor grad_o, Tensor m, str backend) -> Tensor",
    lambda m, backend=None: m.new_empty(m.shape[:2]),
    lambda grad, m, backend=None: m.new_empty(m.shape),
    reference.minibatch_discrimination_features)

_stddev = KernelPair(
    "minibatch_stddev_fwd(Tensor x, int group_size, int num_channels, str backend) -> Tensor",
    "minibatch_stddev_bwd(Tensor grad_out, Tensor x, int group_size, int num_channels, str backend) -> Tensor",
    lambda x, group_size, num_channels, backend=None: x.new_empty(
        (x.shape[0], x.shape[1] + num_channels, x.shape[2], x.shape[3])),
    lambda grad, x, group_size, num_channels, backend=None: x.new_empty(x.shape),
    reference.minibatch_stddev)


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
    _check_float_tensor(features, "features")
    if features.dim() < 2:
        raise ValueError(f"features must have shape (N, ...) with at least 2 dims (samples first), got a "
                         f"{features.dim()}-d tensor")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}: expected 'cosine' or 'rbf'")
    bandwidth = _positive(bandwidth, "bandwidth")
    eps = _positive(eps, "eps")
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


def minibatch_discrimination(x: torch.Tensor, T: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Minibatch discrimination (Salimans et al. 2016) on plain tensors.

    ``M = x @ T`` (T of shape (in_features, B, C) seen as (in_features, B C), M as (N, B, C)),
    ``o[i, b] = sum_{j != i} exp(-||M[i, b] - M[j, b]||_1)``; returns ``cat([x, o], 1)``, of
    shape (N, in_features + B). The pairwise part is one fused kernel each way, with O(N B C)
    memory (the usual formulation keeps N x N x B x C alive for backward); N = 1 gives o = 0.
    """
    _check_float_tensor(x, "x")
    _check_float_tensor(T, "T")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, in_features), got {tuple(x.shape)}")
    if T.dim() != 3 or T.shape[0] != x.shape[1]:
        raise ValueError(f"T must have shape (in_features={x.shape[1]}, num_kernels, kernel_dim), got {tuple(T.shape)}")
    if T.dtype != x.dtype or T.device != x.device:
        raise TypeError(f"T must have x's dtype and device ({x.dtype}, {x.device}), got ({T.dtype}, {T.device})")
    name = backends.resolve(backend, x.device)
    m = (x @ T.flatten(1)).view(x.shape[0], T.shape[1], T.shape[2])
    if name == "reference":
        o = reference.minibatch_discrimination_features(m)
    else:
        o = _discrimination(m, name)[0]
    return torch.cat([x, o], dim=1)


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, num_channels: int = 1, *,
                     backend: str = "auto") -> torch.Tensor:
    """The ProGAN/StyleGAN2 minibatch standard-deviation layer on plain tensors.

    Groups of ``G = min(group_size, N)`` samples (sample ``g * N / G + m`` in group ``m``, as
    StyleGAN2), the standard deviation over each group averaged over the channels of each of
    ``num_channels`` channel groups and over the pixels, appended as ``num_channels`` constant
    channels: (N, C, H, W) -> (N, C + num_channels, H, W). N must be a multiple of G and C of
    num_channels. Kernel backends: one launch each way, the concatenation included.
    """
    _check_float_tensor(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    for value, what in ((group_size, "group_size"), (num_channels, "num_channels")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive int, got {value!r}")
    n, c = x.shape[:2]
    if n == 0:
        raise ValueError("x must hold at least one sample")
    g = min(group_size, n)
    if n % g:
        raise ValueError(f"the batch size {n} must be a multiple of the group size min(group_size={group_size}, "
                         f"N={n}) = {g}")
    if c % num_channels:
        raise ValueError(f"the channel count {c} must be a multiple of num_channels={num_channels}")
    name = backends.resolve(backend, x.device)
    if name == "reference":
        return reference.minibatch_stddev(x, group_size, num_channels)
    return _stddev(x, group_size, num_channels, name)[0]
