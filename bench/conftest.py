"""After a timed run, each benchmark as a fraction of its lower bound (the op spec's cost: bytes /
peak bandwidth + launches x launch latency), where the GPU's bandwidth is known."""


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    timed = [b for b in (session.benchmarks if session else []) if b.stats is not None]
    if not timed:
        return
    write = terminalreporter.write_line
    write("")
    if not any(b.extra_info.get("bound_us") for b in timed):
        write("gannorm_kernels: no lower bounds: they need a GPU whose peak bandwidth is known "
              "(gannorm_kernels.tools.perf_model; GANNORM_BANDWIDTH_GBPS sets it)")
        return
    write("gannorm_kernels: timings against the lower bound (bytes / peak bandwidth + launches x latency)")
    write(f"{'benchmark':<90} {'mean us':>10} {'bound us':>9} {'bound/mean':>10}")
    for b in timed:
        bound = b.extra_info.get("bound_us")
        mean_us = b.stats.mean * 1e6
        fraction = f"{bound / mean_us:.2f}" if bound else "-"
        write(f"{b.name:<90} {mean_us:>10.1f} {bound or float('nan'):>9.1f} {fraction:>10}")
