"""Loop coverage of the Triton kernels under the interpreter: how many times each `for` loop of
a kernel ran per entry, so a test can show that its shapes run every loop at least twice. A
loop that runs once in every test cannot catch a wrong stride or accumulation (`acc = x` for
`acc += x`, a start that skips the second block): its one iteration gives the right answer.

Under TRITON_INTERPRET=1 the interpreter runs each @triton.jit function's Python code (rewritten,
with the file's line numbers) once per program instance, and a jit function called from a kernel
as a plain call: `sys.settrace` sees their lines. For a `for` loop, Python 3.11 reports the
header line on entry and after each iteration (the jump back to FOR_ITER), and a line of the
body after each header that starts an iteration. Per frame, a header line reached from outside
the loop's body is an entry, a body line reached from the header an iteration; this holds for
a loop whose body starts with another loop too.

    with LoopCoverage(module) as coverage:
        ...  # launches
    coverage.loops  # {(kernel, function, header line): LoopStats}

`kernel` is the launched kernel, `function` the jit function holding the loop: the kernel
itself, or a helper it calls (a helper's loops count separately for each kernel calling it).
"""

import ast
import functools
import importlib
import inspect
import linecache
import os
import sys
from dataclasses import dataclass

import pytest


@dataclass
class LoopStats:
    entries: int = 0
    iterations: int = 0
    most: int = 0  # the most iterations of one entry

    @property
    def average(self) -> float:
        return self.iterations / self.entries if self.entries else 0.0


def interpreted_kernels(op: str):
    """gannorm_kernels.triton.<op>, the test skipped unless the Triton kernels run under the
    interpreter (compiled kernels run no Python to trace)."""
    from gannorm_kernels import backends
    reason = backends.unavailable_reason("triton", "cpu")
    if reason is not None:
        pytest.skip(f"loop coverage is traced under the Triton interpreter: {reason}")
    return importlib.import_module(f"gannorm_kernels.triton.{op}")


