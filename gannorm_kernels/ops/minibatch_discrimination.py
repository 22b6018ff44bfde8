"""Minibatch discrimination (Salimans et al. 2016) as torch operators: the pairwise part
o[i, b] = sum_{j != i} exp(-||M[i, b] - M[j, b]||_1), with O(N B C) memory (nothing
N x N x B x C). Declared as MINIBATCH_DISCRIMINATION (ops/__init__.py derives the rest); kernels:
triton/minibatch_discrimination.py, csrc/minibatch_discrimination.cu.

Launch budget (held by tests, from `cost`): the pairwise part 1 forward / 1 backward (plus torch's matmul
and concatenation).
"""

from __future__ import annotations

import torch

from .. import backends, checks, reference
from ..dtypes import element_size
from . import Cost, OpSpec


def cost(n: int, b: int, c: int, dtype, backward: bool = False) -> Cost:
    """The pairwise part: 3 flops per (i, j, b, c) forward, 6 backward (recomputing the L1)."""
    s = element_size(dtype)
    if backward:
        return Cost(1, 2 * n * b * c * s + 2 * n * b * s, 6 * n * n * b * c)
    return Cost(1, n * b * c * s + n * b * s, 3 * n * n * b * c)


def _triton():
    from ..triton import minibatch_discrimination as kernels
    return kernels.minibatch_discrimination_fwd, kernels.minibatch_discrimination_bwd


# The pairwise part, o (N, B) from M (N, B, C); the matmul and the concatenation are torch's.
MINIBATCH_DISCRIMINATION = OpSpec(
    "minibatch_discrimination_fwd(Tensor m) -> Tensor o",
    "minibatch_discrimination_bwd(Tensor grad_o, Tensor m) -> Tensor grad_m",
    forward_fake=lambda m: m.new_empty(m.shape[:2]),
    backward_fake=lambda grad, m: m.new_empty(m.shape),
    reference=reference.minibatch_discrimination_features,
    triton=_triton, cost=cost)


def minibatch_discrimination(x: torch.Tensor, T: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Minibatch discrimination (Salimans et al. 2016) on plain tensors.

    ``M = x @ T`` (T of shape (in_features, B, C) seen as (in_features, B C), M as (N, B, C)),
    ``o[i, b] = sum_{j != i} exp(-||M[i, b] - M[j, b]||_1)``; returns ``cat([x, o], 1)``, of
    shape (N, in_features + B). The pairwise part is one fused kernel each way, with O(N B C)
    memory (the usual formulation keeps N x N x B x C alive for backward); N = 1 gives o = 0.
    Under autocast ``x @ T`` and the pairwise part run in the autocast dtype (fp32
    accumulation), as the same code written in torch ops would.
    """
    checks.float_tensor(x, "x")
    checks.float_tensor(T, "T")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, in_features), got {tuple(x.shape)}")
    if T.dim() != 3:
        raise ValueError(f"T must have shape (in_features, num_kernels, kernel_dim), got {tuple(T.shape)}")
    if T.shape[0] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but T is for in_features={T.shape[0]}: x must have shape "
                         f"(N, in_features) for T of shape (in_features, num_kernels, kernel_dim)")
    # under autocast x @ T runs in the autocast dtype, whatever the two dtypes are (as torch's own)
    mixed_ok = torch.is_autocast_enabled(x.device.type)
    if (T.dtype != x.dtype and not mixed_ok) or T.device != x.device:
        raise TypeError(f"T must have x's dtype and device ({x.dtype}, {x.device}), got ({T.dtype}, {T.device})")
    name = backends.resolve(backend, x.device)
    m = (x @ T.flatten(1)).view(x.shape[0], T.shape[1], T.shape[2])
    if name == "reference":
        o = reference.minibatch_discrimination_features(m)
    else:
        o = MINIBATCH_DISCRIMINATION(m, name)[0]
    return torch.cat([x, o], dim=1)
