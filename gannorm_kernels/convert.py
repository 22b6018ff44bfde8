"""Adopting the kernels in existing models: `convert` swaps torch's weight and spectral norms
for ours in place, `revert` swaps them back, `apply_norm` adds ours to the layers of a plain
model. Every learned tensor is kept (the very Parameter and buffer objects, so optimizers and
their state follow), as are the state_dict keys of torch's parametrizations.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrizations as torch_parametrizations
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as LegacySpectralNorm
from torch.nn.utils.spectral_norm import SpectralNormLoadStateDictPreHook, SpectralNormStateDictHook
from torch.nn.utils.weight_norm import WeightNorm as LegacyWeightNorm

from . import backends
from .dtypes import acc_dtype
from .nn import SpectralNorm, WeightNorm, saved_tensor_hooks_active, spectral_norm, weight_norm
from .ops import spectral_norm as spectral_norm_ops
from .ops.spectral_norm import spectral_norm as spectral_norm_op
from .ops.weight_norm import weight_norm as weight_norm_op

DEFAULT_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                       nn.ConvTranspose3d, nn.Embedding)


def _plans(model: nn.Module):
    """(kind, module, where, weight) for every torch norm in `model`: kind is "weight" or
    "spectral" (the parametrizations API; where = (tensor name, index)) or "legacy-weight" /
    "legacy-spectral" (torch.nn.utils' hooks; where = the hook's key)."""
    found = []
    for module in model.modules():
        for key, hook in module._forward_pre_hooks.items():
            if type(hook) is LegacyWeightNorm:
                found.append(("legacy-weight", module, key, getattr(module, hook.name + "_v")))
            elif type(hook) is LegacySpectralNorm:
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

    Both torch APIs are converted, each layer keeping its own API family:

    - ``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm``: our
      parametrizations take the place of torch's, with the same keys and semantics.
    - the legacy ``torch.nn.utils.weight_norm`` / ``spectral_norm`` hooks (what most public
      GAN and vocoder code uses): the hook is replaced by a subclass of torch's own hook that
      computes the weight with our kernels. Everything else stays torch's: the state_dict keys
      (``weight_g``/``weight_v``, ``weight_orig``/``weight_u``/``weight_v``) and attributes,
      the power iteration's order (v, then u) and timing (once per module call, in training),
      ``remove_weight_norm`` / ``remove_spectral_norm``, ``torch.save(model)``, and its
      checkpoints load into the user's own unconverted model.

    Every learned tensor is kept, as the same Parameter and buffer objects, so eval outputs are
    unchanged (up to fp32 rounding) and optimizers keep working.

    Args:
        model: any module; changed in place and returned.
        backend: for every converted norm; checked against each weight's device before anything
            changes (weights on the meta device: when the placed model runs).

    Warns and returns ``model`` unchanged if there is nothing to convert.
    """
    plans = _plans(model)
    if not plans:
        if _has_our_norms(model):
            warnings.warn(f"convert: the norms of {type(model).__name__} are gannorm_kernels' already; nothing "
                          "changed (to move them to another backend: revert(model), then convert(model, backend=...))",
                          stacklevel=2)
        else:
            warnings.warn(f"convert: {type(model).__name__} has no torch weight or spectral norm to convert; "
                          "nothing changed", stacklevel=2)
        return model
    backends.check_installed(backend)
    for kind, _, _, weight in plans:  # refuse before changing anything
        if weight.is_complex() and kind.endswith("spectral"):
            spectral_norm_ops.complex_backend(backend)
        elif weight.device.type != "meta":  # a model built on meta is placed later: checked when it runs
            backends.resolve(backend, weight.device)
    ours = {}  # every parametrization built from torch's chains as they are, before any changes
    for kind, module, where, _ in plans:
        if kind in ("weight", "spectral"):
            tensor_name, index = where
            theirs = module.parametrizations[tensor_name][index]
            if kind == "weight":
                ours[id(theirs)] = WeightNorm(theirs.dim, backend)
            else:
                ours[id(theirs)] = SpectralNorm(parametrization_input(module.parametrizations[tensor_name], index),
                                                getattr(theirs, "n_power_iterations", 1), theirs.dim, theirs.eps,
                                                backend, u=getattr(theirs, "_u", None), v=getattr(theirs, "_v", None))
            ours[id(theirs)].train(theirs.training)
    for kind, module, where, _ in plans:
        if kind == "legacy-weight":
            _convert_legacy_weight_norm(module, where, backend)
        elif kind == "legacy-spectral":
            _convert_legacy_spectral_norm(module, where, backend)
        else:
            tensor_name, index = where
            chain = module.parametrizations[tensor_name]
            chain[index] = ours[id(chain[index])]
    return model


