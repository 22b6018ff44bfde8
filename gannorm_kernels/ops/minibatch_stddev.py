"""The ProGAN/StyleGAN2 minibatch standard-deviation layer as torch operators, the
concatenation fused in. Declared as MINIBATCH_STDDEV (ops/__init__.py derives the rest); kernels:
triton/minibatch_stddev.py, csrc/minibatch_stddev.cu.

Launch budget (held by tests, from `cost`): 1 forward / 1 backward.
"""

from __future__ import annotations

import math

import torch

from .. import backends, checks, reference
from ..dtypes import element_size
from . import Cost, OpSpec


def cost(shape, dtype, num_channels: int = 1, backward: bool = False) -> Cost:
    """Forward reads x twice (mean and copy, then variance) and writes cat([x, stddev]);
    backward reads x three times (mean, variance, gradient), the output's gradient once and
    writes x's. The re-reads are of a group's BLOCK-wide slice just read (L1/L2 on a GPU)."""
    n, c, h, w = shape
    size, s = math.prod(shape), element_size(dtype)
    if backward:
        return Cost(1, 5 * size * s + n * num_channels * h * w * s)
    return Cost(1, 2 * size * s + n * (c + num_channels) * h * w * s)


def _triton():
    from ..triton import minibatch_stddev as kernels
    return kernels.minibatch_stddev_fwd, kernels.minibatch_stddev_bwd


MINIBATCH_STDDEV = OpSpec(
    "minibatch_stddev_fwd(Tensor x, int group_size, int num_channels) -> Tensor out",
    "minibatch_stddev_bwd(Tensor grad_out, Tensor x, int group_size, int num_channels) -> Tensor grad_x",
    forward_fake=lambda x, group_size, num_channels: x.new_empty(
        (x.shape[0], x.shape[1] + num_channels, x.shape[2], x.shape[3])),
    backward_fake=lambda grad, x, group_size, num_channels: x.new_empty(x.shape),
    reference=reference.minibatch_stddev,
    triton=_triton, cost=cost)


def minibatch_stddev(x: torch.Tensor, group_size: int | None = 4, num_channels: int = 1, *,
                     backend: str = "auto") -> torch.Tensor:
    """The ProGAN/StyleGAN2 minibatch standard-deviation layer on plain tensors.

    Groups of ``G = min(group_size, N)`` samples (sample ``g * N / G + m`` in group ``m``, as
    StyleGAN2), the standard deviation over each group averaged over the channels of each of
    ``num_channels`` channel groups and over the pixels, appended as ``num_channels`` constant
    channels: (N, C, H, W) -> (N, C + num_channels, H, W). N must be a multiple of G and C of
    num_channels. ``group_size=None``: one group of the whole batch (StyleGAN2-ADA's None).
    Kernel backends: one launch each way, the concatenation included.
    """
    checks.float_tensor(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    if group_size is not None:
        group_size = checks.positive_int(group_size, "group_size")
    num_channels = checks.positive_int(num_channels, "num_channels")
    n, c = x.shape[:2]
    if n == 0:
        raise ValueError("x must hold at least one sample")
    if c == 0:
        raise ValueError("x must have at least one channel")
    if group_size is None:
        group_size = n
    g = min(group_size, n)
    if n % g:
        raise ValueError(f"the batch size {n} must be a multiple of the group size min(group_size={group_size}, "
                         f"N={n}) = {g}")
    if c % num_channels:
        raise ValueError(f"the channel count {c} must be a multiple of num_channels={num_channels}")
    name = backends.resolve(backend, x.device)
    if name == "reference":
        return reference.minibatch_stddev(x, group_size, num_channels)
    return MINIBATCH_STDDEV(x, group_size, num_channels, name)[0]
