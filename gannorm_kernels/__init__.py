"""gannorm_kernels: fused Triton and CUDA kernels for the tools that keep GAN training stable.

Public API:
- ``weight_norm(module, name="weight", dim=0, *, backend="auto")``: a drop-in for
  ``torch.nn.utils.parametrizations.weight_norm``.
- ``adaptive_weight_norm(module, ..., init_scale=0.1, per="channel")`` and
  ``scale_param_groups(model, scale_lr)``: weight norm with a constant initial magnitude and
  its own learning rate.
- ``functional``: the ops on plain tensors.
- ``info()``: versions, the compiled extension and each backend's availability.

Backends: "reference", "triton", "cuda", "cuda-emu" and "auto" (see ``gannorm_kernels.backends``).
"""

__version__ = "0.1.0"

from . import backends, functional  # noqa: E402
from .info import info  # noqa: E402
from .nn import AdaptiveWeightNorm, WeightNorm, adaptive_weight_norm, scale_param_groups, weight_norm  # noqa: E402

__all__ = [
    "AdaptiveWeightNorm",
    "WeightNorm",
    "adaptive_weight_norm",
    "backends",
    "functional",
    "info",
    "scale_param_groups",
    "weight_norm",
]
