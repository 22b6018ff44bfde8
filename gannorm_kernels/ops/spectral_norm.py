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
from torch._subclasses.fake_tensor import FakeTensor

from .. import backends, checks, reference
from ..dtypes import FLOAT_DTYPES, acc_dtype, element_size
from . import Cost, OpSpec

_COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def check_settings(n_power_iterations, eps) -> tuple[int, float]:
    """As torch's: n_power_iterations >= 1; eps any finite number (0 or below: no guard, as torch's
    F.normalize with it)."""
    return checks.positive_int(n_power_iterations, "n_power_iterations"), checks.finite_number(eps, "eps")


def check_buffer_storage(name: str, buffer: torch.Tensor, weight: torch.Tensor) -> None:
    """u or v (its shape already checked): the weight's dtype and device, contiguous."""
    if buffer.dtype != weight.dtype or buffer.device != weight.device:
        raise TypeError(f"{name} must have the weight's dtype and device ({weight.dtype}, {weight.device}), "
                        f"got ({buffer.dtype}, {buffer.device})")
    if not buffer.is_contiguous():
        raise ValueError(f"{name} must be contiguous: it is updated in place")


def _byte_span(t: torch.Tensor) -> tuple[int, int] | None:
    """[first, last + 1) bytes `t` can touch (strides are never negative in torch: the last
    element is at sum((size - 1) * stride)); None for no memory to compare (empty; meta and fake
    tensors and wrapper subclasses, whose data_ptr() is 0)."""
    start = t.data_ptr()
    if t.numel() == 0 or start == 0:
        return None
    extent = t.numel() if t.is_contiguous() else sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
    return start, start + extent * t.element_size()


def _without_pointers(tensors) -> bool:
    """No data pointers to compare: under torch.compile or a torch.func transform, meta and fake
    tensors (whose data_ptr() warns)."""
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return torch.compiler.is_compiling() or any(is_wrapped(t) or t.is_meta or isinstance(t, FakeTensor)
                                                for t in tensors)


