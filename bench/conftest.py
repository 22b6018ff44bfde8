"""After a timed run, each benchmark against its model time (the op spec's cost: the bytes our
kernels' passes move / peak bandwidth + our launches x launch latency; a model of our design,
not a hardware minimum), where the GPU's bandwidth is known. With
GANNORM_BENCH_PARTIAL set to a path, each finished benchmark is also appended there as a JSON
line (pytest-benchmark writes its JSON only when the session ends: a suite stopped at a time
limit would leave nothing)."""

import json
import os

_written = 0


def pytest_runtest_teardown(item):
    global _written
    path = os.environ.get("GANNORM_BENCH_PARTIAL")
    session = getattr(item.config, "_benchmarksession", None)
    if not path or session is None:
        return
    with open(path, "a") as lines:
        for bench in session.benchmarks[_written:]:
            lines.write(json.dumps(bench.as_dict(include_data=False), default=str) + "\n")
    _written = len(session.benchmarks)


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    timed = [b for b in (session.benchmarks if session else []) if b.stats is not None]
    if not timed:
        return
    write = terminalreporter.write_line
    write("")
    if not any(b.extra_info.get("bound_us") for b in timed):
        write("gannorm_kernels: no model times: they need a GPU whose peak bandwidth is known "
              "(gannorm_kernels.tools.perf_model; GANNORM_BANDWIDTH_GBPS sets it)")
        return
    write("gannorm_kernels: median times against the model (our bytes / peak bandwidth + our launches x latency)")
    write(f"{'benchmark':<90} {'median us':>10} {'model us':>9} {'model/median':>12}")
    for b in timed:
        bound = b.extra_info.get("bound_us")
        median_us = b.stats.median * 1e6
        fraction = f"{bound / median_us:.2f}" if bound else "-"
        write(f"{b.name:<90} {median_us:>10.1f} {bound or float('nan'):>9.1f} {fraction:>12}")
