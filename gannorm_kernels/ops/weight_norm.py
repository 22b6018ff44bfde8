"""Weight normalization as torch operators: w = g * v / ||v||, the norm over every dim of v
but `dim` (dim=None or -1: the whole tensor, as in torch).

`torch.ops.gannorm_kernels.weight_norm_fwd(v, g, dim, backend) -> (w, norms)` and its
backward `weight_norm_bwd` run the chosen kernel backend (triton, cuda, cuda-emu); see
`ops/__init__.py` for how they are registered and how eager calls bypass them. The
`reference` backend is plain PyTorch, called directly.

Launch budget (held by tests): forward 1, backward 1, for every dim.
"""

from __future__ import annotations

import torch

from .. import backends, reference
from ..dtypes import FLOAT_DTYPES, acc_dtype
from . import below_autograd, define, differentiable_grads, no_double_backward



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


def normalize_dim(dim: int | None, ndim: int) -> int:
    """torch's convention: None and -1 mean the whole tensor; other negatives count from the end."""
    dim = torch_dim(dim, ndim)
    return dim + ndim if dim < -1 else dim


def _channels(shape, dim: int) -> int:
    return 1 if dim == -1 else shape[dim % len(shape)]



def check_weight_norm_args(v, g, dim) -> int:
    """Validates the arguments, naming the bad one; returns the dim in torch's form (torch_dim)."""
    for name, t in (("v", v), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if v.dtype not in FLOAT_DTYPES:
        raise TypeError(f"v must be float16, bfloat16, float32 or float64, got {v.dtype}")
    if g.dtype != v.dtype:
        raise TypeError(f"g must have v's dtype {v.dtype}, got {g.dtype}")
    if g.device != v.device:
        raise ValueError(f"g must be on v's device {v.device}, got {g.device}")
    dim = torch_dim(dim, v.dim())
    channels = _channels(v.shape, dim)
    if g.numel() != channels:
        where = "the whole tensor" if dim == -1 else f"dim {dim % v.dim()} of v {tuple(v.shape)}"
        raise ValueError(f"g must have one element per channel of {where} ({channels}), "
                         f"got shape {tuple(g.shape)}")
    return dim


def _weight_norm_fwd_kernel(v, g, dim, backend):
    return backends.kernels(backend).weight_norm_fwd(v, g, dim)


def _weight_norm_fwd_fake(v, g, dim, backend=None):
    return v.new_empty(v.shape), v.new_empty((_channels(v.shape, dim),), dtype=acc_dtype(v.dtype))


def _weight_norm_bwd_kernel(grad_w, v, g, norms, dim, backend):
    return backends.kernels(backend).weight_norm_bwd(grad_w, v, g, norms, dim)


def _weight_norm_bwd_fake(grad_w, v, g, norms, dim, backend=None):
    return v.new_empty(v.shape), g.new_empty(g.shape)


class _WeightNormFunction(torch.autograd.Function):
    """The autograd formula, for eager calls (`traced=False`: launchers called directly) and as
    the operator's Autograd kernel (`traced=True`: the operators, so torch.compile sees them)."""

    @staticmethod
    def forward(ctx, traced, v, g, dim, backend):
        if traced:
            w, norms = below_autograd(weight_norm_fwd, v, g, dim, backend)
        else:
            w, norms = _weight_norm_fwd_kernel(v, g, dim, backend)
        ctx.save_for_backward(v, g, norms)
        ctx.traced, ctx.dim, ctx.backend = traced, dim, backend
        ctx.mark_non_differentiable(norms)
        ctx.set_materialize_grads(False)
        return w, norms

    @staticmethod
    def backward(ctx, grad_w, _grad_norms):
        if grad_w is None:
            return None, None, None, None, None
        v, g, norms = ctx.saved_tensors
        dim, backend = ctx.dim, ctx.backend
        if ctx.traced:
            grad_v, grad_g = weight_norm_bwd(grad_w, v, g, norms, dim, backend)
        elif torch.is_grad_enabled():  # create_graph=True
            grad_v, grad_g = differentiable_grads(lambda: _weight_norm_bwd_kernel(grad_w, v, g, norms, dim, backend),
                                                  lambda v, g: reference.weight_norm(v, g, dim), (grad_w,), (v, g))
        else:
            grad_v, grad_g = _weight_norm_bwd_kernel(grad_w, v, g, norms, dim, backend)
        return None, grad_v, grad_g, None, None

# (w, norms): the weight and the per-channel ||v|| (fp32; fp64 for fp64 v).
weight_norm_fwd = define("weight_norm_fwd(Tensor v, Tensor g, int dim, str backend) -> (Tensor, Tensor)",
                         _weight_norm_fwd_kernel, _weight_norm_fwd_fake,
                         lambda *args: _WeightNormFunction.apply(True, *args))
# (grad_v, grad_g).
weight_norm_bwd = define(
    "weight_norm_bwd(Tensor grad_w, Tensor v, Tensor g, Tensor norms, int dim, str backend) -> (Tensor, Tensor)",
    _weight_norm_bwd_kernel, _weight_norm_bwd_fake, no_double_backward("weight_norm_bwd"))


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
    fp16/bf16 are computed in fp32. Kernel backends: one launch forward, one backward.
    """
    dim = check_weight_norm_args(v, g, dim)
    name = backends.resolve(backend, v.device)
    if name == "reference":
        return reference.weight_norm(v, g, dim)
    if torch.compiler.is_compiling():
        return weight_norm_fwd(v, g, dim, name)[0]
    return _WeightNormFunction.apply(False, v, g, dim, name)[0]