def check_buffers_apart(weights, us, vs) -> None:
    """A training call writes u and v in place: refuses a u or v sharing memory with any other u,
    v or weight of the call (u = v for a square weight, a buffer that is a row of the weight, two
    grouped layers given one u: on a GPU whichever writes last wins), which would change the
    other silently; weights may share memory (tied weights are only read). Byte spans, not
    elements: a buffer inside a strided weight's gaps is refused too. Not checked under
    torch.compile, a torch.func transform, or for tensors without data pointers (meta and fake
    tensors, wrapper subclasses). Every training forward of a layer runs it: a few microseconds
    of host time (4 on this project's 2-core development machine). One layer's tensors are
    named weight, u and v; a group's weights[k], us[k] and vs[k]."""
    if _without_pointers([*weights, *us, *vs]):
        return
    kinds = (("weight", weights), ("u", us), ("v", vs)) if len(weights) == 1 else \
        (("weights", weights), ("us", us), ("vs", vs))
    named = [(name if len(weights) == 1 else f"{name}[{k}]", name not in ("weight", "weights"), t)
             for name, group in kinds for k, t in enumerate(group)]
    spans = sorted((span, name, is_buffer) for name, is_buffer, t in named if (span := _byte_span(t)) is not None)
    for i, ((start, end), name, is_buffer) in enumerate(spans):
        for (other_start, _), other, other_is_buffer in spans[i + 1:]:
            if other_start >= end:  # sorted by start: nothing later overlaps this one
                break
            if is_buffer or other_is_buffer:
                raise ValueError(f"{name} and {other} share memory: training writes u and v in place, so one "
                                 "would silently change the other (give each its own tensor, e.g. a .clone())")


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
        check_buffer_storage(name, buffer, weight)
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
        sigma: eval only (with ``training=True`` it raises): the sigma a previous call
            returned for this same weight and these same buffers, to skip recomputing it. Every
            backend then divides by it as given (|sigma| <= eps by eps), its gradient that of
            u^T W v: a stale sigma gives a stale result.
        backend: "auto", "reference", "triton", "cuda" or "cuda-emu".

    ``sigma`` is returned for monitoring and carries no gradient; the weight's gradient treats
    u and v as constants (torch's convention). Complex weights run on the reference (sigma =
    u^H W v is then complex, as in torch). Math in fp32 for fp16/bf16 weights (u and v are
    stored in the weight's dtype). Kernel backends launch 2 n + 1 kernels to train (3 for
    n = 1), 1 in eval with a cached sigma (else 2), 2 backward.
    """
    dim = check_spectral_norm_args(weight, u, v, dim, n_power_iterations, eps, sigma)
    training = checks.flag(training, "training")
    if training and sigma is not None:
        raise ValueError("sigma (a cached sigma) is for eval only (training=False): training recomputes it")
    if training and weight.dim() > 1:
        check_buffers_apart([weight], [u], [v])
    if weight.dim() == 1 and sigma is not None:
        raise ValueError("sigma (a cached sigma) is for weights of 2 or more dims (a 1-D weight is divided by its "
                         "norm, recomputed each call)")
    name = complex_backend(backend) if weight.is_complex() else backends.resolve(backend, weight.device)
    eps = float(eps)
    if weight.dim() == 1:
        if name == "reference":
            out, denominator = reference.vector_normalize(weight, eps)
            return out, denominator.detach()
        return SPECTRAL_NORM_VECTOR(weight, eps, name)
    if name == "reference":
        out, computed = reference.spectral_norm(weight, u, v, dim, n_power_iterations, eps, training, sigma)
        return out, (computed if sigma is None else sigma).detach()
    cached = None if training else sigma
    args = (weight, u, v, cached, dim, n_power_iterations, eps, training, name)
    out, sigma, _, _ = SPECTRAL_NORM(*args)
    return out, sigma


# ---- Grouped: many weights' spectral norms in one launch set (a model's layers) --------------

def check_group_args(weights, us, vs, dims, n_power_iterations, eps) -> list[int]:
    """Validates a group (each layer as spectral_norm would, and one dtype and device for all,
    2+ dims, real), naming the bad argument; returns the normalised dims."""
    for name, value in (("weights", weights), ("us", us), ("vs", vs), ("dims", dims)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
    if not weights:
        raise ValueError("weights must hold at least one weight")
    if not len(weights) == len(us) == len(vs) == len(dims):
        raise ValueError(f"weights, us, vs and dims must have one entry per layer, got {len(weights)}, {len(us)}, "
                         f"{len(vs)}, {len(dims)}")
    normalised = []
    for k, (weight, u, v, dim) in enumerate(zip(weights, us, vs, dims)):
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2 or weight.is_complex():
            raise TypeError(f"weights[{k}] must be a real tensor of 2 or more dims (1-d and complex weights are "
                            "normalised one at a time), got "
                            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        if weight.dtype != weights[0].dtype or weight.device != weights[0].device:
            raise TypeError(f"weights[{k}] must have weights[0]'s dtype and device ({weights[0].dtype}, "
                            f"{weights[0].device}), got ({weight.dtype}, {weight.device})")
        try:
            normalised.append(check_spectral_norm_args(weight, u, v, dim, n_power_iterations, eps, None))
        except (TypeError, ValueError) as error:
            raise type(error)(f"layer {k}: {error}") from None
    return normalised


def group_cost(shapes, dtype, dims, mode: str = "train", n_power_iterations: int = 1) -> Cost:
    """A group's launches do every layer's work at once: the layers' bytes added up, the
    launches those of one weight (train 2 n + 1, eval 2, backward 2). One launch set: the CUDA
    backend runs a set per 24 layers (its kernels carry the layers in their parameters), so past
    24 its launches are this times ceil(layers / 24) (test_group_launch_budget holds both)."""
    costs = [cost(shape, dtype, dim, mode, n_power_iterations) for shape, dim in zip(shapes, dims)]
    return Cost(costs[0].launches, sum(c.bytes for c in costs), sum(c.flops for c in costs))


def _group_forward_fake(weights, us, vs, dims, n_power_iterations, eps, training):
    acc = acc_dtype(weights[0].dtype)
    layouts = [checks.matrix_shape(w.shape, d) for w, d in zip(weights, dims)]
    return ([w.new_empty(w.shape) for w in weights], weights[0].new_empty((len(weights),), dtype=acc),
            weights[0].new_empty((sum(h for h, _ in layouts),), dtype=acc),
            weights[0].new_empty((sum(w for _, w in layouts),), dtype=acc))


def _group_reference(weights, u_used, v_used, sigmas, dims, eps):
    """Each layer's W / (u^T W v) from its slice of the flat u_used, v_used."""
    outs, h_at, w_at = [], 0, 0
    for weight, dim in zip(weights, dims):
        h, w = checks.matrix_shape(weight.shape, dim)
        outs.append(reference.spectral_norm(weight, u_used[h_at:h_at + h], v_used[w_at:w_at + w], dim, 1, eps,
                                            training=False)[0])
        h_at, w_at = h_at + h, w_at + w
    return outs


