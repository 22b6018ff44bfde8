"""Static GPU check, for machines without a GPU: `python -m gannorm_kernels.tools.static_check`
(`make static-check`, part of `make test`).

- Triton: every op spec's launchers are run on meta tensors for every workload in
  `gannorm_kernels.tools.workloads` (GAN layers, minibatch shapes) and for inputs of 2^31
  elements or more (LARGE_WEIGHT, LARGE_STDDEV), every dim and dtype they
  support (WORKLOAD_CALLS, one entry per op spec), with launches recorded instead of run; each distinct (kernel, dtypes, constexprs, num_warps) is compiled for sm_80
  and sm_90 with `triton.compile`, and the cubin's resource usage read with `cuobjdump`.
- CUDA C++: `cuobjdump -res-usage` on the built extension, every kernel and arch.

Prints one row per kernel configuration and arch: registers, shared memory, local memory
(spills). Exits non-zero if anything fails to compile or spills. Triton's runtime specialises
integer arguments (== 1, divisible by 16) further than this generic compile does; the register
counts are those of the generic variant.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET_ARCHS = (80, 90)
_TRITON_DTYPES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float64": "fp64",
                  "torch.int64": "i64"}  # int64: the grouped kernels' tables


def _meta(*shape, dtype):
    import torch
    return torch.empty(shape, dtype=dtype, device="meta")


def _acc(dtype):
    from ..dtypes import acc_dtype
    return acc_dtype(dtype)


# Tensors of 2^31 elements or more: some of their sizes reach the kernels as int64 arguments
# (the element count of the weight norm and spectral norm grid-stride loops, a sample's size in
# minibatch stddev), which Triton compiles as other variants; those are compiled too.
LARGE_WEIGHT = (8, 256, 2 ** 20 + 1)  # 2.15e9 elements
LARGE_STDDEV = (4, 8, 2 ** 14, 2 ** 14 + 1)  # samples of 2.1e9 elements, in 2 channel groups


# Per op spec (by name): calls its Triton (forward, backward) launchers on meta tensors for the
# workloads, for one dtype. An op spec without an entry here fails the check.
def _weight_norm_calls(forward, backward, dtype):
    from .workloads import GAN_LAYERS
    for _, _, shape in GAN_LAYERS + [("large", "", LARGE_WEIGHT)]:
        v = _meta(*shape, dtype=dtype)
        for dim in (0, 1, len(shape) - 1, -1):
            channels = 1 if dim == -1 else shape[dim]
            g = _meta(channels, dtype=dtype)
            forward(v, g, dim)
            backward(v, v, g, _meta(channels, dtype=_acc(dtype)), dim)


def _spectral_norm_calls(forward, backward, dtype):
    from ..checks import matrix_shape
    from .workloads import GAN_LAYERS
    for _, _, shape in GAN_LAYERS + [("large", "", LARGE_WEIGHT)]:
        weight = _meta(*shape, dtype=dtype)
        for dim in (0, 1):
            h, w = matrix_shape(shape, dim)
            u, v = _meta(h, dtype=dtype), _meta(w, dtype=dtype)
            sigma = _meta(dtype=_acc(dtype))
            forward(weight, u, v, None, dim, 2, 1e-12, True)
            forward(weight, u, v, None, dim, 1, 1e-12, False)
            forward(weight, u, v, sigma, dim, 1, 1e-12, False)
            backward(weight, weight, _meta(h, dtype=_acc(dtype)), _meta(w, dtype=_acc(dtype)), sigma, dim, 1e-12)


def _spectral_norm_group_calls(forward, backward, dtype):
    from ..checks import matrix_shape
    from .workloads import GAN_LAYERS
    weights = [_meta(*shape, dtype=dtype) for _, _, shape in GAN_LAYERS]  # one model's layers, one group
    for dim in (0, 1):
        dims = [dim] * len(weights)
        layouts = [matrix_shape(w.shape, dim) for w in weights]
        us, vs = [_meta(h, dtype=dtype) for h, _ in layouts], [_meta(w, dtype=dtype) for _, w in layouts]
        forward(weights, us, vs, dims, 2, 1e-12, True)
        forward(weights, us, vs, dims, 1, 1e-12, False)
        backward(weights, weights, _meta(sum(h for h, _ in layouts), dtype=_acc(dtype)),
                 _meta(sum(w for _, w in layouts), dtype=_acc(dtype)), _meta(len(weights), dtype=_acc(dtype)), dims,
                 1e-12)


def _spectral_norm_topk_calls(forward, backward, dtype):
    # each padded k on the smallest and the largest DCGAN layer (the block sizes' extremes), dim 0;
    # k = 4 along dim 1 too (the strided columns)
    from ..checks import matrix_shape
    from .workloads import GAN_LAYERS
    shapes = [shape for model, _, shape in GAN_LAYERS if model == "dcgan64"]
    for shape, dim, ks in [(min(shapes, key=math.prod), 0, (2, 4, 8)), (max(shapes, key=math.prod), 0, (2, 4, 8)),
                           (max(shapes, key=math.prod), 1, (4,))]:
        weight = _meta(*shape, dtype=dtype)
        h, w = matrix_shape(shape, dim)
        for k in ks:
            u, v = _meta(k, h, dtype=dtype), _meta(k, w, dtype=dtype)
            forward(weight, u, v, dim, 2, 1e-12, True)
            forward(weight, u, v, dim, 1, 1e-12, False)
        backward(weight, weight, _meta(4, h, dtype=_acc(dtype)), _meta(4, w, dtype=_acc(dtype)),
                 _meta(4, dtype=_acc(dtype)), dim, 1e-12)


def _spectral_norm_vector_calls(forward, backward, dtype):
    from .workloads import GAN_LAYERS
    for _, _, shape in GAN_LAYERS + [("large", "", LARGE_WEIGHT)]:
        flat = _meta(math.prod(shape), dtype=dtype)
        forward(flat, 1e-12)
        backward(flat, flat, _meta(dtype=_acc(dtype)), 1e-12)


def _similarity_cosine_calls(forward, backward, dtype):
    from .workloads import MINIBATCH_FEATURES
    for n, d in MINIBATCH_FEATURES:
        f = _meta(n, d, dtype=dtype)
        forward(f, 1e-12)
        backward(_meta(dtype=dtype), f, _meta(d, dtype=_acc(dtype)), _meta(n, dtype=_acc(dtype)), 1e-12)


def _similarity_rbf_calls(forward, backward, dtype):
    from .workloads import MINIBATCH_FEATURES
    for n, d in MINIBATCH_FEATURES:
        f = _meta(n, d, dtype=dtype)
        forward(f, 1.0)
        backward(_meta(dtype=dtype), f, 1.0)


def _minibatch_discrimination_calls(forward, backward, dtype):
    from .workloads import MINIBATCH_DISCRIMINATION
    for n, b, c in MINIBATCH_DISCRIMINATION:
        m = _meta(n, b, c, dtype=dtype)
        forward(m)
        backward(_meta(n, b, dtype=dtype), m)


def _minibatch_stddev_calls(forward, backward, dtype):
    from .workloads import MINIBATCH_STDDEV
    for shape, num_channels in [(shape, 1) for shape in MINIBATCH_STDDEV] + [(LARGE_STDDEV, 2)]:
        x = _meta(*shape, dtype=dtype)
        forward(x, 4, num_channels)
        backward(_meta(shape[0], shape[1] + num_channels, *shape[2:], dtype=dtype), x, 4, num_channels)


WORKLOAD_CALLS = {
    "weight_norm": _weight_norm_calls,
    "spectral_norm": _spectral_norm_calls,
    "spectral_norm_vector": _spectral_norm_vector_calls,
    "spectral_norm_group": _spectral_norm_group_calls,
    "spectral_norm_topk": _spectral_norm_topk_calls,
    "similarity_cosine": _similarity_cosine_calls,
    "similarity_rbf": _similarity_rbf_calls,
    "minibatch_discrimination": _minibatch_discrimination_calls,
    "minibatch_stddev": _minibatch_stddev_calls,
}


def _workload_launches():
    """Every Triton launch each op spec's launchers make for the workloads, recorded on meta tensors."""
    from .. import functional  # noqa: F401  (declares every op spec)
    from ..dtypes import FLOAT_DTYPES
    from ..ops import SPECS
    from ..triton.common import record_launches

    missing = sorted(set(SPECS) - set(WORKLOAD_CALLS))
    if missing:
        raise SystemExit(f"static_check: no workload calls for the op spec(s) {', '.join(missing)}: add them to "
                         "WORKLOAD_CALLS")
    with record_launches() as records:
        for name, spec in SPECS.items():
            forward, backward = spec.triton()
            for dtype in FLOAT_DTYPES:
                WORKLOAD_CALLS[name](forward, backward, dtype)
    return records


