"""Parametrizations and layers: drop-ins for torch.nn.utils.parametrizations.

A parameter's way: `module.weight` -> parametrization `forward` -> the op in `ops/` -> the
backend's launcher -> the kernel.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
import weakref

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import backends, checks, reference
from .dtypes import FLOAT_DTYPES, acc_dtype
from .ops import minibatch_discrimination as minibatch_discrimination_ops
from .ops import minibatch_stddev as minibatch_stddev_ops
from .ops import spectral_norm as spectral_norm_ops
from .ops.weight_norm import torch_dim
from .ops.weight_norm import weight_norm as weight_norm_op



def _float_weight(module: nn.Module, name: str, complex_ok: bool = False) -> torch.Tensor:
    """The tensor `name` of `module`, checked to exist and to be floating point (or complex,
    where `complex_ok`)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        have = [n for n, _ in module.named_parameters(recurse=False)]
        raise ValueError(f"{type(module).__name__} has no parameter or buffer named {name!r} "
                         f"(its parameters: {', '.join(have) or 'none'})")
    if complex_ok and weight.is_complex():
        return weight
    if weight.dtype not in FLOAT_DTYPES:
        also = ", float64, complex64 or complex128" if complex_ok else " or float64"
        raise TypeError(f"{type(module).__name__}.{name} must be float16, bfloat16, float32{also} "
                        f"to be normalised, got {weight.dtype}")
    return weight


class WeightNorm(nn.Module):
    """The weight-norm parametrization, ``w = g * v / ||v||``: torch's ``_WeightNorm`` with
    kernels. Its two originals are g (``original0``) and v (``original1``), as in torch."""

    def __init__(self, dim: int | None = 0, backend: str = "auto") -> None:
        super().__init__()
        self.dim = -1 if dim is None else dim
        self.backend = backend

    def forward(self, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
        return weight_norm_op(weight_v, weight_g, self.dim, backend=self.backend)

    def right_inverse(self, weight: torch.Tensor):
        return torch.norm_except_dim(weight, 2, self.dim), weight

    def extra_repr(self) -> str:
        return f"dim={self.dim}, backend={self.backend!r}"


def _load_legacy_weight_norm(name, state_dict, prefix, local_metadata, strict, missing_keys,
                             unexpected_keys, error_msgs) -> None:
    """Maps a legacy `torch.nn.utils.weight_norm` checkpoint (`weight_g`, `weight_v`) onto the
    parametrization's keys, as torch's own weight_norm does."""
    g_key, v_key = f"{prefix}{name}_g", f"{prefix}{name}_v"
    if g_key in state_dict and v_key in state_dict:
        state_dict[f"{prefix}parametrizations.{name}.original0"] = state_dict.pop(g_key)
        state_dict[f"{prefix}parametrizations.{name}.original1"] = state_dict.pop(v_key)


# Weights that weight norm replaced by new parameters (g, v): id -> (weak reference, what it was).
# An optimizer built before the replacement still holds them and would silently train nothing.
_REPLACED_WEIGHTS: dict[int, tuple[weakref.ref, str]] = {}
_WARNED_OPTIMIZERS: weakref.WeakSet = weakref.WeakSet()
_optimizer_hook = None


def _watch_replaced_weight(weight: torch.Tensor, what: str) -> None:
    global _optimizer_hook
    key = id(weight)
    _REPLACED_WEIGHTS[key] = (weakref.ref(weight), what)
    weakref.finalize(weight, _REPLACED_WEIGHTS.pop, key, None)
    if _optimizer_hook is None:  # torch's public global hook; costs a dict check per step
        _optimizer_hook = register_optimizer_step_pre_hook(_warn_on_replaced_weights)


def _warn_on_replaced_weights(optimizer, args, kwargs) -> None:
    if not _REPLACED_WEIGHTS or optimizer in _WARNED_OPTIMIZERS:
        return
    stale = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = _REPLACED_WEIGHTS.get(id(p))
            if entry is not None and entry[0]() is p:
                stale.append(entry[1])
    if stale:
        _WARNED_OPTIMIZERS.add(optimizer)
        warnings.warn(f"{type(optimizer).__name__} holds {len(stale)} tensor(s) that weight norm replaced by new "
                      f"parameters g and v ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}): they no "
                      "longer affect the model, and g and v are not in this optimizer, so those layers do not train. "
                      "Build the optimizer after applying weight norm (apply_norm, weight_norm, "
                      "adaptive_weight_norm).", UserWarning, stacklevel=3)


def _register_weight_norm(module: nn.Module, name: str, parametrization: WeightNorm) -> nn.Module:
    weight = _float_weight(module, name)
    torch_dim(parametrization.dim, weight.dim())
    backends.check_installed(parametrization.backend)
    what = f"{type(module).__name__}.{name}"
    parametrize.register_parametrization(module, name, parametrization, unsafe=True)
    module._register_load_state_dict_pre_hook(functools.partial(_load_legacy_weight_norm, name))
    if isinstance(weight, nn.Parameter):
        _watch_replaced_weight(weight, what)
    return module


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0, *, backend: str = "auto") -> nn.Module:
    """Applies weight normalization to ``module.<name>``; a drop-in for
    :func:`torch.nn.utils.parametrizations.weight_norm`.

    ``w = g * v / ||v||`` with the norm over every dim but ``dim`` (``None``: the whole tensor).
    Same parametrization layout and state_dict keys as torch's
    (``parametrizations.<name>.original0`` = g, ``original1`` = v), so checkpoints move both
    ways; legacy ``<name>_g`` / ``<name>_v`` checkpoints load too. A zero direction gives a
    zero weight instead of NaN.

    Args:
        module: the module holding the weight (Linear, Conv*, ConvTranspose*, Embedding, ...).
        name: the parameter to normalise.
        dim: the dim that keeps its own norm (torch's default 0).
        backend: "auto", "reference", "triton", "cuda" or "cuda-emu". Checked to exist here;
            whether it can run on the weight's device is checked on each use, so a module may
            be built on the CPU and moved.

    Returns:
        ``module``, parametrized in place.

    As with torch's, ``module.<name>`` is replaced by two new parameters: build the optimizer
    afterwards (an optimizer that still holds the old tensor warns on its first step).
    """
    return _register_weight_norm(module, name, WeightNorm(dim, backend))


