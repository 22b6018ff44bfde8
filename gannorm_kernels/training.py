"""Helpers for GAN training loops that must know about spectral norm: `ema_update` (the
generator's moving average) and `reset_spectral_norm` (redraw the power-iteration vectors)."""

from __future__ import annotations

import numbers
import warnings
from collections import defaultdict

import torch
from torch import nn
from torch.nn.utils import parametrizations as torch_parametrizations
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as LegacySpectralNorm

from . import checks, reference
from .convert import LegacySpectralNormKernels, parametrization_input
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
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 <= decay <= 1.0:
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


def _current(last: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
    """A layer's last sigma if it is on the device of its weight (or of the first tensor of its
    parametrization chain): not from before a move (``model.to``), nor from an nn.DataParallel
    replica on another GPU."""
    return last if last is not None and last.device == weight.device else None


def sigmas(model: nn.Module, k: int | None = None) -> dict[str, torch.Tensor]:
    """``{qualified weight name: sigma}`` for every :func:`spectral_norm` in ``model``, and
    every legacy ``torch.nn.utils.spectral_norm`` layer :func:`convert` took over.

    A layer's sigma is the one its last forward computed (a device tensor: no launch, no sync;
    under nn.DataParallel, a replica's); for a layer with no forward since it was built,
    converted, moved to another device, loaded (``load_state_dict``) or reset
    (:func:`reset_spectral_norm`), the sigma an eval forward would use now, computed from
    its weight and buffers as they are (so a loaded checkpoint's sigmas are what it reads).
    For 1-D weights, the norm they are divided by. ``k``: the top
    ``k`` singular values of each layer instead, a (k,) tensor (layers with ``num_svs >= k``; any
    other raises, naming it).
    """
    if k is not None:
        k = checks.positive_int(k, "k")
    found = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, LegacySpectralNormKernels):
                last = _current(hook.last_sigma, getattr(module, hook.name + "_orig"))
                found[prefix + hook.name] = last.reshape(1) if last is not None else hook.sigmas_of(module)
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, chain in module.parametrizations.items():
            for index, p in enumerate(chain):
                if isinstance(p, SpectralNorm):
                    first = chain.original if hasattr(chain, "original") else chain.original0
                    last = _current(p.last_sigmas, first)
                    found[prefix + tensor_name] = (last if last is not None
                                                   else p.sigmas_of(parametrization_input(chain, index)))
    if k is None:
        return {name: values[0] for name, values in found.items()}
    short = [name for name, values in found.items() if values.numel() < k]
    if short:
        raise ValueError(f"sigmas(k={k}): {', '.join(short)} track fewer than {k} singular values (spectral_norm("
                         "..., num_svs=k) tracks k; 1-D and legacy layers one)")
    return {name: values[:k] for name, values in found.items()}