def _signature(kernel, args, constexprs):
    """Triton's signature and constexpr dict for a recorded launch."""
    signature, values = {}, {}
    positional = iter(args)
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            values[param.name] = constexprs[param.name]
            continue
        value = next(positional)
        if hasattr(value, "dtype"):
            signature[param.name] = "*" + _TRITON_DTYPES[str(value.dtype)]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"
        else:
            signature[param.name] = "fp32"
    return signature, values


def _cuobjdump() -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _resource_usage(binary: str):
    """[(arch, mangled function name, {REG, STACK, SHARED, LOCAL})] from `cuobjdump -res-usage`."""
    out = subprocess.run([_cuobjdump(), "-res-usage", binary], capture_output=True, text=True, check=True).stdout
    rows, arch, function = [], "", None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("Function "):
            function = line[len("Function "):].rstrip(":")
        elif function and (match := _RESOURCES.search(line)):
            rows.append((arch, function, dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, match.groups())))))
            function = None
    return rows


def check_triton():
    """Rows (kernel, config, arch, usage or error) for every recorded Triton configuration."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.interpreter import InterpretedFunction

    records = _workload_launches()
    if records and isinstance(records[0][0], InterpretedFunction):
        raise SystemExit("static_check: TRITON_INTERPRET=1 is set; the kernels must be compiled, not interpreted")
    seen, rows = set(), []
    for kernel, _, args, constexprs in records:
        constexprs = dict(constexprs)
        num_warps = constexprs.pop("num_warps", 4)
        fp_fusion = constexprs.pop("enable_fp_fusion", True)
        signature, values = _signature(kernel, args, constexprs)
        pointer_types = ",".join(sorted({t for t in signature.values() if t.startswith("*")}))
        wide = [name for name, kind in signature.items() if kind == "i64"]
        config = (", ".join(f"{k}={getattr(v, 'name', v)}" for k, v in values.items()) + f", warps={num_warps}"
                  + ("" if fp_fusion else ", no fp fusion") + (f", int64 {', '.join(wide)}" if wide else ""))
        key = (kernel.fn.__module__, kernel.fn.__name__, pointer_types, config, tuple(signature.values()))
        if key in seen:
            continue
        seen.add(key)
        for arch in TARGET_ARCHS:
            family = kernel.fn.__module__.rsplit(".", 1)[-1]
            label = (f"triton {family}.{kernel.fn.__name__}", f"{pointer_types}; {config}", f"sm_{arch}")
            try:
                compiled = triton.compile(ASTSource(kernel, signature, constexprs=values),
                                          target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                                 "enable_fp_fusion": fp_fusion})
                with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                    cubin.write(compiled.asm["cubin"])
                    cubin.flush()
                    (_, _, usage), = _resource_usage(cubin.name)
                rows.append(label + (usage, None))
            except Exception as error:  # a kernel that no longer compiles is a finding, not a crash
                rows.append(label + (None, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"))
    return rows


def check_cuda():
    """Rows for every kernel and arch in the built CUDA extension (none if it is not built)."""
    from .. import backends

    if backends.extension_error("cuda") is not None:
        return [], backends.extension_error("cuda")
    module, _ = backends._import("gannorm_kernels._C")
    rows = []
    usage = _resource_usage(module.__file__)
    names = subprocess.run(["c++filt"], input="\n".join(f for _, f, _ in usage), capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for (arch, _, resources), name in zip(usage, names):
        # "void gannorm::cuda::(anonymous namespace)::kernel<float, true>(float*, ...)" -> kernel, <float, true>
        name = re.sub(r"^void |gannorm::cuda::|\(anonymous namespace\)::", "", name)
        name = name[:name.index("(")].replace("c10::BFloat16", "bf16").replace("c10::Half", "fp16")
        kernel, _, template = name.partition("<")
        rows.append((f"cuda {kernel}", f"<{template}" if template else "-", arch, resources, None))
    return rows, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-triton", action="store_true", help="only the CUDA extension")
    parser.add_argument("--output", help="write the full table (a row per configuration and arch) here; "
                        "stdout then gets a row per kernel")
    args = parser.parse_args(argv)
    rows = [] if args.skip_triton else check_triton()
    cuda_rows, cuda_missing = check_cuda()
    rows += cuda_rows
    table = ["| kernel | configuration | arch | registers | shared bytes | local (spill) bytes | status |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    summary = {}
    failures = []
    for kernel, config, arch, usage, error in rows:
        entry = summary.setdefault(kernel, {"configs": 0, "REG": 0, "SHARED": 0, "LOCAL": 0, "failed": 0})
        entry["configs"] += 1
        if error is not None:
            entry["failed"] += 1
            failures.append(f"{kernel} [{config}] {arch}: {error}")
            table.append(f"| {kernel} | {config} | {arch} | | | | FAILED: {error} |")
            continue
        for key in ("REG", "SHARED", "LOCAL"):
            entry[key] = max(entry[key], usage[key])
        if usage["LOCAL"] > 0:
            failures.append(f"{kernel} [{config}] {arch}: spills {usage['LOCAL']} bytes to local memory")
        table.append(f"| {kernel} | {config} | {arch} | {usage['REG']} | {usage['SHARED']} | {usage['LOCAL']} | "
                     f"{'SPILLS' if usage['LOCAL'] else 'ok'} |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text("\n".join(table) + "\n")
        print(f"| kernel | configurations x archs (sm_{', sm_'.join(map(str, TARGET_ARCHS))}) | max registers | "
              "max shared bytes | max local (spill) bytes | failed |")
        print("| --- | --- | --- | --- | --- | --- |")
        for kernel, e in summary.items():
            print(f"| {kernel} | {e['configs']} | {e['REG']} | {e['SHARED']} | {e['LOCAL']} | {e['failed']} |")
    else:
        print("\n".join(table))
    triton_count = sum(r[0].startswith("triton") for r in rows)
    print(f"\nstatic check: {triton_count} Triton compilations, {len(cuda_rows)} CUDA kernels"
          + (f" (CUDA extension not checked: {cuda_missing})" if cuda_missing else "")
          + (f"; full table in {args.output}" if args.output else "") + f"; {len(failures)} failure(s)")
    for failure in failures:
        print(f"  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
