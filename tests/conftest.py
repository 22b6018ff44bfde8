"""Every test of the triton backend runs under the interpreter's hazard mode
(tests/triton_hazards.py), and every test of the cuda-emu backend under an emulator schedule,
each seeded by the test's id: a schedule-dependent failure replays when the test runs alone."""

import zlib

import pytest


@pytest.fixture(autouse=True)
def triton_hazards(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "triton":
        yield
        return
    from gannorm_kernels import triton as kernels
    if not kernels.INTERPRETED:
        yield
        return
    from triton_hazards import hazards
    # torch.compile and opcheck trace through higher-order operators that a dispatch mode
    # would have to handle: those tests check tracing, and run without the NaN-filled allocations
    tracing = any(word in request.node.name for word in ("compile", "opcheck", "inductor"))
    with hazards(zlib.crc32(request.node.nodeid.encode()), poison=not tracing):
        yield


@pytest.fixture(autouse=True)
def emulator_schedule(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "cuda-emu":
        yield
        return
    from gannorm_kernels import backends
    if backends.unavailable_reason("cuda-emu", "cpu") is not None:
        yield
        return
    import torch
    backends.kernels("cuda-emu")  # loads the library
    previous = torch.ops.gannorm_emu.set_schedule_seed(zlib.crc32(request.node.nodeid.encode()) or 1)
    yield
    torch.ops.gannorm_emu.set_schedule_seed(previous)
