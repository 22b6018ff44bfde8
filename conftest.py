"""Test and benchmark set-up: without a GPU, Triton kernels run under its interpreter, which
must be chosen before triton is first imported (torch itself does not import it). At the end,
the launch budgets the tests measured, ours beside torch's own."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_terminal_summary(terminalreporter, config):
    helpers = sys.modules.get("helpers")
    comparisons = getattr(helpers, "LAUNCH_COMPARISONS", None)
    if not comparisons:
        return
    terminalreporter.write_line("")
    terminalreporter.write_line("kernel launches, measured (ours: every kernel backend alike; torch: its own op):")
    width = max(map(len, comparisons))
    ours_width = max(len(ours) for ours, _ in comparisons.values())
    for op, (ours, theirs) in sorted(comparisons.items()):
        terminalreporter.write_line(f"  {op:<{width}}  ours {ours:<{ours_width}}  torch {theirs}")
