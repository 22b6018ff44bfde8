"""Argument checks every op shares, each naming the bad argument, and the matrix view of a
weight along a dim (spectral norm's rows-by-columns view)."""

from __future__ import annotations

import math
import numbers
import operator

import torch

from .dtypes import FLOAT_DTYPES

try:
    import numpy
    _BOOLS: tuple[type, ...] = (bool, numpy.bool_)
except ImportError:  # numpy is optional for torch
    _BOOLS = (bool,)


def float_tensor(t, name: str) -> None:
    """`t` is a tensor of one of FLOAT_DTYPES."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def positive_number(value, name: str) -> float:
    """A positive finite real number (any real type: NumPy's too), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def finite_number(value, name: str) -> float:
    """A finite real number (any real type), as a float. (Comparisons, not math.isfinite, which
    torch.compile(dynamic=True) cannot trace on the symbolic float an `eps` attribute becomes.)"""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def flag(value, name: str) -> bool:
    """A bool (Python's or NumPy's), as a Python bool; anything else, though truthy or falsy (a
    string such as "eval", 1, None), is refused, not taken for one."""
    if not isinstance(value, _BOOLS):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def positive_int(value, name: str) -> int:
    """``value`` as a Python int: any integer type (NumPy's, a 0-d integer tensor) as torch's
    layers take; bools and non-integers are refused."""
    try:
        as_int = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        as_int = None
    if as_int is None or as_int < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return as_int


def matrix_dim(dim, ndim: int) -> int:
    """The rows' dim of a weight's matrix view, in [0, ndim) (negative dims count from the end).
    Weight norm's dim follows another rule (-1 is the whole tensor): ops.weight_norm.torch_dim."""
    try:
        index = None if isinstance(dim, bool) else operator.index(dim)  # any integer type, as torch's
    except TypeError:
        index = None
    if index is None:
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    dim = index
    if not -ndim <= dim < ndim:
        raise IndexError(f"dim={dim} is out of range for a {ndim}-d weight (expected a dim in [{-ndim}, {ndim - 1}])")
    return dim + ndim if dim < 0 else dim


def matrix_sizes(shape, dim: int) -> tuple[int, int, int]:
    """(outer, rows, inner): the sizes before `dim`, at it, and after it. The matrix view along
    `dim` has `rows` rows and `outer * inner` columns; element (r, c) of it is the weight's
    element (c // inner, r, c % inner) in that 3-d form (the kernels' index math)."""
    outer = inner = 1
    for i, size in enumerate(shape):  # a loop, not a generator: torch.compile traces this
        if i < dim:
            outer *= size
        elif i > dim:
            inner *= size
    return outer, shape[dim], inner


def matrix_shape(shape, dim: int) -> tuple[int, int]:
    """(rows, columns) of the matrix view along `dim` (reference.weight_matrix builds it)."""
    outer, rows, inner = matrix_sizes(shape, dim)
    return rows, outer * inner


def unbatched_buffers_error(name: str) -> NotImplementedError:
    """What torch.func.vmap over batched weights in training with unbatched power-iteration
    buffers raises, on every backend."""
    return NotImplementedError(
        f"{name}: torch.func.vmap over batched weights in training needs batched power-iteration buffers too "
        "(one u and v per copy, as torch.func.stack_module_state stacks them): the buffers are updated in "
        "place, and one buffer cannot take a batch of updates")
