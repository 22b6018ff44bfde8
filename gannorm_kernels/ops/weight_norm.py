"""Weight normalization as torch operators: w = g * v / ||v||, the norm over every dim of v
but `dim` (dim=None or -1: the whole tensor, as in torch).

The family is declared once, as WEIGHT_NORM (see ops/__init__.py for what derives from it);
its kernels: triton/weight_norm.py and csrc/weight_norm.cu. The `reference` backend is plain
PyTorch, called directly.

Launch budget (held by tests, from `cost`): forward 1, backward 1 per channel dim; 2 and 2
for the whole tensor.
"""

from __future__ import annotations

import math

import torch

from .. import backends, reference
from ..dtypes import FLOAT_DTYPES, acc_dtype, element_size
from . import Cost, OpSpec


def torch_dim(dim: int | None, ndim: int) -> int:
    """The dim as torch._weight_norm takes it, checked: None -> -1 (the whole tensor); other
    negative dims stay negative, because torch rounds differently for them (it fuses only dim 0
    and dim ndim - 1 written that way; see reference.weight_norm_fuses). The kernels take
    this form."""
    if dim is None or dim == -1:
        return -1
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"dim must be an int or None, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise IndexError(f"dim={dim} is out of range for a {ndim}-d weight "
                         f"(expected None, -1 or a dim in [{-ndim}, {ndim - 1}])")
    return dim


def _channels(shape, dim: int) -> int:
    return 1 if dim == -1 else shape[dim % len(shape)]



def check_weight_norm_args(v, g, dim) -> int:
    """Validates the arguments, naming the bad one; returns the dim in torch's form (torch_dim)."""
    for name, t in (("v", v), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if v.dtype not in FLOAT_DTYPES:
        raise TypeError(f"v must be float16, bfloat16, float32 or float64, got {v.dtype}")
    if v.dim() == 0:  # torch's weight norm cannot take one either
        raise ValueError("v must have at least one dim, got a 0-d tensor")
    if g.dtype != v.dtype:
        raise TypeError(f"g must have v's dtype {v.dtype}, got {g.dtype}")
    if g.device != v.device:
        raise TypeError(f"g must be on v's device {v.device}, got {g.device}")
    dim = torch_dim(dim, v.dim())
    channels = _channels(v.shape, dim)
    if g.numel() != channels:
        where = "the whole tensor" if dim == -1 else f"dim {dim % v.dim()} of v {tuple(v.shape)}"
        raise ValueError(f"g must have one element per channel of {where} ({channels}), "
                         f"got shape {tuple(g.shape)}")
    return dim


def cost(shape, dtype, dim: int | None, backward: bool = False) -> Cost:
    """Forward: v read twice (norm, then scale), w written, g read, norms written. Backward:
    grad_w and v read twice, grad_v written, g and norms read, grad_g written. The whole
    tensor (dim None or -1) takes two launches each way (a partial-sum pass over many
    programs, then the scale pass); its partials (a few KB) are left out of the bytes."""
    n, s, acc = math.prod(shape), element_size(dtype), element_size(acc_dtype(dtype))
    whole = dim is None or dim == -1
    channels = 1 if whole else shape[dim]
    launches = 2 if whole else 1
    if backward:
        return Cost(launches, 5 * n * s + channels * (2 * s + acc))
    return Cost(launches, 3 * n * s + channels * (s + acc))


def _triton():
    from ..triton import weight_norm as kernels
    return kernels.weight_norm_fwd, kernels.weight_norm_bwd


# norms: the per-channel ||v|| (fp32; fp64 for fp64 v)
WEIGHT_NORM = OpSpec(
    "weight_norm_fwd(Tensor v, Tensor g, int dim) -> (Tensor w, Tensor norms)",
    "weight_norm_bwd(Tensor grad_w, Tensor v, Tensor g, Tensor norms, int dim) -> (Tensor grad_v, Tensor grad_g)",
    forward_fake=lambda v, g, dim: (v.new_empty(v.shape),
                                    v.new_empty((_channels(v.shape, dim),), dtype=acc_dtype(v.dtype))),
    backward_fake=lambda grad_w, v, g, norms, dim: (v.new_empty(v.shape), g.new_empty(g.shape)),
    reference=lambda v, g, norms, dim: reference.weight_norm_formula(v, g, dim),
    triton=_triton, cost=cost)


def weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int | None = 0, *, backend: str = "auto") -> torch.Tensor:
    """Weight normalization, ``w = g * v / ||v||``, differentiable in v and g.

    Args:
        v: the direction, any shape, float16/bfloat16/float32/float64.
        g: the magnitude, one element per channel along ``dim`` (torch's layout: v's shape with
            every other dim 1; a scalar when ``dim`` is None).
        dim: the dim that keeps its own norm; the norm runs over all the others. ``None`` or
            ``-1``: one norm for the whole tensor (torch's convention).
        backend: "auto", "reference", "triton", "cuda" or "cuda-emu" (see
            :mod:`gannorm_kernels.backends`).

    A channel whose direction is all zeros gets a zero weight and zero gradients, not NaN.
    fp16/bf16 are computed in fp32. Kernel backends: one launch forward, one backward (two each
    for the whole tensor).
    """
    dim = check_weight_norm_args(v, g, dim)
    name = backends.resolve(backend, v.device)
    if name == "reference":
        return reference.weight_norm(v, g, dim)
    return WEIGHT_NORM(v, g, dim, name)[0]