def _has_our_norms(model: nn.Module) -> bool:
    for module in model.modules():
        if any(isinstance(h, (LegacyWeightNormKernels, LegacySpectralNormKernels))
               for h in module._forward_pre_hooks.values()):
            return True
        if parametrize.is_parametrized(module) and any(
                isinstance(p, (WeightNorm, SpectralNorm)) for chain in module.parametrizations.values() for p in chain):
            return True
    return False


@torch.no_grad()
def parametrization_input(chain, index: int) -> torch.Tensor:
    """What the parametrization at `index` of a chain receives: the original tensor, or what
    the parametrizations before it make of the originals (weight norm, then spectral norm)."""
    if index == 0:
        return chain.original
    x = chain[0](chain.original) if chain.is_tensor else chain[0](*(getattr(chain, f"original{i}")
                                                                   for i in range(chain.ntensors)))
    for parametrization in list(chain)[1:index]:
        x = parametrization(x)
    return x


class LegacyWeightNormKernels(LegacyWeightNorm):
    """torch.nn.utils.weight_norm's forward pre-hook, its weight computed by our kernels: the
    same parameters (``<name>_g``, ``<name>_v``), timing and ``remove_weight_norm``."""

    def __init__(self, name: str, dim: int, backend: str) -> None:
        super().__init__(name, dim)
        self.backend = backend

    def compute_weight(self, module: nn.Module) -> torch.Tensor:
        return weight_norm_op(getattr(module, self.name + "_v"), getattr(module, self.name + "_g"), self.dim,
                              backend=self.backend)


class LegacySpectralNormKernels(LegacySpectralNorm):
    """torch.nn.utils.spectral_norm's forward pre-hook, its weight computed by our kernels: the
    same parameters and buffers (``<name>_orig``, ``<name>_u``, ``<name>_v``), the same power
    iteration (v = normalize(W^T u), then u = normalize(W v), in place, once per module call in
    training) and ``remove_spectral_norm``.

    Our kernels iterate u first, then v; on the transposed matrix, with the buffers' roles
    swapped, that is exactly the legacy order, and sigma = v^T W^T u = u^T W v. For dim 0 the
    transposed matrix is a view of the weight (no copy); for other dims (ConvTranspose) the
    weight is permuted into a copy first, as torch's own reshape does, and the result copied
    back into the weight's layout.
    """

    def __init__(self, name: str, n_power_iterations: int, dim: int, eps: float, backend: str) -> None:
        super().__init__(name, n_power_iterations, dim, eps)
        self.backend = backend

    grouped = None  # as SpectralNorm.grouped
    last_sigma: torch.Tensor | None = None  # the last forward's (sigmas() reads it)

    @torch.no_grad()
    def sigmas_of(self, module: nn.Module) -> torch.Tensor:
        """The (1,) sigma = u^T W v an eval forward would use, from the tensors as they are."""
        weight = getattr(module, self.name + "_orig")
        compute = acc_dtype(weight.dtype)
        u, v = (getattr(module, self.name + suffix).to(compute) for suffix in ("_u", "_v"))
        return torch.vdot(u, torch.mv(self.reshape_weight_to_matrix(weight).to(compute), v)).reshape(1)

    def compute_weight(self, module: nn.Module, do_power_iteration: bool) -> torch.Tensor:
        if self.grouped is not None:
            out, self.grouped = self.grouped, None
            if not saved_tensor_hooks_active():
                return out
            do_power_iteration = False  # the group iterated; see saved_tensor_hooks_active
        weight = getattr(module, self.name + "_orig")
        matrix = self.reshape_weight_to_matrix(weight)  # (h, w); rows along self.dim
        u, v = getattr(module, self.name + "_u"), getattr(module, self.name + "_v")
        out, self.last_sigma = spectral_norm_op(matrix, v, u, dim=1, n_power_iterations=self.n_power_iterations,
                                                eps=self.eps, training=do_power_iteration, backend=self.backend)
        if self.dim == 0:
            return out.reshape(weight.shape)
        permuted = (weight.shape[self.dim],) + tuple(s for d, s in enumerate(weight.shape) if d != self.dim)
        # contiguous, as torch's weight_orig / sigma: the layer (and fold's plain weight) gets
        # the layout it had, not a strided view (one more copy, as torch's own permutation)
        return out.reshape(permuted).movedim(0, self.dim).contiguous()


