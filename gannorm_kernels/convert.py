"""Adopting the kernels in existing models: `convert` swaps torch's weight and spectral norms
for ours in place, `revert` swaps them back, `apply_norm` adds ours to the layers of a plain
model. Every learned tensor is kept (the very Parameter and buffer objects, so optimizers and
their state follow), as are the state_dict keys of torch's parametrizations.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrizations as torch_parametrizations
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as LegacySpectralNorm
from torch.nn.utils.spectral_norm import SpectralNormLoadStateDictPreHook, SpectralNormStateDictHook
from torch.nn.utils.weight_norm import WeightNorm as LegacyWeightNorm

from . import backends
from .nn import SpectralNorm, WeightNorm, _load_legacy_spectral_norm, _load_legacy_weight_norm, spectral_norm, weight_norm

DEFAULT_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                       nn.ConvTranspose3d, nn.Embedding)


def _plans(model: nn.Module):
    """(kind, module, where, weight) for every torch norm in `model`: kind is "weight" or
    "spectral" (the parametrizations API; where = (tensor name, index)) or "legacy-weight" /
    "legacy-spectral" (torch.nn.utils' hooks; where = the hook's key)."""
    found = []
    for module in model.modules():
        for key, hook in module._forward_pre_hooks.items():
            if isinstance(hook, LegacyWeightNorm):
                found.append(("legacy-weight", module, key, getattr(module, hook.name + "_v")))
            elif isinstance(hook, LegacySpectralNorm):
                found.append(("legacy-spectral", module, key, getattr(module, hook.name + "_orig")))
        if parametrize.is_parametrized(module):
            for tensor_name, parametrizations in module.parametrizations.items():
                for index, parametrization in enumerate(parametrizations):
                    weight = parametrizations.original if hasattr(parametrizations, "original") else \
                        parametrizations.original1
                    if type(parametrization) is torch_parametrizations._WeightNorm:
                        found.append(("weight", module, (tensor_name, index), weight))
                    elif type(parametrization) is torch_parametrizations._SpectralNorm:
                        found.append(("spectral", module, (tensor_name, index), weight))
    return found


def convert(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replaces, in place, every torch weight and spectral norm in ``model`` with ours.

    Both torch APIs are converted: ``torch.nn.utils.parametrizations.weight_norm`` /
    ``spectral_norm`` and the legacy ``torch.nn.utils.weight_norm`` / ``spectral_norm`` hooks.
    Every learned tensor is kept, as the same Parameter and buffer objects (g, v; the weight,
    u, v), so eval outputs are unchanged and optimizers keep working; the legacy hooks are
    removed entirely, state-dict hooks included (torch's own ``remove_spectral_norm`` leaves
    its load hook behind), and the state_dict takes the parametrizations' keys.

    Training then continues as torch's parametrizations would: converted legacy layers switch
    to the new API's update order (the power iteration runs when ``.weight`` is computed, i.e.
    on every access in training, where the legacy hook ran it once per module call).

    Args:
        model: any module; changed in place and returned.
        backend: for every converted norm; checked against each weight's device before anything
            changes.

    Warns and returns ``model`` unchanged if there is nothing to convert.
    """
    plans = _plans(model)
    if not plans:
        warnings.warn(f"convert: {type(model).__name__} has no torch weight or spectral norm to convert; "
                      "nothing changed", stacklevel=2)
        return model
    backends.check_installed(backend)
    for _, _, _, weight in plans:  # refuse before changing anything
        backends.resolve(backend, weight.device)
    for kind, module, where, _ in plans:
        if kind == "legacy-weight":
            _convert_legacy_weight_norm(module, where, backend)
        elif kind == "legacy-spectral":
            _convert_legacy_spectral_norm(module, where, backend)
        else:
            tensor_name, index = where
            parametrizations = module.parametrizations[tensor_name]
            theirs = parametrizations[index]
            if kind == "weight":
                ours = WeightNorm(theirs.dim, backend)
            else:
                weight = parametrizations.original
                ours = SpectralNorm(weight, getattr(theirs, "n_power_iterations", 1), theirs.dim, theirs.eps, backend,
                                    u=getattr(theirs, "_u", None), v=getattr(theirs, "_v", None))
            ours.train(theirs.training)
            parametrizations[index] = ours
    return model


def _convert_legacy_weight_norm(module: nn.Module, key, backend: str) -> None:
    hook = module._forward_pre_hooks.pop(key)
    name = hook.name
    g = module._parameters.pop(name + "_g")
    v = module._parameters.pop(name + "_v")
    delattr(module, name)  # the plain tensor the hook recomputed on every call
    module.register_parameter(name, nn.Parameter(v.detach().clone(), requires_grad=v.requires_grad))
    parametrize.register_parametrization(module, name, WeightNorm(hook.dim, backend), unsafe=True)
    parametrizations = module.parametrizations[name]
    parametrizations.original0, parametrizations.original1 = g, v  # the learned tensors themselves
    module._register_load_state_dict_pre_hook(functools.partial(_load_legacy_weight_norm, name))


