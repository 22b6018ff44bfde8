"""Spectral normalization as torch operators: W / sigma with sigma = u^T W v, u and v the
power-iteration estimates of W's leading singular vectors (W: the weight as a matrix whose
rows run along `dim`).

Operators (torch.ops.gannorm_kernels.*; registration and the eager path: ops/__init__.py):
- `spectral_norm_fwd(weight, u, v, sigma, dim, n_power_iterations, eps, training, backend)
  -> (out, sigma, u_used, v_used)`: training runs the power iteration on the buffers u and v
  in place (torch's order: u, then v) first; eval uses them as they are, and `sigma` when the
  caller has it cached. `u_used`/`v_used` are the vectors the output was computed with, kept
  for backward (torch clones the buffers for the same reason).
- `spectral_norm_bwd(grad_out, weight, u_used, v_used, sigma, dim, eps, backend)`:
  dW = (G - <G, W> / sigma u v^T) / sigma, u and v constants as in torch.
- `spectral_norm_vector_fwd/bwd`: 1-D weights, which torch normalises by their norm.
The `reference` backend is plain PyTorch, called directly.

Launch budget (held by tests): training forward 2 n + 1 (3 for one iteration), eval 1 with a
cached sigma, else 2; backward 2; 1-D weights 2 / 2.
"""

from __future__ import annotations

import torch

from .. import backends, reference
from ..dtypes import FLOAT_DTYPES, acc_dtype
from . import below_autograd, define, differentiable_grads, no_double_backward

_COMPLEX_DTYPES = (torch.complex64, torch.complex128)



def matrix_shape(shape, dim: int) -> tuple[int, int]:
    """(h, w) of the matrix view: h = shape[dim], w = the product of the other sizes."""
    h = shape[dim]
    w = 1
    for i, s in enumerate(shape):
        if i != dim:
            w *= s
    return h, w


