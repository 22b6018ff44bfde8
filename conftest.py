"""Test and benchmark set-up: without a GPU, Triton kernels run under its interpreter, which
must be chosen before triton is first imported (torch itself does not import it). At the end,
the launch budgets the tests measured, ours beside torch's own."""

import json
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


WORKER_LAUNCH_COMPARISONS = {}  # rows the pytest-xdist workers measured (controller only)


def _launch_comparisons():
    return getattr(sys.modules.get("helpers"), "LAUNCH_COMPARISONS", {})


def pytest_sessionfinish(session):
    """Under pytest-xdist (make test runs one worker per core) each worker hands its rows to
    the controller, which prints them."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["launch_comparisons"] = json.dumps(_launch_comparisons())


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    rows = getattr(node, "workeroutput", {}).get("launch_comparisons")
    if rows:
        WORKER_LAUNCH_COMPARISONS.update({op: tuple(row) for op, row in json.loads(rows).items()})


def pytest_terminal_summary(terminalreporter, config):
    comparisons = {**WORKER_LAUNCH_COMPARISONS, **_launch_comparisons()}
    if not comparisons:
        return
    terminalreporter.write_line("")
    terminalreporter.write_line("kernel launches, measured (ours: every kernel backend alike; torch: its own op):")
    width = max(map(len, comparisons))
    ours_width = max(len(ours) for ours, _ in comparisons.values())
    for op, (ours, theirs) in sorted(comparisons.items()):
        terminalreporter.write_line(f"  {op:<{width}}  ours {ours:<{ours_width}}  torch {theirs}")
