"""Loop coverage of the CUDA C++ kernels under the emulator (the `cuda-emu` backend): the CUDA
counterpart of tests/loop_coverage.py. A loop that runs once in every test cannot catch a wrong
stride or accumulation (`acc = x` for `acc += x`, a start that skips the second block): its one
iteration gives the right answer.

Every loop of device code (the bodies of __global__ and __device__ functions in csrc/*.cu and
csrc/common.cuh) has its condition wrapped: `for (init; GANNORM_LOOP(cond); step)`. Under the
emulator the macro counts, per loop, each CUDA thread's entries and iterations and the most
iterations of one entry (csrc/emu/cuda_emu.h); on a GPU it is `cond`. `device_loops` reads the
sources so that a loop without the macro cannot escape.

    with CudaLoopCoverage() as coverage:
        ...  # cuda-emu calls
    coverage.loops  # {(file, line): CudaLoopStats}

Loops are counted per source line, over every kernel that reaches them (a helper's loop, such
as block_sum_of's, counts for all its callers together).
"""

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
MACRO = "GANNORM_LOOP"


@dataclass(frozen=True)
class CudaLoopStats:
    function: str
    entries: int
    iterations: int
    most: int  # the most iterations of one entry (one thread's)


def kernel_sources():
    return sorted(CSRC.glob("*.cu")) + [CSRC / "common.cuh"]


def _without_comments(text):
    """text with comments and string literals blanked (newlines kept, so offsets keep lines)."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))  # noqa: E731
    return re.sub(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"', blank, text, flags=re.S)


def _matching(text, start, open_char, close_char):
    """Index just past the bracket closing the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_char:
            depth += 1
        elif text[i] == close_char:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_char} at offset {start}")


def _device_bodies(code):
    """(start, end) offsets of the bodies of the __global__ and __device__ functions in code
    (declarations without a body are skipped)."""
    bodies = []
    for match in re.finditer(r"\b__(?:global|device)__\b", code):
        if bodies and match.start() < bodies[-1][1]:
            continue  # inside a body already taken
        brace, semicolon = code.find("{", match.end()), code.find(";", match.end())
        if brace == -1 or (semicolon != -1 and semicolon < brace):
            continue
        bodies.append((brace, _matching(code, brace, "{", "}")))
    return bodies


@dataclass(frozen=True)
class DeviceLoop:
    file: str  # base name
    line: int
    source: str  # the header's line, stripped
    instrumented: bool  # a `for` whose whole condition is GANNORM_LOOP(...)
    leaves: bool  # its body holds a break, return or goto: an entry the emulator cannot end


def _statement_end(code, at):
    """Index just past the statement starting at or after code[at] (a block, a loop whose
    body is one, or a simple statement)."""
    while code[at].isspace():
        at += 1
    if code[at] == "{":
        return _matching(code, at, "{", "}")
    loop = re.match(r"(?:for|while)\s*\(", code[at:])
    if loop:
        return _statement_end(code, _matching(code, at + loop.end() - 1, "(", ")"))
    return code.index(";", at) + 1


def device_loops(path):
    """Every loop (`for`, `while`, `do`) in the device code of the file at `path`."""
    text = path.read_text()
    code = _without_comments(text)
    lines = text.splitlines()
    loops = []
    for begin, end in _device_bodies(code):
        for match in re.finditer(r"\b(for|while|do)\b", code[begin:end]):
            at = begin + match.start()
            line = code.count("\n", 0, at) + 1
            instrumented = leaves = False
            if match.group(1) == "for":
                paren = code.index("(", at)
                close = _matching(code, paren, "(", ")")
                parts = code[paren + 1:close - 1].split(";")  # no `;` inside a header's parentheses here
                if len(parts) == 3:
                    condition = parts[1].strip()
                    instrumented = condition.startswith(MACRO + "(") and \
                        _matching(condition, len(MACRO), "(", ")") == len(condition)
                leaves = re.search(r"\b(break|return|goto)\b", code[close:_statement_end(code, close)]) is not None
            loops.append(DeviceLoop(path.name, line, lines[line - 1].strip(), instrumented, leaves))
    return loops


def every_device_loop():
    return [loop for path in kernel_sources() for loop in device_loops(path)]


def _emu_ops():
    from gannorm_kernels import backends
    reason = backends.unavailable_reason("cuda-emu", "cpu")
    if reason is not None:
        pytest.skip(f"loop coverage is counted by the CUDA emulator: {reason}")
    backends.compiled_ops("cuda-emu")  # loads the library
    return torch.ops.gannorm_emu


class CudaLoopCoverage:
    """Counts, while active, every GANNORM_LOOP the emulated kernels run; `loops` is filled on
    exit. Not nested (the emulator keeps one set of counts). Skips the test when the emulator
    is not built."""

    def __init__(self):
        self._ops = _emu_ops()
        self.loops = {}

    def __enter__(self):
        assert not self._ops.set_loop_counting(True), "loop counting was on already"
        return self

    def __exit__(self, *exc):
        names, counts = self._ops.loop_counts()
        self._ops.set_loop_counting(False)
        for k, name in enumerate(names):
            site, function = name.split(" ", 1)
            file, line = site.rsplit(":", 1)
            entries, iterations, most = counts[3 * k:3 * k + 3]
            self.loops[(file, int(line))] = CudaLoopStats(function, entries, iterations, most)
        return False


def assert_every_cuda_loop_iterates(coverage, source, minimum=2):
    """Every loop of csrc/<source> and csrc/common.cuh ran `minimum` iterations in one entry
    (one thread's) in what `coverage` counted; names those that did not, or never ran."""
    problems = []
    for loop in device_loops(CSRC / source) + device_loops(CSRC / "common.cuh"):
        where = f"csrc/{loop.file}:{loop.line} `{loop.source}`"
        stats = coverage.loops.get((loop.file, loop.line))
        if stats is None:
            problems.append(f"{where}: never ran")
        elif stats.most < minimum:
            problems.append(f"{stats.function}: loop at {where} ran at most {stats.most} iteration(s) in one entry "
                            f"(< {minimum}; {stats.iterations} iterations in {stats.entries} entries)")
    assert not problems, f"{len(problems)} CUDA loop coverage problem(s) in csrc/{source}:\n  " + "\n  ".join(problems)