def _triton_group():
    from ..triton import spectral_norm as kernels
    return kernels.spectral_norm_group_fwd, kernels.spectral_norm_group_bwd


# sigmas (L,), u_used (sum of the h), v_used (sum of the w): flat, in the layers' order.
SPECTRAL_NORM_GROUP = OpSpec(
    "spectral_norm_group_fwd(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int[] dims, int n_power_iterations, "
    "float eps, bool training) -> (Tensor[] outs, Tensor sigmas, Tensor u_used, Tensor v_used)",
    "spectral_norm_group_bwd(Tensor[] grad_outs, Tensor[] weights, Tensor u_used, Tensor v_used, Tensor sigmas, "
    "int[] dims, float eps) -> Tensor[] grad_weights",
    forward_fake=_group_forward_fake,
    backward_fake=lambda grad_outs, weights, u_used, v_used, sigmas, dims, eps: [w.new_empty(w.shape)
                                                                                for w in weights],
    reference=_group_reference, triton=_triton_group, cost=group_cost)


def spectral_norm_group(weights, us, vs, dims, n_power_iterations: int = 1, eps: float = 1e-12,
                        training: bool = True, *, backend: str = "auto") -> tuple[list[torch.Tensor], torch.Tensor]:
    """The spectral norms of many weights at once: returns ``([w / sigma(w) for w in weights],
    sigmas)``, each layer exactly as :func:`spectral_norm` would compute it (the same power
    iteration on its own ``u``, ``v``, updated in place when ``training``), in one launch set
    for all of them: 2 n + 1 launches to train, 2 in eval, 2 backward, however many weights (the
    CUDA backend: that per 24 weights, which its kernels carry in their parameters).

    Args:
        weights: real tensors of 2 or more dims, one dtype and device.
        us, vs: each weight's power-iteration buffers (as in :func:`spectral_norm`).
        dims: each weight's rows dim.
        n_power_iterations, eps, training: shared by every weight.
        backend: "auto", "reference" (each weight on its own, plain PyTorch), "triton", "cuda"
            or "cuda-emu".

    ``sigmas`` is a ``(len(weights),)`` tensor (fp32; fp64 for fp64 weights), no gradient.
    """
    dims = check_group_args(weights, us, vs, dims, n_power_iterations, eps)
    training = checks.flag(training, "training")
    if training:
        check_buffers_apart(weights, us, vs)
    name = backends.resolve(backend, weights[0].device)
    eps = float(eps)
    if name == "reference":
        results = [reference.spectral_norm(w, u, v, d, n_power_iterations, eps, training)
                   for w, u, v, d in zip(weights, us, vs, dims)]
        return [out for out, _ in results], torch.stack([s.detach().to(acc_dtype(weights[0].dtype))
                                                         for _, s in results])
    outs, sigmas, _, _ = SPECTRAL_NORM_GROUP(list(weights), list(us), list(vs), dims, n_power_iterations, eps,
                                             training, name)
    return outs, sigmas


# ---- Top k singular values (BigGAN-PyTorch's num_svs) -------------------------------------------

MAX_SVS = 8  # the kernels keep k vectors and a k x k matrix per program


