"""Every test of the triton backend runs under the interpreter's hazard mode
(tests/triton_hazards.py), seeded by the test's name."""

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
