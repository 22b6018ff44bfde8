"""Every compiled kernel of gannorm_kernels once, on small awkward shapes: the program
`make gpu-check STAGE=sanitize` runs under `compute-sanitizer --tool memcheck|racecheck|
initcheck|synccheck` (a short run: the sanitizers slow kernels down 10-100x).

What runs, per dtype (fp32, fp16, bf16): weight norm forward and backward at dim 0 (the rows
kernels), dim 1 and the whole tensor (the column kernels), adaptive weight norm, spectral norm
training forward (power iteration, sigma, W / sigma) and backward on a conv (dim 0), a
ConvTranspose (dim 1), a 1-D weight and top-k (num_svs=2) on a Linear, its eval forward, a
grouped model (group_spectral_norms: three layers in one launch set, training, backward and
eval), both similarity penalties forward and backward, minibatch discrimination and minibatch
stddev forward and backward. Shapes are odd and not multiples of a block, so the tail masks are
exercised.

    python tools/sanitize_run.py [--backend cuda|triton|cuda-emu] [--check-coverage]

--check-coverage (not under a sanitizer): fails if an operator of the compiled library (every
op spec's forward and backward) was never called, and on a GPU also if a `__global__` function
of csrc/*.cu never ran (listed with torch.profiler), so the sanitizers cannot pass by missing a
kernel. On a CPU (`--backend cuda-emu`) the same program runs under the emulation with the
operator check, which is how `make test` keeps this script working and complete.
"""

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gannorm_kernels as gk  # noqa: E402
from gannorm_kernels import backends, functional  # noqa: E402
from gannorm_kernels.ops import SPECS  # noqa: E402
from gpu_check import cuda_kernel_names  # noqa: E402  (tools/, this file's folder)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_once(backend, device, dtype):
    """Each op forward and backward, then the eval forward; returns a checksum (host sync at the end only)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(device, dtype).requires_grad_()

    total = []
    # weight norm: dim 0 (rows), dim 1 and the whole tensor (columns)
    for dim in (0, 1, None):
        v = randn(37, 19, 3, 3)
        g_shape = [1] * 4 if dim is None else [s if i == dim else 1 for i, s in enumerate(v.shape)]
        g = (torch.rand(g_shape, generator=gen) + 0.5).to(device, dtype).requires_grad_()
        w = functional.weight_norm(v, g, dim, backend=backend)
        w.backward(torch.ones_like(w))
        total += [w.float().sum(), v.grad.float().sum(), g.grad.float().sum()]
    # layers: adaptive weight norm, spectral norm on a conv, a ConvTranspose, a Linear, a 1-D weight
    torch.manual_seed(0)
    vector = nn.Module()
    vector.weight = nn.Parameter(torch.randn(7))
    model = nn.ModuleDict({
        "awn": gk.adaptive_weight_norm(nn.Conv2d(3, 5, 3), per="layer", backend=backend),
        "sn_conv": gk.spectral_norm(nn.Conv2d(5, 33, 3), backend=backend),
        "sn_transposed": gk.spectral_norm(nn.ConvTranspose2d(33, 6, 3), backend=backend),
        "mbstd": gk.MinibatchStdDev(group_size=3, backend=backend),
        "mbd": gk.MinibatchDiscrimination(7 * 9 * 9, 5, 3, backend=backend),
        "sn_linear": gk.spectral_norm(nn.Linear(7 * 9 * 9 + 5, 5), backend=backend),
        "sn_topk": gk.spectral_norm(nn.Linear(5, 3), num_svs=2, backend=backend),
        "sn_vector": gk.spectral_norm(vector, backend=backend),
    }).to(device, dtype)
    # grouped: layers of different shapes and dims 0 in one launch set (the group's own kernels)
    grouped = nn.Sequential(gk.spectral_norm(nn.Conv2d(3, 9, 3), backend=backend), nn.LeakyReLU(0.2),
                            gk.spectral_norm(nn.Conv2d(9, 35, 3, stride=2), backend=backend), nn.Flatten(),
                            gk.spectral_norm(nn.Linear(35 * 4 * 4, 1), backend=backend)).to(device, dtype)
    gk.group_spectral_norms(grouped)
    x = torch.randn(6, 3, 11, 11, generator=gen).to(device, dtype)

    def forward(inputs):
        h = model["sn_transposed"](nn.functional.leaky_relu(model["sn_conv"](model["awn"](inputs)), 0.2))
        features = model["mbstd"](h).flatten(1)
        out = model["sn_topk"](model["sn_linear"](model["mbd"](features))) * model["sn_vector"].weight.sum()
        return out + grouped(inputs), features

    out, features = forward(x)
    loss = out.float().mean() + gk.pairwise_similarity_penalty(features, "cosine", backend=backend).float() \
        + gk.pairwise_similarity_penalty(features, "rbf", 64.0, backend=backend).float()
    loss.backward()
    parameters = list(model.parameters()) + list(grouped.parameters())
    total += [loss.detach()] + [p.grad.float().sum() for p in parameters if p.grad is not None]
    model.eval()
    grouped.eval()
    with torch.no_grad():
        evaluated, _ = forward(x)
    total.append(evaluated.float().sum())
    return torch.stack([t.detach().float() for t in total]).sum()


class CalledOperators(TorchDispatchMode):
    """Records the name of every operator dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def uncalled_operators(backend, called) -> list[str]:
    """The compiled library's kernel operators (each spec's forward and backward) not in `called`."""
    namespace = backends.OPS_NAMESPACE[backend]
    expected = {f"{namespace}::{name}" for spec in SPECS.values() for name in (spec.forward_name, spec.backward_name)}
    return sorted(expected - called)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda", choices=["cuda", "triton", "cuda-emu", "reference"])
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--check-coverage", action="store_true")
    args = parser.parse_args()
    device = "cuda" if args.backend in ("cuda", "triton") else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"sanitize_run: backend {args.backend!r} needs a CUDA GPU")
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    if args.check_coverage and args.backend not in ("cuda", "cuda-emu"):
        raise SystemExit("sanitize_run: --check-coverage is for the compiled kernels: --backend cuda or cuda-emu")
    if args.check_coverage:
        called = CalledOperators()
        with called:
            if device == "cuda":
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    checksums = [run_once(args.backend, device, dtype) for dtype in dtypes]
                    torch.cuda.synchronize()
            else:
                checksums = [run_once(args.backend, device, dtype) for dtype in dtypes]
        uncalled = uncalled_operators(args.backend, called.names)
        if uncalled:
            raise SystemExit(f"sanitize_run: these operators were never called, so a sanitizer would not see their "
                             f"kernels: {uncalled}")
        print(f"sanitize_run: every one of the {len(SPECS)} op specs' forward and backward operators was called")
        if device == "cuda":
            ran = {event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA}
            missing = [name for name in cuda_kernel_names() if not any(name in launched for launched in ran)]
            print(f"sanitize_run: {len(cuda_kernel_names())} __global__ functions in csrc/, "
                  f"{len(ran)} distinct GPU kernels ran")
            if missing:
                raise SystemExit(f"sanitize_run: these CUDA kernels never ran, so a sanitizer would not see them: "
                                 f"{missing}")
    else:
        checksums = [run_once(args.backend, device, dtype) for dtype in dtypes]
    values = [float(c) for c in checksums]  # the one host sync, at the end
    bad = [str(d) for d, v in zip(dtypes, values) if v != v or abs(v) == float("inf")]
    print(f"sanitize_run: backend {args.backend} on {device}, dtypes {args.dtypes}: checksums "
          + ", ".join(f"{v:.6g}" for v in values))
    if bad:
        raise SystemExit(f"sanitize_run: non-finite results in {bad}")


if __name__ == "__main__":
    main()
