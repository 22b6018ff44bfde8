"""Turns a pytest-benchmark JSON file into bench/results/<device>-<commit>.json, a markdown
table and a PNG chart beside it: per op, mode, layer and dtype, each backend's median time, its
speedup over torch's own op (or the naive formulation), over torch.compile of torch's op where
that ran (GPU), and its fraction of the model time (gannorm_kernels.tools.perf_model); the launches
column gives the dispatcher-level launch count and, on a GPU, the kernels the profiler saw
(`gpu N`: for torch-compile, the kernels inductor generated).

Usage: python bench/report.py RAW.json [--out-dir bench/results]
"""

import argparse
import json
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

BACKEND_ORDER = ["torch", "torch-compile", "cuda", "triton", "cuda-emu", "reference"]
COMPETITORS = ("torch", "torch-compile")


ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The commit the results are of: HEAD, with "-dirty" where tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(data):
    """{(op, mode, layer, dtype): {backend: (median us, bound us, launches, peak bytes, gpu kernels)}}, device.
    The median of the rounds: a mean takes in every stall of a shared machine."""
    rows = defaultdict(dict)
    device = "?"
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        device = info.get("device", device)
        key = (info["op"], info["mode"], info["layer"], info["dtype"].replace("torch.", ""))
        rows[key][info["backend"]] = (bench["stats"]["median"] * 1e6, info.get("bound_us"), info.get("launches"),
                                      info.get("peak_bytes"), info.get("gpu_kernels"))
    return rows, device


def chart(data, path: Path) -> None:
    """Median time per row and backend, log scale: one horizontal bar group per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, device = table(data)
    backends = [b for b in BACKEND_ORDER if any(b in r for r in rows.values())]
    keys = sorted(rows)
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(keys) * len(backends) + 1.5))
    height = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        ys = [k + i * height for k in range(len(keys))]
        xs = [rows[key][backend][0] if backend in rows[key] else 0 for key in keys]
        ax.barh(ys, xs, height=height, label=backend)
    ax.set_yticks([k + 0.4 - height / 2 for k in range(len(keys))])
    ax.set_yticklabels([" ".join(key) for key in keys], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("median time per call (us, log scale)")
    ax.set_title(f"gannorm_kernels on {device}")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def launch_cell(cell) -> str:
    launches, kernels = cell[2], cell[4]
    if kernels is None:
        return str(launches)
    return f"gpu {kernels}" if launches is None else f"{launches} (gpu {kernels})"


def markdown(data) -> str:
    rows, device = table(data)
    backends = [b for b in BACKEND_ORDER if any(b in r for r in rows.values())]
    lines = [f"Device: {device}. Each cell: median time in microseconds (speedup over torch's own op; over "
             "torch.compile of it, where that ran; model time / median, where the GPU's peaks are known; peak memory "
             "on a GPU); launches per call in the last column (`gpu N`: kernels the profiler saw, inductor's for "
             "torch-compile). The minibatch ops compare with their naive formulation, the reference backend.", "",
             "| op | mode | layer | dtype | " + " | ".join(backends) + " | launches |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in backends) + " | --- |"]
    for key in sorted(rows):
        cells = rows[key]
        torch_time = cells.get("torch", (None,))[0]
        compiled_time = cells.get("torch-compile", (None,))[0]
        shown = []
        for backend in backends:
            if backend not in cells:
                shown.append("")
                continue
            time, bound, _, peak, _ = cells[backend]
            notes = []
            if torch_time and backend != "torch":
                notes.append(f"{torch_time / time:.2f}x")
            if compiled_time and backend not in COMPETITORS:
                notes.append(f"{compiled_time / time:.2f}x vs compiled")
            if bound:
                notes.append(f"{bound / time:.2f} of model")
            if peak is not None:
                notes.append(f"peak {peak / 2 ** 20:.1f} MiB")
            shown.append(f"{time:.1f}" + (f" ({', '.join(notes)})" if notes else ""))
        launches = ", ".join(f"{b} {launch_cell(cells[b])}" for b in backends if b in cells)
        lines.append(f"| {' | '.join(map(str, key))} | " + " | ".join(shown) + f" | {launches} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    data = json.loads(args.raw.read_text())
    if not data["benchmarks"]:
        raise SystemExit(f"{args.raw}: no timed benchmarks")
    device = data["benchmarks"][0]["extra_info"].get("device", "unknown")
    stem = f"{re.sub(r'[^A-Za-z0-9._-]+', '-', device).strip('-')}-{commit()}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.raw, args.out_dir / f"{stem}.json")
    (args.out_dir / f"{stem}.md").write_text(markdown(data))
    chart(data, args.out_dir / f"{stem}.png")
    print(f"wrote {args.out_dir / stem}.json, .md and .png")


if __name__ == "__main__":
    main()
