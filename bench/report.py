"""Turns a pytest-benchmark JSON file into bench/results/<device>-<commit>.json and a markdown
table beside it: per op, mode, layer and dtype, each backend's mean time, its speedup over
torch's own op and its fraction of the lower bound (gannorm_kernels.perf_model).

Usage: python bench/report.py RAW.json [--out-dir bench/results]
"""

import argparse
import json
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

BACKEND_ORDER = ["torch", "cuda", "triton", "cuda-emu", "reference"]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(data) -> str:
    rows = defaultdict(dict)
    device = "?"
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        device = info.get("device", device)
        key = (info["op"], info["mode"], info["layer"], info["dtype"].replace("torch.", ""))
        rows[key][info["backend"]] = (bench["stats"]["mean"] * 1e6, info.get("bound_us"), info["launches"],
                                      info.get("peak_bytes"))
    backends = [b for b in BACKEND_ORDER if any(b in r for r in rows.values())]
    lines = [f"Device: {device}. Each cell: mean time in microseconds (speedup over torch's own op; lower "
             "bound / mean, where the GPU's peaks are known; peak memory on a GPU); launches per call in the "
             "last column. The minibatch ops compare with their naive formulation, the reference backend.", "",
             "| op | mode | layer | dtype | " + " | ".join(backends) + " | launches |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in backends) + " | --- |"]
    for key in sorted(rows):
        cells = rows[key]
        torch_mean = cells.get("torch", (None,))[0]
        shown = []
        for backend in backends:
            if backend not in cells:
                shown.append("")
                continue
            mean, bound, _, peak = cells[backend]
            notes = []
            if torch_mean and backend != "torch":
                notes.append(f"{torch_mean / mean:.2f}x")
            if bound:
                notes.append(f"{bound / mean:.2f} of bound")
            if peak is not None:
                notes.append(f"peak {peak / 2 ** 20:.1f} MiB")
            shown.append(f"{mean:.1f}" + (f" ({', '.join(notes)})" if notes else ""))
        launches = ", ".join(f"{b} {cells[b][2]}" for b in backends if b in cells)
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
    print(f"wrote {args.out_dir / stem}.json and .md")


if __name__ == "__main__":
    main()
