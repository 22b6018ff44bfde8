"""Spectral normalization as torch operators: W / sigma with sigma = u^T W v, u and v the
power-iteration estimates of W's leading singular vectors (W: the weight as a matrix whose
rows run along `dim`).

Two families, declared once as SPECTRAL_NORM and SPECTRAL_NORM_VECTOR (see ops/__init__.py for
what derives from them); kernels: triton/spectral_norm.py, csrc/spectral_norm.cu.
- `spectral_norm_fwd(weight, u, v, sigma, dim, n_power_iterations, eps, training, backend)
  -> (out, sigma_used, u_used, v_used)`: training runs the power iteration on the buffers u and v
  in place (torch's order: u, then v) first; eval uses them as they are, and `sigma` when the
  caller has it cached. `u_used`/`v_used` are the vectors the output was computed with, kept
  for backward (torch clones the buffers for the same reason).
- `spectral_norm_bwd(grad_out, weight, u_used, v_used, sigma_used, dim, eps, backend)`:
  dW = (G - <G, W> / sigma u v^T) / sigma, u and v constants as in torch.
- `spectral_norm_vector_fwd/bwd`: 1-D weights, which torch normalises by their norm.
The `reference` backend is plain PyTorch, called directly.

Launch budget (held by tests, from `cost`): training forward 2 n + 1 (3 for one iteration), eval 1 with a
cached sigma, else 2; backward 2; 1-D weights 2 / 2.
"""

from __future__ import annotations

import math

import torch

from .. import backends, checks, reference
from ..dtypes import FLOAT_DTYPES, acc_dtype, element_size
from . import Cost, OpSpec

_COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def check_settings(n_power_iterations, eps) -> None:
    checks.positive_int(n_power_iterations, "n_power_iterations")
    checks.positive_number(eps, "eps")


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
    dim = checks.matrix_dim(dim, weight.dim())
    h, w = checks.matrix_shape(weight.shape, dim)
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


def cost(shape, dtype, dim: int = 0, mode: str = "train", n_power_iterations: int = 1) -> Cost:
    """Per power iteration: W read by the rows pass and by the cols pass (plus u, v, x, t);
    then the scale pass reads W and writes W / sigma. Eval (what the module runs): a rows pass
    and the scale pass; "eval-cached" (the functional op given a sigma by its caller): the
    scale pass alone. Both copy u and v out as used. Backward: G and W read for
    <G, W>, G read and dW written.
    1-D weights (mode "vector-*", SPECTRAL_NORM_VECTOR): w read for its norm, then read and written."""
    n, s, acc = math.prod(shape), element_size(dtype), element_size(acc_dtype(dtype))
    if mode.startswith("vector"):
        return Cost(2, 4 * n * s) if mode == "vector-backward" else Cost(2, 3 * n * s)
    h = shape[dim]
    w = n // h
    vectors = (h + w) * (s + 2 * acc)  # buffers read or written, x/t and the saved copies
    if mode == "train":
        return Cost(2 * n_power_iterations + 1, (2 * n_power_iterations + 2) * n * s + n_power_iterations * vectors)
    if mode == "backward":
        return Cost(2, 4 * n * s + (h + w) * acc)
    if mode == "eval":
        return Cost(2, 3 * n * s + vectors)
    if mode == "eval-cached":  # the buffers copied out as used, for backward
        return Cost(1, 2 * n * s + (h + w) * (s + acc))
    raise ValueError(f"unknown mode {mode!r}: expected train, backward, eval, eval-cached, vector-forward or "
                     "vector-backward")


def _forward_fake(weight, u, v, sigma, dim, n_power_iterations, eps, training):
    h, w = checks.matrix_shape(weight.shape, dim)
    acc = acc_dtype(weight.dtype)
    return (weight.new_empty(weight.shape), weight.new_empty((), dtype=acc), weight.new_empty((h,), dtype=acc),
            weight.new_empty((w,), dtype=acc))


def _triton():
    from ..triton import spectral_norm as kernels
    return kernels.spectral_norm_fwd, kernels.spectral_norm_bwd


def _triton_vector():
    from ..triton import spectral_norm as kernels
    return kernels.spectral_norm_vector_fwd, kernels.spectral_norm_vector_bwd


# u_used/v_used: the vectors `out` was computed with (fp32; fp64 for fp64), saved for backward;
# the double backward differentiates W / (u^T W v) with them as constants, as the kernel does.
SPECTRAL_NORM = OpSpec(
    "spectral_norm_fwd(Tensor weight, Tensor(a!) u, Tensor(b!) v, Tensor? sigma, int dim, int n_power_iterations, "
    "float eps, bool training) -> (Tensor out, Tensor sigma_used, Tensor u_used, Tensor v_used)",
    "spectral_norm_bwd(Tensor grad_out, Tensor weight, Tensor u_used, Tensor v_used, Tensor sigma_used, int dim, "
    "float eps) -> Tensor grad_weight",
    forward_fake=_forward_fake,
    backward_fake=lambda grad_out, weight, u_used, v_used, sigma_used, dim, eps: weight.new_empty(weight.shape),
    reference=lambda weight, u_used, v_used, sigma_used, dim, eps: reference.spectral_norm(
        weight, u_used, v_used, dim, 1, eps, training=False)[0],
    triton=_triton, cost=cost)

# 1-D weights, which torch divides by their norm: (weight / max(||weight||, eps), that denominator)
SPECTRAL_NORM_VECTOR = OpSpec(
    "spectral_norm_vector_fwd(Tensor weight, float eps) -> (Tensor out, Tensor sigma)",
    "spectral_norm_vector_bwd(Tensor grad_out, Tensor weight, Tensor sigma, float eps) -> Tensor grad_weight",
    forward_fake=lambda weight, eps: (weight.new_empty(weight.shape),
                                      weight.new_empty((), dtype=acc_dtype(weight.dtype))),
    backward_fake=lambda grad_out, weight, sigma, eps: weight.new_empty(weight.shape),
    reference=lambda weight, sigma, eps: reference.vector_normalize(weight, eps)[0],
    triton=_triton_vector, cost=cost)


def complex_backend(backend: str) -> str:
    """Complex weights (torch's spectral norm supports them) run on the reference only: "auto"
    picks it, an explicit kernel backend raises."""
    name = backends.requested(backend)
    if name not in ("auto", "reference"):
        raise TypeError(f"backend {name!r} does not support complex weights; use backend='reference' or 'auto'")
    return "reference"


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
        return SPECTRAL_NORM_VECTOR(weight, eps, name)
    if name == "reference":
        out, sigma = reference.spectral_norm(weight, u, v, dim, n_power_iterations, eps, training)
        return out, sigma.detach()
    cached = None if training else sigma
    args = (weight, u, v, cached, dim, n_power_iterations, eps, training, name)
    out, sigma, _, _ = SPECTRAL_NORM(*args)
    return out, sigma