def normalize_dim(dim: int, ndim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise IndexError(f"dim={dim} is out of range for a {ndim}-d weight (expected a dim in [{-ndim}, {ndim - 1}])")
    return dim + ndim if dim < 0 else dim


def check_settings(n_power_iterations, eps) -> None:
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations < 1:
        raise ValueError(f"n_power_iterations must be a positive int, got {n_power_iterations!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


def check_spectral_norm_args(weight, u, v, dim, n_power_iterations, eps, sigma) -> int:
    """Validates the arguments, naming the bad one; returns the normalised dim."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES + _COMPLEX_DTYPES:
        raise TypeError(f"weight must be float16, bfloat16, float32, float64, complex64 or complex128, "
                        f"got {weight.dtype}")
    if weight.dim() == 0:
        raise ValueError("weight must have at least one dim, got a 0-d tensor")
    check_settings(n_power_iterations, eps)
    if weight.dim() == 1:
        return 0
    dim = normalize_dim(dim, weight.dim())
    h, w = matrix_shape(weight.shape, dim)
    for name, buffer, size in (("u", u, h), ("v", v, w)):
        if not isinstance(buffer, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of {size} elements, got {type(buffer).__name__}")
        if buffer.shape != (size,):
            raise ValueError(f"{name} must have shape ({size},) for a weight of shape {tuple(weight.shape)} "
                             f"along dim {dim}, got {tuple(buffer.shape)}")
        if buffer.dtype != weight.dtype or buffer.device != weight.device:
            raise TypeError(f"{name} must have the weight's dtype and device ({weight.dtype}, {weight.device}), "
                            f"got ({buffer.dtype}, {buffer.device})")
        if not buffer.is_contiguous():
            raise ValueError(f"{name} must be contiguous: it is updated in place")
    if sigma is not None and weight.is_complex():
        raise ValueError("sigma (a cached sigma) is not supported for complex weights")
    if sigma is not None and (not isinstance(sigma, torch.Tensor) or sigma.numel() != 1
                              or sigma.dtype != acc_dtype(weight.dtype) or sigma.device != weight.device):
        raise TypeError(f"sigma must be a one-element {acc_dtype(weight.dtype)} tensor on {weight.device} "
                        "(the sigma a previous call returned)")
    return dim


def _fwd_kernel(weight, u, v, sigma, dim, n_power_iterations, eps, training, backend):
    return backends.kernels(backend).spectral_norm_fwd(weight, u, v, sigma, dim, n_power_iterations, eps, training)


def _fwd_fake(weight, u, v, sigma, dim, n_power_iterations, eps, training, backend=None):
    h, w = matrix_shape(weight.shape, dim)
    acc = acc_dtype(weight.dtype)
    return (weight.new_empty(weight.shape), weight.new_empty((), dtype=acc), weight.new_empty((h,), dtype=acc),
            weight.new_empty((w,), dtype=acc))


def _bwd_kernel(grad_out, weight, u, v, sigma, dim, eps, backend):
    return backends.kernels(backend).spectral_norm_bwd(grad_out, weight, u, v, sigma, dim, eps)


def _bwd_fake(grad_out, weight, u, v, sigma, dim, eps, backend=None):
    return weight.new_empty(weight.shape)


def _vector_fwd_kernel(weight, eps, backend):
    return backends.kernels(backend).spectral_norm_vector_fwd(weight, eps)


def _vector_fwd_fake(weight, eps, backend=None):
    return weight.new_empty(weight.shape), weight.new_empty((), dtype=acc_dtype(weight.dtype))


def _vector_bwd_kernel(grad_out, weight, sigma, eps, backend):
    return backends.kernels(backend).spectral_norm_vector_bwd(grad_out, weight, sigma, eps)


def _vector_bwd_fake(grad_out, weight, sigma, eps, backend=None):
    return weight.new_empty(weight.shape)


def complex_backend(backend: str) -> str:
    """Complex weights (torch's spectral norm supports them) run on the reference only: "auto"
    picks it, an explicit kernel backend raises."""
    name = backends.requested(backend)
    if name not in ("auto", "reference"):
        raise TypeError(f"backend {name!r} does not support complex weights; use backend='reference' or 'auto'")
    return "reference"


class _SpectralNormFunction(torch.autograd.Function):
    """The autograd formula, for eager calls (`traced=False`: launchers called directly) and as
    the operator's Autograd kernel (`traced=True`: the operators, so torch.compile sees them).
    Returns (out, sigma); sigma carries no gradient."""

    @staticmethod
    def forward(ctx, traced, weight, u, v, sigma, dim, n_power_iterations, eps, training, backend):
        run = (lambda *args: below_autograd(spectral_norm_fwd, *args)) if traced else _fwd_kernel
        out, sigma, u_used, v_used = run(weight, u, v, sigma, dim, n_power_iterations, eps, training, backend)
        ctx.save_for_backward(weight, u_used, v_used, sigma)
        ctx.traced, ctx.dim, ctx.eps, ctx.backend = traced, dim, eps, backend
        ctx.mark_non_differentiable(sigma, u_used, v_used)
        ctx.set_materialize_grads(False)
        return out, sigma, u_used, v_used

    @staticmethod
    def backward(ctx, grad_out, *_):
        if grad_out is None:
            return (None,) * 10
        weight, u_used, v_used, sigma = ctx.saved_tensors
        args = (weight, u_used, v_used, sigma, ctx.dim, ctx.eps, ctx.backend)
        if ctx.traced:
            grad = spectral_norm_bwd(grad_out, *args)
        elif torch.is_grad_enabled():  # create_graph=True; u and v stay the constants they were
            dim, eps = ctx.dim, ctx.eps
            grad, = differentiable_grads(
                lambda: (_bwd_kernel(grad_out, *args),),
                lambda w: reference.spectral_norm(w, u_used, v_used, dim, 1, eps, training=False)[0],
                (grad_out,), (weight,))
        else:
            grad = _bwd_kernel(grad_out, *args)
        return (None, grad) + (None,) * 8


class _SpectralNormVectorFunction(torch.autograd.Function):
    """As _SpectralNormFunction, for 1-D weights."""

    @staticmethod
    def forward(ctx, traced, weight, eps, backend):
        run = (lambda *args: below_autograd(spectral_norm_vector_fwd, *args)) if traced else _vector_fwd_kernel
        out, sigma = run(weight, eps, backend)
        ctx.save_for_backward(weight, sigma)
        ctx.traced, ctx.eps, ctx.backend = traced, eps, backend
        ctx.mark_non_differentiable(sigma)
        ctx.set_materialize_grads(False)
        return out, sigma

    @staticmethod
    def backward(ctx, grad_out, _grad_sigma):
        if grad_out is None:
            return None, None, None, None
        weight, sigma = ctx.saved_tensors
        eps, backend = ctx.eps, ctx.backend
        if ctx.traced:
            grad = spectral_norm_vector_bwd(grad_out, weight, sigma, eps, backend)
        elif torch.is_grad_enabled():  # create_graph=True
            grad, = differentiable_grads(lambda: (_vector_bwd_kernel(grad_out, weight, sigma, eps, backend),),
                                         lambda w: reference.vector_normalize(w, eps)[0], (grad_out,), (weight,))
        else:
            grad = _vector_bwd_kernel(grad_out, weight, sigma, eps, backend)
        return None, grad, None, None


spectral_norm_fwd = define(
    "spectral_norm_fwd(Tensor weight, Tensor(a!) u, Tensor(b!) v, Tensor? sigma, int dim, int n_power_iterations, "
    "float eps, bool training, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
    _fwd_kernel, _fwd_fake, lambda *args: _SpectralNormFunction.apply(True, *args))
spectral_norm_bwd = define(
    "spectral_norm_bwd(Tensor grad_out, Tensor weight, Tensor u, Tensor v, Tensor sigma, int dim, float eps, "
    "str backend) -> Tensor",
    _bwd_kernel, _bwd_fake, no_double_backward("spectral_norm_bwd"))
spectral_norm_vector_fwd = define(
    "spectral_norm_vector_fwd(Tensor weight, float eps, str backend) -> (Tensor, Tensor)",
    _vector_fwd_kernel, _vector_fwd_fake, lambda *args: _SpectralNormVectorFunction.apply(True, *args))
spectral_norm_vector_bwd = define(
    "spectral_norm_vector_bwd(Tensor grad_out, Tensor weight, Tensor sigma, float eps, str backend) -> Tensor",
    _vector_bwd_kernel, _vector_bwd_fake, no_double_backward("spectral_norm_vector_bwd"))


def spectral_norm(weight: torch.Tensor, u: torch.Tensor | None = None, v: torch.Tensor | None = None, dim: int = 0,
                  n_power_iterations: int = 1, eps: float = 1e-12, training: bool = True, *,
                  sigma: torch.Tensor | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral normalization of a weight: returns ``(weight / sigma, sigma)``.

    Args:
        weight: any shape with at least 2 dims, seen as a matrix whose rows run along ``dim``
            (torch's layout); a 1-D weight is divided by its norm, as torch does.
        u, v: the power-iteration vectors (the module's ``_u``, ``_v`` buffers), of the
            matrix's row and column counts, the weight's dtype, contiguous. Unused for 1-D.
        dim: the rows' dim.
        n_power_iterations: iterations run first when ``training``, updating ``u`` then ``v``
            in place each time, as torch does.
        eps: guards every normalisation (and a sigma below it).
        training: iterate, or (eval) use ``u`` and ``v`` as they are.
        sigma: eval only: the sigma a previous call returned for this same weight and these
            same buffers, to skip recomputing it.
        backend: "auto", "reference", "triton", "cuda" or "cuda-emu".

    ``sigma`` is returned for monitoring and carries no gradient; the weight's gradient treats
    u and v as constants (torch's convention). Complex weights run on the reference (sigma =
    u^H W v is then complex, as in torch). Math in fp32 for fp16/bf16 weights (u and v are
    stored in the weight's dtype). Kernel backends launch 2 n + 1 kernels to train (3 for
    n = 1), 1 in eval with a cached sigma (else 2), 2 backward.
    """
    dim = check_spectral_norm_args(weight, u, v, dim, n_power_iterations, eps, sigma)
    name = complex_backend(backend) if weight.is_complex() else backends.resolve(backend, weight.device)
    eps = float(eps)
    if weight.dim() == 1:
        if name == "reference":
            out, denominator = reference.vector_normalize(weight, eps)
            return out, denominator.detach()
        if torch.compiler.is_compiling():
            return spectral_norm_vector_fwd(weight, eps, name)
        return _SpectralNormVectorFunction.apply(False, weight, eps, name)
    if name == "reference":
        out, sigma = reference.spectral_norm(weight, u, v, dim, n_power_iterations, eps, training)
        return out, sigma.detach()
    cached = None if training else sigma
    args = (weight, u, v, cached, dim, n_power_iterations, eps, training, name)
    if torch.compiler.is_compiling():
        out, sigma, _, _ = spectral_norm_fwd(*args)
    else:
        out, sigma, _, _ = _SpectralNormFunction.apply(False, *args)
    return out, sigma