class AdaptiveWeightNorm(WeightNorm):
    """Weight norm whose magnitude starts at a constant and trains with its own learning rate
    (see :func:`adaptive_weight_norm` and :func:`scale_param_groups`)."""

    def __init__(self, dim: int | None, backend: str, init_scale: float, per: str) -> None:
        super().__init__(dim, backend)
        self.init_scale = init_scale
        self.per = per

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per={self.per!r}, init_scale={self.init_scale}"


def adaptive_weight_norm(module: nn.Module, name: str = "weight", dim: int = 0, *, init_scale: float = 0.1,
                         per: str = "channel", backend: str = "auto") -> nn.Module:
    """Weight normalization with an adaptive scaling factor.

    ``w = g * v / ||v||`` where the magnitude g starts at the constant ``init_scale`` (not at
    ``||weight||`` as in plain weight norm) and is meant to train with its own learning rate
    through :func:`scale_param_groups`. The direction v keeps the module's initial weight.

    Args:
        module, name: as in :func:`weight_norm`.
        dim: the channel dim when ``per="channel"``; left out for ``per="layer"``.
        init_scale: the initial magnitude, > 0.
        per: ``"channel"``: one g per channel along ``dim``, each channel of w has norm g;
            ``"layer"``: one g for the layer, ``||w|| = g`` over the whole tensor.
        backend: as in :func:`weight_norm`.

    The state_dict keys are weight norm's (``original0`` = g, ``original1`` = v).
    """
    if per not in ("channel", "layer"):
        raise ValueError(f"per must be 'channel' or 'layer', got {per!r}")
    if per == "channel" and dim is None:
        raise ValueError("per='channel' needs a channel dim, got dim=None; per='layer' gives the whole tensor "
                         "one magnitude")
    if per == "layer" and dim not in (0, None):  # 0: the default, left as it is
        raise ValueError(f"per='layer' gives the whole tensor one magnitude: leave dim out, got dim={dim!r}")
    init_scale = checks.positive_number(init_scale, "init_scale")
    parametrization = AdaptiveWeightNorm(dim if per == "channel" else None, backend, init_scale, per)
    _register_weight_norm(module, name, parametrization)
    with torch.no_grad():
        module.parametrizations[name].original0.fill_(init_scale)
    return module


