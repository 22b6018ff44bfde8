"""A per-test time limit without pytest-timeout (the GPU machines do not have it): load with
`-p pytest_deadline` (tools/ on sys.path) and set GANNORM_TEST_TIMEOUT (seconds, default 180).

A test that runs past its limit fails with DeadlineExceeded raised in the main thread by
SIGALRM, and the run goes on with the next test. A test stuck inside C code (a kernel that
never returns, a deadlocked sync) gets the exception only when it comes back to Python; for
that case gpu_check.py also runs pytest under `-o faulthandler_timeout` (stacks dumped) and an
outer time limit."""

import os
import signal

import pytest


class DeadlineExceeded(Exception):
    pass


def _limit():
    return float(os.environ.get("GANNORM_TEST_TIMEOUT", "180"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    limit = _limit()
    if limit <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise DeadlineExceeded(f"{item.nodeid} ran past its {limit:g} s limit (GANNORM_TEST_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
