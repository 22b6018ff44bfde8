"""Plain-PyTorch ground truth for every op, written to be obviously correct.

Each function differentiates through ordinary autograd, runs on any device and dtype, and
computes fp16/bf16 in fp32 (fp64 stays fp64), rounding once at the end, as the kernels do.
The tests compare every backend against these, evaluated in fp64.
"""

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
    """w = g * v / ||v||, the norm over every dim of v but `dim` (-1: the whole tensor).

    A channel whose direction is all zeros gets a zero weight and zero gradients (torch's own
    weight norm gives NaN there).
    """
    x = v.to(_compute_dtype(v.dtype))
    if dim == -1:
        sumsq = x.pow(2).sum()
    elif v.dim() == 1:
        sumsq = x.pow(2)  # each element is its own channel (sum over no dims would sum them all)
    else:
        sumsq = x.pow(2).sum(dim=[d for d in range(v.dim()) if d != dim], keepdim=True)
    nonzero = sumsq > 0
    # Keep 1/sqrt(0) out of both the value and the gradient of the masked-off branch.
    norm = torch.where(nonzero, sumsq, torch.ones_like(sumsq)).sqrt()
    scale = torch.where(nonzero, g.to(x.dtype).reshape(sumsq.shape) / norm, torch.zeros_like(sumsq))
    return (x * scale).to(v.dtype)