def _jit_functions(module):
    """name -> Python function of every @triton.jit function in `module`'s namespace (its own
    and those it imports)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    return {name: obj.fn for name, obj in vars(module).items() if isinstance(obj, (JITFunction, InterpretedFunction))}


def defined_jit_functions(module):
    """The names of the @triton.jit functions `module` defines (kernels and helpers)."""
    return {name for name, fn in _jit_functions(module).items() if fn.__module__ == module.__name__}


@functools.lru_cache(maxsize=None)
def _file_ast(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def function_loops(fn):
    """{header line: the body's lines} of every `for` loop of fn, with the file's line numbers."""
    path = inspect.getsourcefile(fn)
    defs = [node for node in _file_ast(path).body if isinstance(node, ast.FunctionDef) and node.name == fn.__name__]
    assert len(defs) == 1, f"{path}: {len(defs)} top-level definitions of {fn.__name__}"
    loops = {}
    for node in ast.walk(defs[0]):
        if isinstance(node, (ast.While, ast.AsyncFor)):
            raise NotImplementedError(f"{path}:{node.lineno}: only `for` loops are counted")
        if isinstance(node, ast.For):
            assert not node.orelse, f"{path}:{node.lineno}: for/else"
            assert node.body[0].lineno > node.lineno, f"{path}:{node.lineno}: body on the header's line"
            loops[node.lineno] = frozenset(range(node.body[0].lineno, node.body[-1].end_lineno + 1))
    return loops


def loop_source(path, line):
    return linecache.getline(path, line).strip()


class LoopCoverage:
    """Counts, while active, the entries and iterations of every `for` loop of the @triton.jit
    functions in `modules` (and those they import) run by the interpreter."""

    def __init__(self, *modules):
        self._functions = {}  # co_name -> (file, loops)
        for module in modules:
            for name, fn in _jit_functions(module).items():
                self._functions[name] = (inspect.getsourcefile(fn), function_loops(fn))
        self.loops = {}  # (kernel, function, header line) -> LoopStats
        self.launched = set()  # kernels run as programs
        self.ran = set()  # every jit function that ran, kernels and helpers
        self.files = {name: path for name, (path, _) in self._functions.items()}

    def _tracked(self, code):
        entry = self._functions.get(code.co_name)
        return entry if entry is not None and entry[0] == code.co_filename else None

    def _tracer(self):
        functions = self._functions

        def trace(frame, event, arg):  # called for every Python call while active: kept short
            entry = functions.get(frame.f_code.co_name)
            if entry is None or entry[0] != frame.f_code.co_filename:
                return None
            return self._start(frame, entry[1])

        return trace

    def _start(self, frame, loops):
        name = frame.f_code.co_name
        kernel, caller = name, frame.f_back
        while caller is not None:  # the outermost jit frame is the launched kernel
            if self._tracked(caller.f_code) is not None:
                kernel = caller.f_code.co_name
            caller = caller.f_back
        self.ran.add(name)
        if kernel == name:
            self.launched.add(name)
        stats = {header: self.loops.setdefault((kernel, name, header), LoopStats()) for header in loops}
        return _frame_tracer(loops, stats) if loops else None

    def __enter__(self):
        self._previous = sys.gettrace()
        sys.settrace(self._tracer())
        return self

    def __exit__(self, *exc):
        sys.settrace(self._previous)
        return False


def _frame_tracer(loops, stats):
    # line -> [(header, its body)] for the loops whose header or body holds it
    roles = {}
    for header, body in loops.items():
        for line in (header, *body):
            roles.setdefault(line, []).append((header, body))
    previous = None
    current = {}  # header -> iterations of the entry under way

    def close(header):
        count = current.pop(header, None)
        if count is not None and count > stats[header].most:
            stats[header].most = count

    def tracer(frame, event, arg):
        nonlocal previous
        if event == "line":
            line = frame.f_lineno
            for header, body in roles.get(line, ()):
                if line == header:
                    if previous not in body:  # from outside the loop: an entry (else the jump back)
                        close(header)
                        stats[header].entries += 1
                        current[header] = 0
                elif previous == header:  # into the body from the header: an iteration
                    stats[header].iterations += 1
                    current[header] += 1
            previous = line
        elif event == "return":
            for header in list(current):
                close(header)
        return tracer

    return tracer


def _shown(path):
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def assert_every_loop_iterates(module, coverages, minimum=2.0):
    """`coverages`: {case label: LoopCoverage of `module` over that case}. Every jit function
    `module` defines must have run, and every loop of every kernel launched (the kernel's own
    and those of the helpers it calls) must have averaged `minimum` iterations per entry in
    some case: in one case, not pooled over all, so that a case running a loop several times in
    every entry is not outweighed by another case's many single-iteration entries."""
    problems = []
    ran = set().union(*(c.ran for c in coverages.values()))
    launched = set().union(*(c.launched for c in coverages.values()))
    never = sorted(defined_jit_functions(module) - ran)
    if never:
        problems.append(f"never ran: {', '.join(never)} (no case launches or calls them)")
    best = {}
    for label, coverage in coverages.items():
        for loop, stats in coverage.loops.items():
            rank = (stats.average, stats.most, stats.iterations)
            if loop not in best or rank > (best[loop][1].average, best[loop][1].most, best[loop][1].iterations):
                best[loop] = (label, stats)
    files = {}
    for coverage in coverages.values():
        files.update(coverage.files)
    for (kernel, function, header), (label, stats) in sorted(best.items()):
        if stats.average < minimum:
            inside = kernel if function == kernel else f"{kernel} -> {function}"
            problems.append(
                f"{inside}: loop at {_shown(files[function])}:{header} `{loop_source(files[function], header)}` "
                f"averaged at most {stats.average:.2f} iterations per entry in any case (< {minimum}; best: case "
                f"{label}, {stats.iterations} iterations in {stats.entries} entries, at most {stats.most} in one)")
    assert not problems, f"{len(problems)} loop coverage problem(s) in {module.__name__} (kernels launched: " \
        f"{', '.join(sorted(launched))}):\n  " + "\n  ".join(problems)