def _spectral_norms(model: nn.Module):
    """(weight as a matrix, u, v, eps, legacy, owner) for every spectral norm in `model`: ours,
    torch's parametrization and torch's legacy hook (legacy: its iteration runs v first);
    owner: the hook or parametrization."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, LegacySpectralNorm):
                matrix = hook.reshape_weight_to_matrix(getattr(module, hook.name + "_orig").detach())
                yield (matrix, getattr(module, hook.name + "_u"), getattr(module, hook.name + "_v"), hook.eps, True,
                       hook)
        if not parametrize.is_parametrized(module):
            continue
        for chain in module.parametrizations.values():
            for index, p in enumerate(chain):
                if isinstance(p, (SpectralNorm, torch_parametrizations._SpectralNorm)) and hasattr(p, "_u"):
                    # what the chain gives it: the original, or a weight norm's output before it
                    matrix = reference.weight_matrix(parametrization_input(chain, index).detach(), p.dim)
                    yield matrix, p._u, p._v, p.eps, False, p


@torch.no_grad()
def reset_spectral_norm(model: nn.Module, n_warmup: int = 15, *, generator: torch.Generator | None = None) -> int:
    """Redraws the power-iteration vectors of every spectral norm in ``model`` (ours, torch's
    parametrization, torch's legacy hook; converted or not) and warms them up on the current
    weight, as torch's parametrizations spectral norm does when it is registered (the legacy
    hook draws without warming up; this warms it up too): u, then v, drawn from N(0, 1)
    and normalised, then ``n_warmup`` power iterations in the layer's own order (the legacy
    hook updates v first) (PyTorch issue #25092). The buffers are
    updated in place (the same tensors). 1-D weights have no vectors and are skipped.
    Returns how many were reset; warns if none.

    ``generator``: the random stream to draw from (default: torch's global one)."""
    if isinstance(n_warmup, bool) or not isinstance(n_warmup, numbers.Integral) or n_warmup < 0:
        raise ValueError(f"n_warmup must be a non-negative int, got {n_warmup!r}")
    n_warmup = int(n_warmup)
    count = 0
    for matrix, u, v, eps, legacy, owner in list(_spectral_norms(model)):
        if isinstance(owner, (SpectralNorm, LegacySpectralNormKernels)):
            owner.last_sigma = None  # sigmas() reads the new buffers, not the last forward
            if isinstance(owner, SpectralNorm):
                owner.last_sigmas = None
        compute = acc_dtype(matrix.dtype)
        matrix = matrix.to(compute)
        if u.dim() == 2:  # num_svs > 1: orthonormal rows, warmed up by block power iteration
            new_u = torch.randn(u.shape, generator=generator, dtype=compute).to(u.device)
            new_v = torch.randn(v.shape, generator=generator, dtype=compute).to(v.device)
            new_u, new_v = reference.orthonormalize(new_u, eps)[0], reference.orthonormalize(new_v, eps)[0]
            reference.spectral_norm_topk(matrix, new_u, new_v, 0, n_warmup, eps, True)
            u.copy_(new_u)
            v.copy_(new_v)
            count += 1
            continue
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


class SpectralNormGroup:
    """What :func:`group_spectral_norms` returns: the model's hooks that compute its spectral
    norms together. ``layers`` names the grouped weights; ``remove()`` undoes the grouping."""

    def __init__(self, model: nn.Module, members: list) -> None:
        self.model = model
        self._members = members  # (qualified name, module, owner, tensor name; None for a legacy hook)
        self.layers = [name for name, *_ in members]
        for _, _, owner, _ in members:
            owner.in_group = True
        self._warned: set[str] = set()  # the unused layers warned about
        self._warned_copy = False  # a copy of the model (nn.DataParallel's replicas) warned about
        self._handles = [model.register_forward_pre_hook(self._before),
                         model.register_forward_hook(self._after, always_call=True)]

    def _before(self, model, args) -> None:
        from .backends import resolve
        from .ops.spectral_norm import SPECTRAL_NORM_GROUP, check_buffer_storage
        if torch.compiler.is_compiling():
            return  # torch cannot functionalize an operator mutating a Tensor[]: each layer runs its own
        if model is not self.model:  # a copy sharing the hooks: its layers are not the members
            self._warn_not_grouped(model)
            return
        self._drop_removed()
        buckets = defaultdict(list)
        for member in self._members:
            _, module, owner, tensor_name = member
            if tensor_name is not None and parametrize._cache_enabled:
                continue  # parametrize.cached(): the layer's first use computes its weight once, cached
            if tensor_name is None:  # torch's legacy order (v, then u) is ours on the transposed matrix: see convert
                weight = getattr(module, owner.name + "_orig")
                matrix = weight.reshape(weight.shape[0], -1)
                entry = (matrix, getattr(module, owner.name + "_v"), getattr(module, owner.name + "_u"), 1)
                buffer_names = (owner.name + "_v", owner.name + "_u")
                training = module.training
            else:
                weight = module.parametrizations[tensor_name].original
                entry = (weight, owner._u, owner._v, owner.dim)
                buffer_names = ("_u", "_v")
                training = owner.training
            backend = resolve(owner.backend, weight.device)
            if backend == "reference":
                continue  # plain PyTorch has nothing to group: the layer runs on its own
            for buffer_name, buffer in zip(buffer_names, entry[1:3]):  # what the layer's own op checks
                try:
                    check_buffer_storage(buffer_name, buffer, weight)
                except (TypeError, ValueError) as error:
                    raise type(error)(f"{member[0]}: {error}") from None
            key = (backend, weight.device, weight.dtype, owner.n_power_iterations, owner.eps, training)
            buckets[key].append((member, entry))
        for (backend, _, _, n, eps, training), entries in buckets.items():
            weights, us, vs, dims = (list(column) for column in zip(*(entry for _, entry in entries)))
            outs, sigmas, _, _ = SPECTRAL_NORM_GROUP(weights, us, vs, dims, n, float(eps), training, backend)
            for k, ((_, module, owner, tensor_name), _) in enumerate(entries):
                out = outs[k]
                owner.grouped = out.view(getattr(module, owner.name + "_orig").shape) if tensor_name is None else out
                owner.last_sigma = sigmas[k]
                owner.last_sigmas = sigmas[k:k + 1]
                if training and hasattr(owner, "_sigmas"):
                    with torch.no_grad():
                        owner._sigmas.copy_(owner.last_sigmas)

    def _drop_removed(self) -> None:
        """Leaves out the layers whose norm is no longer there (fold, revert, torch's
        remove_parametrizations / remove_spectral_norm, on this model or on a deep copy)."""
        def attached(module, owner, tensor_name):
            if tensor_name is None:
                return any(hook is owner for hook in module._forward_pre_hooks.values())
            if not parametrize.is_parametrized(module, tensor_name):
                return False
            chain = module.parametrizations[tensor_name]
            return len(chain) == 1 and chain[0] is owner
        kept = [m for m in self._members if attached(*m[1:])]
        if len(kept) < len(self._members):
            for _, _, owner, _ in self._members:
                if all(owner is not o for _, _, o, _ in kept):
                    owner.grouped, owner.in_group = None, False
            self._members = kept
            self.layers = [name for name, *_ in kept]

    def _warn_not_grouped(self, model) -> None:
        if not self._warned_copy:
            self._warned_copy = True
            how = ("an nn.DataParallel replica" if getattr(model, "_is_replica", False)
                   else "a shallow copy sharing its hooks")
            warnings.warn(f"group_spectral_norms: this forward ran on {how} of the grouped {type(model).__name__}, "
                          "whose layers compute their own spectral norms (as torch's, ungrouped); a group "
                          "computes those of the module it was made for (DistributedDataParallel runs that one)",
                          UserWarning, stacklevel=3)

    def _after(self, model, args, output) -> None:
        if model is not self.model:
            return
        for name, _, owner, _ in self._members:
            if owner.grouped is not None:  # computed for this forward, never used
                owner.grouped = None
                if name not in self._warned:
                    self._warned.add(name)
                    warnings.warn(f"group_spectral_norms: {name} was not used by this forward of "
                                  f"{type(model).__name__}, but its power iteration ran (torch's would not have): "
                                  "leave it out of the group (group_spectral_norms(model, exclude=...))",
                                  UserWarning, stacklevel=2)

    def remove(self) -> None:
        """Removes the hooks: every layer computes its own spectral norm again."""
        for handle in self._handles:
            handle.remove()
        for _, _, owner, _ in self._members:
            owner.grouped, owner.in_group = None, False
        self._handles = []

    def __repr__(self) -> str:
        return f"SpectralNormGroup({type(self.model).__name__}, {len(self.layers)} layers)"


def group_spectral_norms(model: nn.Module, *, exclude: str | tuple[str, ...] = ()) -> SpectralNormGroup:
    """Computes every spectral norm of ``model`` in one launch set when ``model``'s forward
    starts, and their gradients in one backward: a discriminator's 5 to 50 layers cost the
    launches of one (train 3, backward 2, eval 2; on the CUDA backend per 24 layers) instead of
    each their own.

    The grouped layers are this package's (:func:`spectral_norm`, or torch's converted by
    :func:`convert`: the parametrizations API, and the legacy hooks with ``dim=0``) on a
    kernel backend, with 2+ dim real weights. Each stays exactly what it was: its own ``u``
    and ``v``, updated once per forward of the model in training, in its own API's order; the
    outputs, gradients, buffers and ``sigmas(model)`` are those of the ungrouped model (tested
    to fp32 rounding); eval and ``state_dict`` are unchanged. A layer whose norm is taken away
    (``fold``, ``revert``, torch's ``remove_parametrizations`` / ``remove_spectral_norm``, on
    the model or on a deep copy of it) leaves the group at the next forward, and inside
    ``parametrize.cached()`` each parametrized layer computes its own, once. Under autograd's
    saved-tensor hooks (activation checkpointing, ``save_on_cpu``) a grouped layer computes
    its W / sigma where it is used, from the u and v the group updated, so the hooks see what
    they would see ungrouped (checkpointing compares them with its recomputation's); its
    launches are then its own eval ones. Layers are grouped
    by backend, device, dtype, ``n_power_iterations``, ``eps`` and train/eval mode, one launch
    set each. A layer used twice in one forward runs its second use on its own (a second power
    iteration, as torch). Called on its own (``model.layer(x)``), a layer computes its own norm,
    and so do nn.DataParallel's replicas of ``model`` (warned once; DistributedDataParallel runs
    ``model`` itself, grouped).

    A grouped layer that the forward does not use had its power iteration run anyway (torch's
    would not): warned once; pass its name in ``exclude``. Legacy layers with ``dim != 0``
    (ConvTranspose), 1-D and complex weights, ``num_svs > 1`` layers and the reference backend
    run on their own, and
    so does every layer under ``torch.compile`` (torch cannot yet trace an operator that
    updates a list of buffers in place; the compiled graph schedules the layers itself).

    Args:
        model: the module whose forward computes every grouped layer (a discriminator).
        exclude: qualified weight names (as in ``sigmas(model)``) to leave out; one name may be
            given as a string.

    Returns:
        a :class:`SpectralNormGroup`; ``.remove()`` undoes the grouping.
    """
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)  # one name, not its characters
    members = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, LegacySpectralNormKernels) and hook.dim == 0:
                weight = getattr(module, hook.name + "_orig")
                if weight.dim() >= 2 and not weight.is_complex():
                    members.append((prefix + hook.name, module, hook, None))
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, chain in module.parametrizations.items():
            if len(chain) == 1 and isinstance(chain[0], SpectralNorm) and chain[0].num_svs == 1:
                if chain.original.dim() >= 2 and not chain.original.is_complex():
                    members.append((prefix + tensor_name, module, chain[0], tensor_name))
    for name in exclude:
        if name not in {m[0] for m in members}:
            raise ValueError(f"exclude: {name!r} is not a grouped spectral-norm weight of {type(model).__name__} "
                             f"(those are: {', '.join(m[0] for m in members) or 'none'})")
    members = [m for m in members if m[0] not in exclude]
    if not members:
        raise ValueError(f"group_spectral_norms: {type(model).__name__} has no spectral norm of this package to "
                         "group (apply spectral_norm / apply_norm, or convert torch's, first)")
    for name, _, owner, _ in members:
        if getattr(owner, "in_group", False):
            raise ValueError(f"group_spectral_norms: {name} is already in a group; remove() that group first")
    return SpectralNormGroup(model, members)
