"""gannorm_kernels: fused Triton and CUDA kernels for the tools that keep GAN training stable.

Public API:
- ``weight_norm(module, name="weight", dim=0, *, backend="auto")``: a drop-in for
  ``torch.nn.utils.parametrizations.weight_norm``.
- ``adaptive_weight_norm(module, ..., init_scale=0.1, per="channel")`` and
  ``scale_param_groups(model, scale_lr)``: weight norm with a constant initial magnitude and
  its own learning rate.
- ``spectral_norm(module, name="weight", n_power_iterations=1, eps=1e-12, dim=None, *,
  backend="auto")``: a drop-in for ``torch.nn.utils.parametrizations.spectral_norm``;
  ``sigmas(model)`` reads the sigma of each.
- ``pairwise_similarity_penalty(features, kernel="cosine" | "rbf", bandwidth=1.0)``,
  ``MinibatchDiscrimination(in_features, num_kernels, kernel_dim)``,
  ``MinibatchStdDev(group_size=4, num_channels=1)``: minibatch penalties with memory linear
  in the batch.
- ``convert(model)`` / ``revert(model)``: swap torch's weight and spectral norms (both APIs)
  for ours in place and back, every learned tensor kept; ``apply_norm(model, kind)`` adds ours
  to every matching layer; ``fold(model)`` replaces every weight / spectral norm (ours or
  torch's) by a plain weight equal to its eval weight, for inference and export.
- ``ema_update(ema_model, model, decay)``: the generator's moving average, spectral norm's
  power-iteration buffers copied rather than averaged; ``reset_spectral_norm(model)``: redraw
  and warm up those buffers; ``group_spectral_norms(model)``: every spectral norm of a model
  in one launch set per forward and one per backward.
- ``functional``: the ops on plain tensors.
- ``info()``: versions, the compiled extension and each backend's availability.

Backends: "reference", "triton", "cuda", "cuda-emu" and "auto" (see ``gannorm_kernels.backends``).
"""

__version__ = "0.1.0"

from . import backends, functional  # noqa: E402
from .convert import apply_norm, convert, fold, revert  # noqa: E402
from .info import info  # noqa: E402
from .ops.similarity import pairwise_similarity_penalty  # noqa: E402
from .training import SpectralNormGroup, ema_update, group_spectral_norms, reset_spectral_norm, sigmas  # noqa: E402
from .nn import (  # noqa: E402
    AdaptiveWeightNorm,
    MinibatchDiscrimination,
    MinibatchStdDev,
    SpectralNorm,
    WeightNorm,
    adaptive_weight_norm,
    scale_param_groups,
    spectral_norm,
    weight_norm,
)

__all__ = [
    "AdaptiveWeightNorm",
    "MinibatchDiscrimination",
    "MinibatchStdDev",
    "SpectralNorm",
    "SpectralNormGroup",
    "WeightNorm",
    "adaptive_weight_norm",
    "apply_norm",
    "backends",
    "convert",
    "ema_update",
    "group_spectral_norms",
    "fold",
    "functional",
    "info",
    "pairwise_similarity_penalty",
    "reset_spectral_norm",
    "revert",
    "scale_param_groups",
    "sigmas",
    "spectral_norm",
    "weight_norm",
]
