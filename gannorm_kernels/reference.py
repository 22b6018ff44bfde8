"""Plain-PyTorch ground truth for every op, written to be obviously correct.

Each function differentiates through ordinary autograd, runs on any device and dtype, and
computes fp16/bf16 in fp32 (fp64 stays fp64), rounding once at the end, as the kernels do;
weight_norm rounds where torch's own weight norm rounds (so do its kernels). The tests compare
every backend against these, evaluated in fp64.
"""

import contextlib

import torch

from .checks import unbatched_buffers_error
from .dtypes import acc_dtype


def weight_norm_fuses(dim: int, ndim: int) -> bool:
    """Whether torch's `torch._weight_norm(v, g, dim)` takes its fused kernel for this `dim` (as
    the caller passed it, None already mapped to -1): only dim 0 and dim ndim - 1 written that
    way. Every other dim (a middle one, any negative one, -1 = the whole tensor) runs the
    composite `v * (g / norm_except_dim(v, 2, dim))`. The two round differently in fp16/bf16,
    and the kernels round as torch does for the dim they are given."""
    return dim != -1 and (dim == 0 or dim == ndim - 1)


def _norm_dims(dim: int, ndim: int) -> list:
    """The dims the norm runs over (None: all), for dim in torch's convention."""
    if dim == -1:
        return None
    keep = dim % ndim
    return [d for d in range(ndim) if d != keep]


def _channel_sum(x, dims):
    """Sum over `dims`, kept (None: everything, to a scalar; []: nothing, a 1-d v's channels
    are its elements)."""
    if dims is None:
        return x.sum()
    return x.sum(dim=dims, keepdim=True) if dims else x


def weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
    """w = g * v / ||v||, the norm over every dim of v but `dim`, rounded where torch rounds.

    `dim` is torch._weight_norm's: -1 is the whole tensor, other negative dims count from the
    end. As torch (see `weight_norm_fuses`):
      - dim 0 and ndim - 1, torch's fused kernel (its CUDA one, `weight_norm_fwd_*_kernel` in
        aten/src/ATen/native/cuda/WeightNorm.cu): n = ||v|| in fp32, w = (g * v) * (1 / n) in
        fp32, rounded once. (torch's CPU kernel computes v * (g / n) instead, which can differ
        by one rounding; the kernels follow the GPU.)
      - every other dim: torch's composite ops, each rounded to v's dtype: n = round(||v||)
        (fp32 sum), s = round(g / n), w = round(v * s); their autograd rounds each step too.
        Written with those very ops (norm_except_dim included), so bitwise torch's on every
        device and dtype, fp32 too. The fused path's fp32 sums are not torch's (their order
        is its kernel's): fp16/bf16 results agree unless a sum lands on a rounding boundary.
    fp64 stays fp64 (every rounding is then fp64's). A channel whose direction is all zeros
    gets a zero weight and zero gradients (torch gives NaN there).
    """
    if weight_norm_fuses(dim, v.dim()):
        return _WeightNormFused.apply(v, g, dim)
    # torch's own ops in torch's order, so on every device and dtype this is bitwise torch's
    # (forward and autograd); the double where keeps 1/0 out of both the value and the
    # gradient of a zero channel (torch's norm backward is already 0 there).
    n = torch.norm_except_dim(v, 2, dim)
    nonzero = n != 0  # (a NaN norm is not zero: it propagates, as in torch)
    scale = torch.where(nonzero, g.reshape(n.shape) / torch.where(nonzero, n, torch.ones_like(n)),
                        torch.zeros_like(n))
    return v * scale


