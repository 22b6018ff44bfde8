"""Every test of a backend runs where that backend can show what a GPU would get wrong, seeded
by the test's id so a failure replays when the test runs alone: the triton backend under the
interpreter's hazard mode (tests/triton_hazards.py), cuda-emu under an adversarial emulator
schedule (csrc/emu/cuda_emu.h)."""

import contextlib
import zlib

import pytest


@pytest.fixture(autouse=True)
def backend_hazards(request):
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    seed = zlib.crc32(request.node.nodeid.encode()) or 1
    with _hazards(backend, seed, request.node.name):
        yield


@contextlib.contextmanager
def _hazards(backend, seed: int, name: str):
    from gannorm_kernels import backends
    if backend == "triton" and backends.unavailable_reason("triton", "cpu") is None:  # the interpreter
        from triton_hazards import hazards
        # torch.compile and opcheck trace through higher-order operators that a dispatch mode
        # would have to handle: those tests check tracing, without NaN-filled allocations
        tracing = any(word in name for word in ("compile", "opcheck", "inductor"))
        with hazards(seed, poison=not tracing):
            yield
        return
    if backend == "cuda-emu" and backends.unavailable_reason("cuda-emu", "cpu") is None:
        import torch
        backends.compiled_ops("cuda-emu")  # loads the library
        previous = torch.ops.gannorm_emu.set_schedule_seed(seed)
        try:
            yield
        finally:
            torch.ops.gannorm_emu.set_schedule_seed(previous)
        return
    yield