def _convert_legacy_spectral_norm(module: nn.Module, key, backend: str) -> None:
    hook = module._forward_pre_hooks.pop(key)
    name = hook.name
    for hooks in (module._state_dict_hooks, module._load_state_dict_pre_hooks):
        for hook_key, entry in list(hooks.items()):
            inner = getattr(entry, "hook", entry)  # load hooks come wrapped in _WrappedHook
            if isinstance(inner, (SpectralNormStateDictHook,
                                  SpectralNormLoadStateDictPreHook)) and inner.fn.name == name:
                del hooks[hook_key]
    weight = module._parameters.pop(name + "_orig")
    u = module._buffers.pop(name + "_u")
    v = module._buffers.pop(name + "_v")
    delattr(module, name)
    module.register_parameter(name, weight)  # registration keeps this Parameter as `original`
    ours = SpectralNorm(weight, hook.n_power_iterations, hook.dim, hook.eps, backend, u=u, v=v)
    ours.train(module.training)
    parametrize.register_parametrization(module, name, ours, unsafe=True)
    module._register_load_state_dict_pre_hook(functools.partial(_load_legacy_spectral_norm, name))


def revert(model: nn.Module) -> nn.Module:
    """Turns every weight and spectral norm of ours in ``model`` back into torch's own
    parametrizations, in place, keeping every tensor (and so the state_dict). Returns
    ``model``; warns if there is nothing to revert."""
    reverted = 0
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for parametrizations in module.parametrizations.values():
            for index, ours in enumerate(parametrizations):
                if isinstance(ours, WeightNorm):
                    theirs = torch_parametrizations._WeightNorm(ours.dim)
                elif isinstance(ours, SpectralNorm):
                    theirs = _torch_spectral_norm(ours)
                else:
                    continue
                theirs.train(ours.training)
                parametrizations[index] = theirs
                reverted += 1
    if not reverted:
        warnings.warn(f"revert: {type(model).__name__} has no gannorm_kernels norm to revert; nothing changed",
                      stacklevel=2)
    return model


def _torch_spectral_norm(ours: SpectralNorm) -> nn.Module:
    """torch's _SpectralNorm holding our buffers (its constructor would draw new ones)."""
    theirs = torch_parametrizations._SpectralNorm.__new__(torch_parametrizations._SpectralNorm)
    nn.Module.__init__(theirs)
    theirs.dim, theirs.eps = ours.dim, ours.eps
    if hasattr(ours, "_u"):
        theirs.n_power_iterations = ours.n_power_iterations
        theirs.register_buffer("_u", ours._u)
        theirs.register_buffer("_v", ours._v)
    return theirs


def _normalised(module: nn.Module, name: str) -> bool:
    """Whether `module.<name>` already carries a norm (ours or torch's, either API)."""
    if parametrize.is_parametrized(module, name):
        return True
    return any(isinstance(hook, (LegacyWeightNorm, LegacySpectralNorm)) and
               hook.name == name for hook in module._forward_pre_hooks.values())


def apply_norm(model: nn.Module, kind: str = "spectral", *, layer_types=DEFAULT_LAYER_TYPES, name: str = "weight",
               backend: str = "auto", **kwargs) -> nn.Module:
    """Adds our ``kind`` norm ("spectral" or "weight") to ``module.<name>`` of every module of
    ``layer_types`` in ``model`` (default: Linear, Conv*, ConvTranspose*, Embedding), skipping
    those already normalised. ``kwargs`` go to :func:`spectral_norm` / :func:`weight_norm`
    (``n_power_iterations``, ``eps``, ``dim``). Returns ``model``, changed in place."""
    if kind not in ("spectral", "weight"):
        raise ValueError(f"kind must be 'spectral' or 'weight', got {kind!r}")
    if not isinstance(layer_types, tuple) or not all(isinstance(t, type) for t in layer_types):
        raise TypeError(f"layer_types must be a tuple of module classes, got {layer_types!r}")
    apply = spectral_norm if kind == "spectral" else weight_norm
    candidates = [m for m in model.modules() if isinstance(m, layer_types)]
    with_tensor = [m for m in candidates if _normalised(m, name) or isinstance(getattr(m, name, None), torch.Tensor)]
    if candidates and not with_tensor:
        raise ValueError(f"none of the {len(candidates)} matching layers of {type(model).__name__} has a parameter "
                         f"named {name!r}")
    for module in with_tensor:
        if not _normalised(module, name):
            apply(module, name, backend=backend, **kwargs)
    return model
