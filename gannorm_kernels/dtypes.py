"""The dtypes the ops take and the accumulation rule every backend follows (the CUDA kernels'
twin is `AccumulateType` in csrc/common.cuh; the Triton kernels' is `triton.common.acc_dtype`)."""

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: fp32 for fp16/bf16/fp32 data, fp64 for fp64 (gradcheck's
    precision); complex data (complex spectral norm, reference only) in its own dtype."""
    if dtype.is_complex:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element."""
    return torch.empty((), dtype=dtype).element_size()
