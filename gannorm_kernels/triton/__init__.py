"""Triton kernels, one file per op (`triton/<op>.py`), each with its launchers `<op>_fwd` and
`<op>_bwd`: the same arguments (the op spec's schema) and results as the compiled operators
(torch.ops.gannorm_cuda.*). The op specs (gannorm_kernels/ops/) import them on first use.

CPU tensors run under Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported.
"""

from .common import INTERPRETED, launch_count

__all__ = ["INTERPRETED", "launch_count"]
