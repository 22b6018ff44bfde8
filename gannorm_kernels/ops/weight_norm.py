"""Weight normalization as torch operators: w = g * v / ||v||, the norm over every dim of v
but `dim` (dim=None or -1: the whole tensor, as in torch).

`torch.ops.gannorm_kernels.weight_norm_fwd(v, g, dim, backend) -> (w, norms)` and its
backward `weight_norm_bwd` run the chosen kernel backend (triton, cuda, cuda-emu); fake
kernels and the autograd formula make them traceable by torch.compile, which is where
`weight_norm` uses them. In eager mode `weight_norm` calls the same launchers through a
torch.autograd.Function instead: a Python torch.library operator costs about 40 us of host
time per call, more than the kernels of a typical GAN layer take on a GPU. The `reference`
backend is plain PyTorch, called directly.

Launch budget (held by tests): forward 1, backward 1, for every dim.
"""

from __future__ import annotations

import torch

from .. import backends, reference

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def normalize_dim(dim: int | None, ndim: int) -> int:
    """torch's convention: None and -1 mean the whole tensor; other negatives count from the end."""
    if dim is None or dim == -1:
        return -1
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"dim must be an int or None, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise IndexError(f"dim={dim} is out of range for a {ndim}-d weight "
                         f"(expected None, -1 or a dim in [{-ndim}, {ndim - 1}])")
    return dim + ndim if dim < 0 else dim


def _channels(shape, dim: int) -> int:
    return 1 if dim == -1 else shape[dim]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_weight_norm_args(v, g, dim) -> int:
    """Validates the arguments, naming the bad one; returns the normalised dim."""
    for name, t in (("v", v), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if v.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"v must be float16, bfloat16, float32 or float64, got {v.dtype}")
    if g.dtype != v.dtype:
        raise TypeError(f"g must have v's dtype {v.dtype}, got {g.dtype}")
    if g.device != v.device:
        raise ValueError(f"g must be on v's device {v.device}, got {g.device}")
    dim = normalize_dim(dim, v.dim())
    channels = _channels(v.shape, dim)
    if g.numel() != channels:
        where = "the whole tensor" if dim == -1 else f"dim {dim} of v {tuple(v.shape)}"
        raise ValueError(f"g must have one element per channel of {where} ({channels}), "
                         f"got shape {tuple(g.shape)}")
    return dim


@torch.library.custom_op("gannorm_kernels::weight_norm_fwd", mutates_args=())
def weight_norm_fwd(v: torch.Tensor, g: torch.Tensor, dim: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, norms): the weight and the per-channel ||v|| (fp32; fp64 for fp64 v)."""
    return backends.kernels(backend).weight_norm_fwd(v, g, dim)


@weight_norm_fwd.register_fake
def _weight_norm_fwd_fake(v, g, dim, backend=None):
    return v.new_empty(v.shape), v.new_empty((_channels(v.shape, dim),), dtype=_acc_dtype(v.dtype))


@torch.library.custom_op("gannorm_kernels::weight_norm_bwd", mutates_args=())
def weight_norm_bwd(grad_w: torch.Tensor, v: torch.Tensor, g: torch.Tensor, norms: torch.Tensor, dim: int,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_v, grad_g) for weight_norm_fwd."""
    return backends.kernels(backend).weight_norm_bwd(grad_w, v, g, norms, dim)


@weight_norm_bwd.register_fake
def _weight_norm_bwd_fake(grad_w, v, g, norms, dim, backend=None):
    return v.new_empty(v.shape), g.new_empty(g.shape)


# The compiled ops (the same launchers without the backend argument) share the fake kernels.
for _namespace in backends.loaded_ops_namespaces():
    torch.library.register_fake(f"{_namespace}::weight_norm_fwd")(_weight_norm_fwd_fake)
    torch.library.register_fake(f"{_namespace}::weight_norm_bwd")(_weight_norm_bwd_fake)


def _setup_context(ctx, inputs, output):
    v, g, dim, backend = inputs
    _, norms = output
    ctx.save_for_backward(v, g, norms)
    ctx.dim, ctx.backend = dim, backend
    ctx.mark_non_differentiable(norms)
    ctx.set_materialize_grads(False)  # no zero tensor (and launch) for the norms' gradient


def _backward(ctx, grad_w, _grad_norms):
    if grad_w is None:
        return None, None, None, None
    v, g, norms = ctx.saved_tensors
    grad_v, grad_g = weight_norm_bwd(grad_w, v, g, norms, ctx.dim, ctx.backend)
    return grad_v, grad_g, None, None


_NO_DOUBLE_BACKWARD = ("weight_norm's kernel backends do not support double backward (differentiating "
                       "its gradient again); use backend='reference' for that")


def _double_backward(ctx, *grads):
    raise NotImplementedError(_NO_DOUBLE_BACKWARD)


def _no_context(ctx, inputs, output):
    pass


weight_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
weight_norm_bwd.register_autograd(_double_backward, setup_context=_no_context)


class _WeightNormFunction(torch.autograd.Function):
    """The eager path: the same launchers and formula as the operators, without their cost."""

    @staticmethod
    def forward(ctx, v, g, dim, backend):
        w, norms = backends.kernels(backend).weight_norm_fwd(v, g, dim)
        ctx.save_for_backward(v, g, norms)
        ctx.dim, ctx.backend = dim, backend
        return w

    @staticmethod
    def backward(ctx, grad_w):
        if torch.is_grad_enabled():  # create_graph=True: this gradient is not differentiable
            raise NotImplementedError(_NO_DOUBLE_BACKWARD)
        v, g, norms = ctx.saved_tensors
        grad_v, grad_g = backends.kernels(ctx.backend).weight_norm_bwd(grad_w, v, g, norms, ctx.dim)
        return grad_v, grad_g, None, None


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
    return _WeightNormFunction.apply(v, g, dim, name)