class _WeightNormFused(torch.autograd.Function):
    """torch's fused weight norm as its CUDA kernels compute it, fp32 math (fp64 for fp64):
    forward w = (g * v) * rnorm, rnorm = 1 / ||v||; backward, with dot = <grad_w, v> over the
    channel: grad_g = dot * rnorm, grad_v = g * (rnorm * grad_w - (rnorm^3 * v) * dot), where
    rnorm^3 = rnorm * rnorm * rnorm. rnorm is 0 for a zero channel. The backward is written
    in differentiable ops, so it can be differentiated again."""

    generate_vmap_rule = True  # torch ops throughout: torch.func.vmap batches them itself

    @staticmethod
    def forward(v, g, dim):
        with torch.no_grad():
            x, gx, rnorm = _fused_parts(v, g, dim)
            w = (gx * x) * rnorm
            # no .to() that returns its input: torch 2.11's compile then gives this Function zero
            # gradients (fixed by 2.14; tests/test_weight_norm.py::test_torch_compile_fullgraph)
            return w if w.dtype == v.dtype else w.to(v.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):  # apart from forward: the form torch.func accepts
        v, g, ctx.dim = inputs
        ctx.save_for_backward(v, g)

    @staticmethod
    def backward(ctx, grad_w):
        v, g = ctx.saved_tensors
        x, gx, rnorm = _fused_parts(v, g, ctx.dim)
        dims = _norm_dims(ctx.dim, v.dim())
        dw = grad_w.to(x.dtype)
        dot = _channel_sum(dw * x, dims)
        rnorm3 = rnorm * rnorm * rnorm
        grad_v = gx * (rnorm * dw - (rnorm3 * x) * dot)
        return grad_v.to(v.dtype), (dot * rnorm).to(g.dtype).reshape(g.shape), None

    # no jvp, as torch's weight norm has none (and torch.compile cannot trace a Function with one);
    # the kernel backends' forward mode differentiates weight_norm_formula


