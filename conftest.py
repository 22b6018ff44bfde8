"""Test and benchmark set-up: without a GPU, Triton kernels run under its interpreter, which
must be chosen before triton is first imported (torch itself does not import it)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