def check_topk_args(weight, u, v, dim, n_power_iterations, eps) -> int:
    """As check_spectral_norm_args, for buffers u (k, h) and v (k, w), 1 <= k <= MAX_SVS."""
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2 or weight.dtype not in FLOAT_DTYPES:
        raise TypeError("weight must be a real floating-point tensor of 2 or more dims for the top-k spectral norm, "
                        f"got {tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    check_settings(n_power_iterations, eps)
    dim = checks.matrix_dim(dim, weight.dim())
    h, w = checks.matrix_shape(weight.shape, dim)
    if not isinstance(u, torch.Tensor) or u.dim() != 2 or not 1 <= u.shape[0] <= MAX_SVS:
        raise ValueError(f"u must have shape (k, {h}) with 1 <= k <= {MAX_SVS}, got "
                         f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
    k = u.shape[0]
    if k > min(h, w):
        raise ValueError(f"k = {k} singular vectors need at most min(rows, columns) = {min(h, w)} for a weight of "
                         f"shape {tuple(weight.shape)} along dim {dim} (u has shape {tuple(u.shape)})")
    for name, buffer, size in (("u", u, h), ("v", v, w)):
        if not isinstance(buffer, torch.Tensor) or buffer.shape != (k, size):
            raise ValueError(f"{name} must have shape ({k}, {size}) for a weight of shape {tuple(weight.shape)} "
                             f"along dim {dim} and k = {k}, got "
                             f"{tuple(buffer.shape) if isinstance(buffer, torch.Tensor) else type(buffer).__name__}")
        check_buffer_storage(name, buffer, weight)
    return dim


def topk_cost(shape, dtype, dim: int = 0, mode: str = "train", n_power_iterations: int = 1, k: int = 1) -> Cost:
    """k = 1's passes over W (each reads W once for all k vectors); the vectors' traffic k
    times k = 1's, plus the fp64 k x k Gram partials. Backward: k = 1's."""
    if mode == "backward":
        return cost(shape, dtype, dim, "backward")
    single = cost(shape, dtype, dim, mode, n_power_iterations)
    n, s, acc = math.prod(shape), element_size(dtype), element_size(acc_dtype(dtype))
    h = shape[dim]
    w = n // h
    vectors = (k - 1) * (h + w) * (s + 2 * acc) * (n_power_iterations if mode == "train" else 1)
    return Cost(single.launches, single.bytes + vectors, 2 * k * n * (2 * n_power_iterations + 1))


def _topk_forward_fake(weight, u, v, dim, n_power_iterations, eps, training):
    acc = acc_dtype(weight.dtype)
    return (weight.new_empty(weight.shape), weight.new_empty((u.shape[0],), dtype=acc),
            weight.new_empty(u.shape, dtype=acc), weight.new_empty(v.shape, dtype=acc))


def _triton_topk():
    from ..triton import spectral_norm as kernels
    return kernels.spectral_norm_topk_fwd, kernels.spectral_norm_topk_bwd


# sigmas (k,) the k singular value estimates; u_used (k, h), v_used (k, w). The output is
# W / sigmas[0]; its gradient treats u_0, v_0 as constants, as k = 1's.
SPECTRAL_NORM_TOPK = OpSpec(
    "spectral_norm_topk_fwd(Tensor weight, Tensor(a!) u, Tensor(b!) v, int dim, int n_power_iterations, float eps, "
    "bool training) -> (Tensor out, Tensor sigmas, Tensor u_used, Tensor v_used)",
    "spectral_norm_topk_bwd(Tensor grad_out, Tensor weight, Tensor u_used, Tensor v_used, Tensor sigmas, int dim, "
    "float eps) -> Tensor grad_weight",
    forward_fake=_topk_forward_fake,
    backward_fake=lambda grad_out, weight, u_used, v_used, sigmas, dim, eps: weight.new_empty(weight.shape),
    reference=lambda weight, u_used, v_used, sigmas, dim, eps: reference.spectral_norm(
        weight, u_used[0], v_used[0], dim, 1, eps, training=False)[0],
    triton=_triton_topk, cost=topk_cost)


def spectral_norm_topk(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int = 0,
                       n_power_iterations: int = 1, eps: float = 1e-12, training: bool = True, *,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral normalization tracking the top k singular vectors, as BigGAN-PyTorch's
    ``num_svs``: returns ``(weight / sigmas[0], sigmas)``, ``sigmas`` the k leading singular
    value estimates (fp32; fp64 for fp64 weights), no gradient.

    Args:
        weight: 2+ dims, a matrix whose rows run along ``dim``.
        u, v: the vectors as rows, shapes (k, rows) and (k, columns), 1 <= k <= 8, the
            weight's dtype, contiguous; updated in place when ``training``.
        n_power_iterations: block power iterations per training call, each U =
            orthonormalize(W V) then V = orthonormalize(W^T U) (Gram-Schmidt, in torch's
            order; for k = 1 exactly :func:`spectral_norm`).
        eps, training, backend: as in :func:`spectral_norm`.

    Kernel backends launch what k = 1 launches (2 n + 1 to train, 2 in eval, 2 backward),
    each pass reading the weight once for all k vectors.
    """
    dim = check_topk_args(weight, u, v, dim, n_power_iterations, eps)
    training = checks.flag(training, "training")
    if training:
        check_buffers_apart([weight], [u], [v])
    name = backends.resolve(backend, weight.device)
    eps = float(eps)
    if name == "reference":
        out, sigmas = reference.spectral_norm_topk(weight, u, v, dim, n_power_iterations, eps, training)
        return out, sigmas.detach()
    out, sigmas, _, _ = SPECTRAL_NORM_TOPK(weight, u, v, dim, n_power_iterations, eps, training, name)
    return out, sigmas