def weight_norm_formula(v: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
    """g v / ||v|| in plain differentiable ops, fp32 math (fp64 for fp64), a zero channel 0: the
    formula the kernel backends' double backward and forward mode differentiate."""
    x = v.to(acc_dtype(v.dtype))
    n = torch.norm_except_dim(x, 2, dim)
    nonzero = n != 0  # (a NaN norm is not zero: it propagates, as in torch)
    scale = torch.where(nonzero, g.to(x.dtype).reshape(n.shape) / torch.where(nonzero, n, torch.ones_like(n)),
                        torch.zeros_like(n))
    return (x * scale).to(v.dtype)


def _fused_parts(v, g, dim):
    x = v.to(acc_dtype(v.dtype))
    # sqrt and 1 / n correctly rounded, as CUDA's sqrtf and `/` are: computed in fp64 and
    # rounded to fp32, which is exact rounding for both (torch's vectorised fp32 CPU sqrt is
    # not always). fp64 stays fp64.
    norm = _channel_sum(x.pow(2), _norm_dims(dim, v.dim())).double().sqrt()
    nonzero = norm != 0
    rnorm = torch.where(nonzero, 1 / torch.where(nonzero, norm.to(x.dtype).double(), torch.ones_like(norm)),
                        torch.zeros_like(norm)).to(x.dtype)
    return x, g.to(x.dtype).reshape(norm.shape), rnorm


def weight_matrix(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The matrix spectral norm works on, as torch builds it: `dim` moved first, the rest flattened."""
    if dim != 0:
        weight = weight.permute(dim, *(d for d in range(weight.dim()) if d != dim))
    return weight.flatten(1)


@torch.no_grad()
def spectral_power_method(weight_mat: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_power_iterations: int,
                          eps: float) -> None:
    """torch's own power iteration, op for op (parametrizations._SpectralNorm._power_method):
    u = normalize(W v), then v = normalize(W^T u), written into the buffers u and v."""
    new_u, new_v = u, v
    for _ in range(n_power_iterations):
        new_u = torch.nn.functional.normalize(torch.mv(weight_mat, new_v), dim=0, eps=eps)
        new_v = torch.nn.functional.normalize(torch.mv(weight_mat.H, new_u), dim=0, eps=eps)
    _write_buffers((u, v), (new_u, new_v))


def spectral_norm(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int, n_power_iterations: int,
                  eps: float, training: bool, cached_sigma: torch.Tensor | None = None):
    """(weight / sigma, sigma) with sigma = u^H W v, W the weight as a matrix along `dim`.

    Training first runs `n_power_iterations` of the power method on u and v, in fp32 (fp64
    for fp64 weights), and writes them back into the buffers in place; eval uses the buffers
    as they are. u and v are constants for the gradient, as in torch. A |sigma| <= eps is
    replaced by eps (torch divides by sigma whatever it is). Complex weights work as in torch
    (sigma is then complex, u^H W v). ``cached_sigma`` (eval): the value divided by, in place
    of u^T W v, whose gradient it keeps (what the kernels do with a cached sigma).
    """
    compute = acc_dtype(weight.dtype)
    weight_mat = weight_matrix(weight, dim).to(compute)
    u_used = u.detach().to(compute).clone()
    v_used = v.detach().to(compute).clone()
    if training:
        spectral_power_method(weight_mat.detach(), u_used, v_used, n_power_iterations, eps)
        _write_buffers((u, v), (u_used, v_used))
    sigma = torch.vdot(u_used, torch.mv(weight_mat, v_used))
    if cached_sigma is not None:
        sigma = sigma + (cached_sigma.to(sigma.dtype) - sigma).detach()
    denominator = torch.where(sigma.abs() <= eps, torch.full_like(sigma, eps), sigma)  # a NaN sigma stays
    return (weight.to(compute) / denominator).to(weight.dtype), sigma


@torch.no_grad()
def _write_buffers(buffers, values) -> None:
    """The power iteration's results into the buffers, as out= writes (as torch's own iteration
    writes them): torch.func.grad refuses copy_ into a buffer its transform did not wrap. A
    buffer batched by torch.func.vmap (an ensemble's stacked buffers) takes copy_, since vmap
    has no rule for out=."""
    for buffer, value in zip(buffers, values):
        if _vmapped(value) and not _vmapped(buffer):
            raise unbatched_buffers_error("spectral norm")
        if _vmapped(buffer):
            buffer.copy_(value)
        else:
            torch.mul(value, 1, out=buffer)


def _vmapped(tensor: torch.Tensor) -> bool:
    """Batched by torch.func.vmap at some level (under grad too, which wraps it again). Never
    under torch.compile, which traces the transforms itself (and cannot trace this query)."""
    if torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return False


def orthonormalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram-Schmidt (modified, as BigGAN-PyTorch's) on the rows of x (k, n): row c minus its
    projections on the rows before it, divided by max(its norm, eps). Returns (q, s) with
    s_c = ||r_c||^2 / max(||r_c||, eps) (= <x_c, q_c>: the c-th singular value estimate when
    x = W^T U)."""
    q, s = [], []
    for c in range(x.shape[0]):
        r = x[c]
        for previous in q:
            r = r - torch.dot(previous, r) * previous
        norm = torch.linalg.vector_norm(r)
        denominator = torch.clamp_min(norm, eps)
        q.append(r / denominator)
        s.append(norm * norm / denominator)
    return torch.stack(q), torch.stack(s)


def spectral_norm_topk(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int, n_power_iterations: int,
                       eps: float, training: bool):
    """(weight / sigma_0, sigmas): the top k singular values of W (the weight as a matrix along
    `dim`) by block power iteration on the buffers u (k, h) and v (k, w), BigGAN-PyTorch's
    num_svs in torch's order: each training iteration U = orthonormalize(V W^T), then
    V = orthonormalize(U W), written into the buffers in place; sigmas_c = u_c^T W v_c from the
    vectors used (the buffers as they are in eval). For k = 1 this is spectral_norm. u and v
    are constants for the gradient; math in fp32 (fp64 for fp64)."""
    compute = acc_dtype(weight.dtype)
    weight_mat = weight_matrix(weight, dim).to(compute)
    u_used = u.detach().to(compute).clone()
    v_used = v.detach().to(compute).clone()
    if training:
        with torch.no_grad():
            for _ in range(n_power_iterations):
                u_used = orthonormalize(v_used @ weight_mat.T, eps)[0]
                v_used = orthonormalize(u_used @ weight_mat, eps)[0]
        _write_buffers((u, v), (u_used, v_used))
    sigmas = ((u_used @ weight_mat) * v_used).sum(1)
    sigma = sigmas[0]
    denominator = torch.where(sigma.abs() <= eps, torch.full_like(sigma, eps), sigma)  # a NaN sigma stays
    return (weight.to(compute) / denominator).to(weight.dtype), sigmas


def vector_normalize(weight: torch.Tensor, eps: float):
    """1-D weights, as torch's spectral norm treats them: (weight / max(||weight||, eps), that
    denominator)."""
    x = weight.to(acc_dtype(weight.dtype))
    denominator = torch.linalg.vector_norm(x).clamp_min(eps)
    return (x / denominator).to(weight.dtype), denominator


def _without_autocast(device: torch.device):
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def pairwise_similarity_penalty(features: torch.Tensor, kernel: str, bandwidth: float, eps: float) -> torch.Tensor:
    """Mean over ordered pairs i != j of k(f_i, f_j), features flattened to (N, D), written the
    naive way: the whole N x N similarity matrix.

    cosine: k = <f_i, f_j> / (max(||f_i||, eps) max(||f_j||, eps)) (F.normalize's guard);
    rbf: k = exp(-||f_i - f_j||^2 / (2 bandwidth^2)).
    """
    f = features.flatten(1).to(acc_dtype(features.dtype))
    n = f.shape[0]
    if kernel == "cosine":
        unit = torch.nn.functional.normalize(f, dim=1, eps=eps)
        with _without_autocast(f.device):  # fp32 math, as the kernels, under autocast too
            similarity = unit @ unit.T
    else:
        squared_distance = (f[:, None, :] - f[None, :, :]).pow(2).sum(-1)
        # (b * b, not b ** 2: a huge bandwidth gives inf, not OverflowError)
        similarity = torch.exp(-squared_distance / (2 * bandwidth * bandwidth))
    # the pairs i != j only: for a bandwidth whose 2 b^2 is 0 in fp32 the diagonal is 0 / 0
    off_diagonal = similarity.masked_fill(torch.eye(n, dtype=torch.bool, device=f.device), 0).sum()
    return (off_diagonal / (n * (n - 1))).to(features.dtype)


def minibatch_discrimination_features(m: torch.Tensor) -> torch.Tensor:
    """Salimans et al. 2016: for M of shape (N, B, C), o[i, b] = sum over j != i of
    exp(-||M[i, b] - M[j, b]||_1), written the naive way (the N x N x B x C differences)."""
    x = m.to(acc_dtype(m.dtype))
    l1 = (x[:, None, :, :] - x[None, :, :, :]).abs().sum(-1)  # (N, N, B)
    similarity = torch.exp(-l1)
    return (similarity.sum(1) - similarity.diagonal(dim1=0, dim2=1).T).to(m.dtype)


def minibatch_stddev(x: torch.Tensor, group_size: int, num_channels: int) -> torch.Tensor:
    """The ProGAN/StyleGAN2 minibatch standard-deviation layer, as StyleGAN2 writes it."""
    n, c, h, w = x.shape
    g = min(group_size, n)
    f = num_channels
    y = x.to(acc_dtype(x.dtype)).reshape(g, -1, f, c // f, h, w)  # sample g * (n / g) + m
    y = y - y.mean(dim=0)
    y = y.square().mean(dim=0)
    y = (y + 1e-8).sqrt()
    y = y.mean(dim=[2, 3, 4])
    y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)
    return torch.cat([x, y.to(x.dtype)], dim=1)