def _convert_legacy_weight_norm(module: nn.Module, key, backend: str) -> None:
    hook = module._forward_pre_hooks[key]
    module._forward_pre_hooks[key] = LegacyWeightNormKernels(hook.name, hook.dim, backend)


def _convert_legacy_spectral_norm(module: nn.Module, key, backend: str) -> None:
    hook = module._forward_pre_hooks[key]
    ours = LegacySpectralNormKernels(hook.name, hook.n_power_iterations, hook.dim, hook.eps, backend)
    _replace_legacy_spectral_hook(module, key, hook, ours)


def _replace_legacy_spectral_hook(module: nn.Module, key, old, new) -> None:
    """Puts `new` where `old` was: the forward pre-hook and the state-dict hooks that hold it.
    (torch's _WrappedHook around the load hook keeps a copy of the hook's attributes from
    functools.update_wrapper, `fn` included; it calls the hook it wraps, whose `fn` is set here.)"""
    module._forward_pre_hooks[key] = new
    for hooks in (module._state_dict_hooks, module._load_state_dict_pre_hooks):
        for entry in hooks.values():
            inner = getattr(entry, "hook", entry)  # load hooks come wrapped in _WrappedHook
            if isinstance(inner, (SpectralNormStateDictHook, SpectralNormLoadStateDictPreHook)) and inner.fn is old:
                inner.fn = new
                if isinstance(inner, SpectralNormLoadStateDictPreHook):  # ours forgets the last sigma; torch's back
                    inner.__class__ = (_LoadForgettingLastSigma if isinstance(new, LegacySpectralNormKernels)
                                       else SpectralNormLoadStateDictPreHook)


class _LoadForgettingLastSigma(SpectralNormLoadStateDictPreHook):
    """torch's legacy load hook, which also drops the converted layer's last sigma: sigmas()
    then reads the loaded tensors, not the forward before the load."""

    def __call__(self, *args, **kwargs):
        self.fn.last_sigma = None
        return super().__call__(*args, **kwargs)