def scale_param_groups(model: nn.Module, scale_lr: float) -> list[dict]:
    """Optimizer parameter groups giving every adaptive-weight-norm magnitude ``scale_lr``.

    Returns ``[{"params": everything else}, {"params": the magnitudes, "lr": scale_lr}]``, to
    pass to any ``torch.optim`` optimizer (the first group takes the optimizer's defaults).
    Raises ValueError if ``model`` has no :func:`adaptive_weight_norm` layer.
    """
    if isinstance(scale_lr, bool) or not isinstance(scale_lr, numbers.Real) or not 0 <= scale_lr < math.inf:
        raise ValueError(f"scale_lr must be a non-negative number, got {scale_lr!r}")
    scales = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for parametrizations in module.parametrizations.values():
            if isinstance(parametrizations[0], AdaptiveWeightNorm):
                scales.append(parametrizations.original0)
    if not scales:
        raise ValueError(f"{type(model).__name__} has no adaptive_weight_norm layer: nothing to give scale_lr")
    scale_ids = {id(p) for p in scales}
    others = [p for p in model.parameters() if id(p) not in scale_ids]
    return [{"params": others}, {"params": scales, "lr": float(scale_lr)}]


def saved_tensor_hooks_active() -> bool:
    """Whether autograd's saved-tensor hooks are on: activation checkpointing
    (torch.utils.checkpoint, non-reentrant) or save_on_cpu.

    A grouped layer used under them computes its W / sigma where it is used, from the u and v
    the group's iteration already updated (no second iteration): checkpointing matches the
    tensors each op saves with those its recomputation saves, and the recomputation, run
    outside the model's forward, is the layer's own op; so the first pass must save what an
    ungrouped layer saves. Values and buffers are then those of the ungrouped layer."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # torch >= 2.8
    if top is None:
        return False  # older torch: grouped as usual (checkpointing then refuses the mismatch itself)
    try:
        return top(False) is not None  # ignore_is_tracing
    except TypeError:  # a release whose peek takes no argument
        return top() is not None


class _LastSigmas:
    """A layer's last sigma(s), in an object of their own: nn.DataParallel's replicas are shallow
    copies of the layer, so their forwards write here too (sigmas() of the model sees them)."""

    def __init__(self) -> None:
        self.sigma: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None


class SpectralNorm(nn.Module):
    """The spectral-norm parametrization, ``W / sigma``: torch's ``_SpectralNorm`` with kernels.

    Same buffers (``_u``, ``_v``, drawn from the same random stream), the same 15 warm-up
    iterations, the same update order (u, then v, in place, every training forward), no update
    in eval, and 1-D weights divided by their norm. An eval forward recomputes sigma = u^T W v
    from the tensors as they are (2 launches): nothing is cached, so writes through ``.data``,
    fused optimizers, EMA copies and ``load_state_dict`` are always seen.
    """

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12,
                 backend: str = "auto", *, u: torch.Tensor | None = None, v: torch.Tensor | None = None,
                 num_svs: int = 1, sigmas_buffer: bool = False) -> None:
        """``u``, ``v``: existing buffers to adopt as they are (convert() takes over torch's this
        way); by default they are drawn and warmed up as torch does. ``num_svs`` > 1: see
        :func:`spectral_norm`."""
        super().__init__()
        self._last = _LastSigmas()
        n_power_iterations, eps = spectral_norm_ops.check_settings(n_power_iterations, eps)
        num_svs = checks.positive_int(num_svs, "num_svs")
        sigmas_buffer = checks.flag(sigmas_buffer, "sigmas_buffer")
        if num_svs > spectral_norm_ops.MAX_SVS:
            raise ValueError(f"num_svs must be at most {spectral_norm_ops.MAX_SVS}, got {num_svs}")
        if (num_svs > 1 or sigmas_buffer) and (weight.ndim < 2 or weight.is_complex()):
            raise ValueError("num_svs > 1 and sigmas_buffer need a real weight of 2 or more dims, got "
                             f"{tuple(weight.shape)} {weight.dtype}")
        self.dim = checks.matrix_dim(dim, weight.ndim) if weight.ndim > 1 else 0
        if num_svs > 1 and num_svs > min(checks.matrix_shape(weight.shape, self.dim)):
            raise ValueError(f"num_svs = {num_svs} needs at most min(rows, columns) = "
                             f"{min(checks.matrix_shape(weight.shape, self.dim))} for a weight of shape "
                             f"{tuple(weight.shape)} along dim {self.dim}")
        self.eps = eps
        self.n_power_iterations = n_power_iterations
        self.backend = backend
        self.num_svs = num_svs
        with torch.no_grad():
            if num_svs > 1:
                weight_mat = reference.weight_matrix(weight, self.dim)
                h, w = weight_mat.size()
                u = weight_mat.new_empty(num_svs, h).normal_(0, 1)
                v = weight_mat.new_empty(num_svs, w).normal_(0, 1)
                # orthonormal rows, then the warm-up torch gives k = 1 (15 + the forward's n)
                u, v = reference.orthonormalize(u, eps)[0], reference.orthonormalize(v, eps)[0]
                reference.spectral_norm_topk(weight_mat, u, v, 0, 15 + n_power_iterations, eps, True)
            elif weight.ndim > 1 and (u is None or v is None):
                weight_mat = reference.weight_matrix(weight, self.dim)
                h, w = weight_mat.size()
                u = nn.functional.normalize(weight_mat.new_empty(h).normal_(0, 1), dim=0, eps=self.eps)
                v = nn.functional.normalize(weight_mat.new_empty(w).normal_(0, 1), dim=0, eps=self.eps)
                # torch's 15 warm-up iterations, then the n of the training-mode forward its
                # registration runs: with torch's own ops, the buffers are bitwise torch's.
                reference.spectral_power_method(weight_mat, u, v, 15 + n_power_iterations, self.eps)
            if weight.ndim > 1:
                self.register_buffer("_u", u)
                self.register_buffer("_v", v)
        if sigmas_buffer:  # for loggers that read checkpoints (BigGAN-PyTorch's sv0, sv1, ...)
            self.register_buffer("_sigmas", self.sigmas_of(weight))

    # The sigma(s) of the last forward (sigmas() reads them); None until one has run, and after
    # a load_state_dict or reset_spectral_norm (sigmas() then computes them from the tensors).
    @property
    def last_sigma(self) -> torch.Tensor | None:
        return self._last.sigma

    @last_sigma.setter
    def last_sigma(self, value: torch.Tensor | None) -> None:
        self._last.sigma = value

    @property
    def last_sigmas(self) -> torch.Tensor | None:
        return self._last.sigmas

    @last_sigmas.setter
    def last_sigmas(self, value: torch.Tensor | None) -> None:
        self._last.sigmas = value

    def _load_from_state_dict(self, *args, **kwargs):
        self.last_sigma = self.last_sigmas = None
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def sigmas_of(self, weight: torch.Tensor) -> torch.Tensor:
        """The (num_svs,) singular values an eval forward of ``weight`` would use, from the
        buffers as they are (for 1-D weights: the norm it divides by)."""
        compute = acc_dtype(weight.dtype)  # as the kernels: fp32 for fp16/bf16
        if weight.ndim == 1:
            return torch.linalg.vector_norm(weight.to(compute)).clamp_min(self.eps).reshape(1)
        matrix, u, v = reference.weight_matrix(weight, self.dim).to(compute), self._u.to(compute), self._v.to(compute)
        if self.num_svs > 1:
            return ((u @ matrix) * v).sum(1)
        return torch.vdot(u, torch.mv(matrix, v)).reshape(1)

    # Set by a SpectralNormGroup (training.group_spectral_norms) when its model's forward starts:
    # this layer's W / sigma, computed with the others'; the first use takes it.
    grouped: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        training = self.training
        if self.grouped is not None:
            out, self.grouped = self.grouped, None
            if not saved_tensor_hooks_active():
                return out
            training = False  # the group iterated; see saved_tensor_hooks_active
        if weight.ndim == 1:
            out, self.last_sigma = spectral_norm_ops.spectral_norm(weight, eps=self.eps, backend=self.backend)
            self.last_sigmas = self.last_sigma.reshape(1)
            return out
        if self.num_svs > 1:
            out, self.last_sigmas = spectral_norm_ops.spectral_norm_topk(
                weight, self._u, self._v, self.dim, self.n_power_iterations, self.eps, training,
                backend=self.backend)
            self.last_sigma = self.last_sigmas[0]
        else:
            out, self.last_sigma = spectral_norm_ops.spectral_norm(
                weight, self._u, self._v, self.dim, self.n_power_iterations, self.eps, training,
                backend=self.backend)
            self.last_sigmas = self.last_sigma.reshape(1)
        if training and hasattr(self, "_sigmas"):
            with torch.no_grad():
                self._sigmas.copy_(self.last_sigmas)
        return out

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def extra_repr(self) -> str:
        svs = f", num_svs={self.num_svs}" if self.num_svs > 1 else ""
        return (f"dim={self.dim}, n_power_iterations={self.n_power_iterations}, eps={self.eps}{svs}, "
                f"backend={self.backend!r}")


def _load_legacy_spectral_norm(name, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                               error_msgs) -> None:
    """Maps a legacy `torch.nn.utils.spectral_norm` checkpoint (`weight_orig`, `weight_u`,
    `weight_v`) onto the parametrization's keys."""
    keys = {f"{prefix}{name}_orig": f"{prefix}parametrizations.{name}.original",
            f"{prefix}{name}_u": f"{prefix}parametrizations.{name}.0._u",
            f"{prefix}{name}_v": f"{prefix}parametrizations.{name}.0._v"}
    if f"{prefix}{name}_orig" in state_dict and f"{prefix}{name}_u" in state_dict:
        if f"{prefix}{name}_v" not in state_dict:
            error_msgs.append(f"{prefix}{name}: a legacy spectral_norm checkpoint without {name}_v (written by "
                              "torch < 1.1) is not supported; load it into torch.nn.utils.spectral_norm and save again")
            return
        for old, new in keys.items():
            state_dict[new] = state_dict.pop(old)


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: int | None = None, *, backend: str = "auto", num_svs: int = 1,
                  sigmas_buffer: bool = False) -> nn.Module:
    """Applies spectral normalization to ``module.<name>``; a drop-in for
    :func:`torch.nn.utils.parametrizations.spectral_norm`.

    ``W / sigma(W)``, sigma estimated by power iteration on buffers ``_u``, ``_v``: the same
    defaults, state_dict keys (``parametrizations.<name>.original``,
    ``parametrizations.<name>.0._u``, ``._v``), random initialisation and warm-up, update order,
    in-place buffer updates and clone semantics as torch, so models trained with either stay
    equal step after step; legacy ``torch.nn.utils.spectral_norm`` checkpoints
    (``<name>_orig``, ``<name>_u``, ``<name>_v``) load too. ``dim`` defaults to 1 for
    ConvTranspose modules and 0 otherwise.

    A training forward costs 3 kernel launches (torch: 13 ops), its backward 2 (torch: 9); an
    eval forward 2 (torch: 5), recomputing sigma from the current weight and buffers every
    time. Complex weights are supported as in torch (on the reference backend, which "auto"
    picks for them). ``sigmas(model)`` reads the last sigmas.

    Args:
        module: the module holding the weight.
        name: the parameter to normalise.
        n_power_iterations: power-iteration steps per training forward.
        eps: guards every normalisation.
        dim: the output dim (rows of the matrix); None: as torch chooses.
        backend: "auto", "reference", "triton", "cuda" or "cuda-emu" (checked to exist here, and
            to run on the weight's device on each use).
        num_svs: track the top ``num_svs`` (at most 8) singular vectors, as BigGAN-PyTorch's
            ``num_svs``: the buffers ``_u``, ``_v`` become (num_svs, rows) and (num_svs,
            columns), each training forward runs block power iteration (U = orthonormalize(W V),
            then V = orthonormalize(W^T U), Gram-Schmidt, torch's order) and divides by the
            first singular value; ``sigmas(model, k=...)`` reads them all. The same launches
            as 1, each pass over the weight serving every vector. 1 (default): torch's.
        sigmas_buffer: also keep the singular values in a ``_sigmas`` buffer (state_dict key
            ``parametrizations.<name>.0._sigmas``), updated by every training forward (one copy),
            for loggers that read checkpoints.
    """
    weight = _float_weight(module, name, complex_ok=True)
    if dim is None:
        dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    backends.check_installed(backend)
    if weight.is_complex():
        spectral_norm_ops.complex_backend(backend)  # raises for an explicit kernel backend
    parametrization = SpectralNorm(weight, n_power_iterations, dim, eps, backend, num_svs=num_svs,
                                   sigmas_buffer=sigmas_buffer)
    # unsafe: torch's registration evaluates the parametrization once; SpectralNorm.__init__
    # has already done exactly that work with torch's own ops, and no kernel need run here.
    parametrize.register_parametrization(module, name, parametrization, unsafe=True)
    module._register_load_state_dict_pre_hook(functools.partial(_load_legacy_spectral_norm, name))
    return module


