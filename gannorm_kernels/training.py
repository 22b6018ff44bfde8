"""Helpers for GAN training loops that must know about spectral norm: `ema_update` (the
generator's moving average) and `reset_spectral_norm` (redraw the power-iteration vectors)."""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from torch import nn
from torch.nn.utils import parametrizations as torch_parametrizations
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as LegacySpectralNorm

from . import reference
from .dtypes import acc_dtype
from .nn import SpectralNorm


def _matching(kind: str, ema_tensors: dict, tensors: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if ema_tensors.keys() != tensors.keys():
        missing, extra = sorted(tensors.keys() - ema_tensors.keys()), sorted(ema_tensors.keys() - tensors.keys())
        raise ValueError(f"ema_update: ema_model and model must have the same {kind} (as twins do, converted or "
                         f"not); only in model: {missing[:5]}, only in ema_model: {extra[:5]}")
    pairs = []
    for name, target in ema_tensors.items():
        source = tensors[name]
        if target.shape != source.shape:
            raise ValueError(f"ema_update: {kind[:-1]} {name!r} has shape {tuple(target.shape)} in ema_model but "
                             f"{tuple(source.shape)} in model")
        pairs.append((target, source))
    return pairs


def _grouped(pairs):
    """The pairs by (device, dtype) of the target, each group one multi-tensor (foreach) op."""
    groups = defaultdict(lambda: ([], []))
    for target, source in pairs:
        targets, sources = groups[(target.device, target.dtype)]
        targets.append(target)
        sources.append(source.to(device=target.device, dtype=target.dtype))
    return groups.values()


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """The exponential moving average step: every parameter of ``ema_model`` becomes
    ``decay * ema + (1 - decay) * model``, every buffer is copied from ``model``.

    Copying, not averaging, the buffers is what matters for spectral norm: an average of two
    unit power-iteration vectors is no longer a unit vector, nor the leading singular vector of
    the averaged weight, so sigma = u^T W v comes out too small and the eval weight too large
    (BigGAN-PyTorch's ``ema`` averages every state_dict entry, ``u`` and ``v`` included).
    BatchNorm's running statistics are copied too, as StudioGAN's EMA does. Tensors are
    matched by name, so twins work whatever their norms and backends (``convert`` keeps
    torch's names). One multi-tensor ``torch._foreach_lerp_`` per (device, dtype) for the
    parameters and one ``_foreach_copy_`` for the buffers.
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
    parameters = _matching("parameters", dict(ema_model.named_parameters()), dict(model.named_parameters()))
    buffers = _matching("buffers", dict(ema_model.named_buffers()), dict(model.named_buffers()))
    for targets, sources in _grouped(parameters):
        if targets[0].is_floating_point() or targets[0].is_complex():
            torch._foreach_lerp_(targets, sources, 1.0 - decay)
        else:
            torch._foreach_copy_(targets, sources)
    for targets, sources in _grouped(buffers):
        torch._foreach_copy_(targets, sources)


def _spectral_norms(model: nn.Module):
    """(weight as a matrix, u, v, eps, legacy) for every spectral norm in `model`: ours,
    torch's parametrization and torch's legacy hook (legacy: its iteration runs v first)."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, LegacySpectralNorm):
                matrix = hook.reshape_weight_to_matrix(getattr(module, hook.name + "_orig").detach())
                yield matrix, getattr(module, hook.name + "_u"), getattr(module, hook.name + "_v"), hook.eps, True
        if not parametrize.is_parametrized(module):
            continue
        for chain in module.parametrizations.values():
            for p in chain:
                if isinstance(p, (SpectralNorm, torch_parametrizations._SpectralNorm)) and hasattr(p, "_u"):
                    matrix = reference.weight_matrix(chain.original.detach(), p.dim)
                    yield matrix, p._u, p._v, p.eps, False


@torch.no_grad()
def reset_spectral_norm(model: nn.Module, n_warmup: int = 15, *, generator: torch.Generator | None = None) -> int:
    """Redraws the power-iteration vectors of every spectral norm in ``model`` (ours, torch's
    parametrization, torch's legacy hook; converted or not) and warms them up on the current
    weight, as torch's spectral norm does when it is registered: u, then v, drawn from N(0, 1)
    and normalised, then ``n_warmup`` power iterations in the layer's own order (the legacy
    hook updates v first) (PyTorch issue #25092). The buffers are
    updated in place (the same tensors). 1-D weights have no vectors and are skipped.
    Returns how many were reset; warns if none.

    ``generator``: the random stream to draw from (default: torch's global one)."""
    if isinstance(n_warmup, bool) or not isinstance(n_warmup, int) or n_warmup < 0:
        raise ValueError(f"n_warmup must be a non-negative int, got {n_warmup!r}")
    count = 0
    for matrix, u, v, eps, legacy in list(_spectral_norms(model)):
        compute = acc_dtype(matrix.dtype)
        matrix = matrix.to(compute)
        new_u = nn.functional.normalize(torch.randn(u.shape, generator=generator, dtype=compute).to(u.device), dim=0,
                                        eps=eps)
        new_v = nn.functional.normalize(torch.randn(v.shape, generator=generator, dtype=compute).to(v.device), dim=0,
                                        eps=eps)
        if legacy:  # v = normalize(W^T u), then u = normalize(W v): u first on the transposed matrix
            reference.spectral_power_method(matrix.t(), new_v, new_u, n_warmup, eps)
        else:
            reference.spectral_power_method(matrix, new_u, new_v, n_warmup, eps)
        u.copy_(new_u)
        v.copy_(new_v)
        count += 1
    if not count:
        warnings.warn(f"reset_spectral_norm: {type(model).__name__} has no spectral norm with power-iteration "
                      "vectors; nothing changed", stacklevel=2)
    return count