def revert(model: nn.Module) -> nn.Module:
    """Turns every weight and spectral norm of ours in ``model`` back into torch's own, in
    place, keeping every tensor (and so the state_dict): our parametrizations become torch's
    parametrizations, the legacy hooks :func:`convert` took over become torch's legacy hooks
    again. Returns ``model``; warns if there is nothing to revert. A norm with no torch
    equivalent (``num_svs > 1``, ``sigmas_buffer``) is refused before anything changes."""
    for name, module in model.named_modules():
        for chain_name, chain in (module.parametrizations.items() if parametrize.is_parametrized(module) else ()):
            if any(isinstance(p, SpectralNorm) and (p.num_svs > 1 or hasattr(p, "_sigmas")) for p in chain):
                where = f"{name}.{chain_name}" if name else chain_name
                raise ValueError(f"revert: {where}: a spectral norm with num_svs > 1 or sigmas_buffer has no torch "
                                 "equivalent (torch tracks one singular vector and keeps no sigma buffer); fold() it, "
                                 "or rebuild the layer with torch's spectral_norm; nothing was changed")
    reverted = 0
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, LegacyWeightNormKernels):
                module._forward_pre_hooks[key] = LegacyWeightNorm(hook.name, hook.dim)
                reverted += 1
            elif isinstance(hook, LegacySpectralNormKernels):
                theirs = LegacySpectralNorm(hook.name, hook.n_power_iterations, hook.dim, hook.eps)
                _replace_legacy_spectral_hook(module, key, hook, theirs)
                reverted += 1
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
    (``n_power_iterations``, ``eps``, ``dim``). Returns ``model``, changed in place.

    Two things to know in training code:

    - ``kind="weight"`` replaces each weight by two new parameters (g and v): an optimizer
      built before ``apply_norm`` never trains them. Build the optimizer afterwards (BigGAN
      builds it in ``__init__``: apply the norm before that). An optimizer that still holds a
      replaced weight warns on its first step. ``kind="spectral"`` keeps each weight's
      Parameter object, so earlier optimizers keep working.
    - The state_dict keys change (``weight`` becomes ``parametrizations.weight.*``), so an EMA
      copy (G_ema) must get the same norms: call ``apply_norm`` on both, or deep-copy G after
      it. (:func:`convert` keeps every key as it was, so twins stay compatible.)
    """
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


_NORM_PARAMETRIZATIONS = (WeightNorm, SpectralNorm, torch_parametrizations._WeightNorm,
                          torch_parametrizations._SpectralNorm)


def fold(model: nn.Module) -> nn.Module:
    """Replaces every weight norm and spectral norm in ``model`` (ours, torch's
    parametrizations and torch's legacy hooks, converted or not) by a plain ``Parameter``
    holding the weight the layer uses in eval, in place; returns ``model``.

    For inference and export: the folded model runs no per-call normalisation (a vocoder with
    weight-normed convolutions recomputes every weight per audio chunk otherwise), its
    state_dict has plain ``weight`` keys, and it exports like any model. Spectral norm folds to
    ``W / sigma`` with sigma from the current ``u`` and ``v``, no power iteration (what eval
    computes), whether the model is in train or eval mode; a frozen weight (``requires_grad``
    False) stays frozen. Training cannot resume from a folded model; fold a copy
    (``copy.deepcopy(G_ema)``) if you still need the original. A parametrization chain that
    mixes a norm with other parametrizations is refused (it cannot be folded in part); warns
    if there is nothing to fold, before anything changes.
    """
    for module in model.modules():
        for name, chain in (module.parametrizations.items() if parametrize.is_parametrized(module) else ()):
            norms = [isinstance(p, _NORM_PARAMETRIZATIONS) for p in chain]
            if any(norms) and not all(norms):
                raise ValueError(f"fold: {type(module).__name__}.{name} has the parametrizations "
                                 f"{[type(p).__name__ for p in chain]}; only a chain of weight and spectral "
                                 "norms can be folded; nothing was changed")
    folded = 0
    with torch.no_grad():
        for module in model.modules():
            for hook in list(module._forward_pre_hooks.values()):
                if not isinstance(hook, (LegacyWeightNorm, LegacySpectralNorm)):
                    continue
                originals = ("_g", "_v") if isinstance(hook, LegacyWeightNorm) else ("_orig",)
                trainable = any(getattr(module, hook.name + suffix).requires_grad for suffix in originals)
                if isinstance(hook, LegacyWeightNorm):
                    torch.nn.utils.remove_weight_norm(module, hook.name)
                else:
                    torch.nn.utils.remove_spectral_norm(module, hook.name)  # eval weight: no iteration
                getattr(module, hook.name).requires_grad_(trainable)  # torch's removal makes it trainable
                folded += 1
            if not parametrize.is_parametrized(module):
                continue
            for name, chain in list(module.parametrizations.items()):
                if not any(isinstance(p, _NORM_PARAMETRIZATIONS) for p in chain):
                    continue  # (a mixed chain was refused above)
                for p in chain:
                    p.eval()  # spectral norm: W / (u^T W v) with the buffers as they are
                # A deep copy shares its original's Parametrized<Layer> class, from which
                # remove_parametrizations deletes the property: give this module its own first,
                # or folding G_ema = deepcopy(G) would strip G's weight.
                cls = type(module)
                module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
                if chain.is_tensor:
                    # A new tensor, not torch's set_() of the original: a tied original (an
                    # embedding's weight shared with an output layer) stays the other's weight.
                    original, value = chain.original, getattr(module, name)
                    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                    delattr(module, name)
                    if isinstance(original, nn.Parameter):
                        module.register_parameter(name, nn.Parameter(value, original.requires_grad))
                    else:
                        module.register_buffer(name, value)
                else:  # weight norm's two originals (g, v): a new tensor of the weight
                    value, originals = getattr(module, name), (chain.original0, chain.original1)
                    # (torch's removal would leave a buffer here, under no_grad)
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                    delattr(module, name)
                    if any(isinstance(t, nn.Parameter) for t in originals):
                        trainable = any(t.requires_grad for t in originals)
                        module.register_parameter(name, nn.Parameter(value, trainable))
                    else:
                        module.register_buffer(name, value)
                folded += 1
    if not folded:
        warnings.warn(f"fold: {type(model).__name__} has no weight or spectral norm to fold; nothing changed",
                      stacklevel=2)
    return model