class MinibatchDiscrimination(nn.Module):
    """Minibatch discrimination (Salimans et al. 2016), with a fused pairwise kernel.

    Parameter ``T`` of shape (in_features, num_kernels, kernel_dim), drawn from N(0, 1).
    ``M = x @ T``; ``o_b(x_i) = sum_{j != i} exp(-||M_ib - M_jb||_1)``; returns
    ``cat([x, o], 1)``, (N, in_features) -> (N, in_features + num_kernels). Memory is
    O(N num_kernels kernel_dim) instead of the usual N x N x num_kernels x kernel_dim.
    """

    def __init__(self, in_features: int, num_kernels: int, kernel_dim: int, *, backend: str = "auto") -> None:
        super().__init__()
        in_features, num_kernels, kernel_dim = (checks.positive_int(value, what) for value, what in (
            (in_features, "in_features"), (num_kernels, "num_kernels"), (kernel_dim, "kernel_dim")))
        backends.check_installed(backend)
        self.in_features, self.num_kernels, self.kernel_dim = in_features, num_kernels, kernel_dim
        self.backend = backend
        self.T = nn.Parameter(torch.empty(in_features, num_kernels, kernel_dim))
        nn.init.normal_(self.T, 0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and (x.dim() != 2 or x.shape[1] != self.in_features):  # x, not the layer's T
            raise ValueError(f"x must have shape (N, in_features={self.in_features}), got {tuple(x.shape)}")
        return minibatch_discrimination_ops.minibatch_discrimination(x, self.T, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_kernels={self.num_kernels}, kernel_dim={self.kernel_dim}, "
                f"backend={self.backend!r}")


class MinibatchStdDev(nn.Module):
    """The ProGAN/StyleGAN2 minibatch standard-deviation layer, fused into one kernel each way:
    (N, C, H, W) -> (N, C + num_channels, H, W); see
    :func:`gannorm_kernels.functional.minibatch_stddev`."""

    def __init__(self, group_size: int | None = 4, num_channels: int = 1, *, backend: str = "auto") -> None:
        super().__init__()
        if group_size is not None:  # None: the whole batch, as StyleGAN2-ADA
            group_size = checks.positive_int(group_size, "group_size")
        num_channels = checks.positive_int(num_channels, "num_channels")
        backends.check_installed(backend)
        self.group_size, self.num_channels, self.backend = group_size, num_channels, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return minibatch_stddev_ops.minibatch_stddev(x, self.group_size, self.num_channels, backend=self.backend)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}, backend={self.backend!r}"
