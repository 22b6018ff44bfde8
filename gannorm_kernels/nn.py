"""Parametrizations and layers: drop-ins for torch.nn.utils.parametrizations.

A parameter's way: `module.weight` -> parametrization `forward` -> the op in `ops/` -> the
backend's launcher -> the kernel.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import backends
from .ops.weight_norm import normalize_dim
from .ops.weight_norm import weight_norm as weight_norm_op

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _float_weight(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor `name` of `module`, checked to exist and to be floating point."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        have = [n for n, _ in module.named_parameters(recurse=False)]
        raise ValueError(f"{type(module).__name__} has no parameter or buffer named {name!r} "
                         f"(its parameters: {', '.join(have) or 'none'})")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{type(module).__name__}.{name} must be float16, bfloat16, float32 or float64 "
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


def _register_weight_norm(module: nn.Module, name: str, parametrization: WeightNorm) -> nn.Module:
    weight = _float_weight(module, name)
    normalize_dim(parametrization.dim, weight.dim())
    backends.check_installed(parametrization.backend)
    parametrize.register_parametrization(module, name, parametrization, unsafe=True)
    module._register_load_state_dict_pre_hook(functools.partial(_load_legacy_weight_norm, name))
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
        dim: the channel dim when ``per="channel"``.
        init_scale: the initial magnitude, > 0.
        per: ``"channel"``: one g per channel along ``dim``, each channel of w has norm g;
            ``"layer"``: one g for the layer, ``||w|| = g`` over the whole tensor.
        backend: as in :func:`weight_norm`.

    The state_dict keys are weight norm's (``original0`` = g, ``original1`` = v).
    """
    if per not in ("channel", "layer"):
        raise ValueError(f"per must be 'channel' or 'layer', got {per!r}")
    if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not 0 < init_scale < float("inf"):
        raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
    parametrization = AdaptiveWeightNorm(dim if per == "channel" else None, backend, float(init_scale), per)
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
    if isinstance(scale_lr, bool) or not isinstance(scale_lr, (int, float)) or not scale_lr >= 0:
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
    return [{"params": others}, {"params": scales, "lr": scale_lr}]
