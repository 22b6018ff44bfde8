"""Every CUDA kernel, forward and backward, on awkward shapes and every dtype, through the raw
operators of an emulator library built with AddressSanitizer (`make asan-emu`). Run by
tests/test_emulator.py in a subprocess with libasan preloaded: any read or write outside a
tensor's memory aborts with ASan's report. Usage: python emu_asan_sweep.py LIBRARY [bug]."""

import sys

import torch

torch.ops.load_library(sys.argv[1])
ops = torch.ops.gannorm_emu
called = set()  # the operators run, printed for the test to hold against the op specs


def call(name, *args):
    called.add(name)
    return getattr(ops, name)(*args)


generator = torch.Generator().manual_seed(0)


def rand(*shape, dtype):
    return torch.randn(*shape, generator=generator).to(dtype)


def unit(n, dtype):
    return torch.nn.functional.normalize(rand(n, dtype=torch.float32), dim=0).to(dtype)


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


if len(sys.argv) > 2 and sys.argv[2] == "bug":  # the demo: reads one element past x's end
    ops.hazard_neighbour_sums(torch.randn(100), True)

calls = 0
for seed in (1,):
    call("set_schedule_seed", seed)
    for dtype in (torch.float32, torch.float16):  # element sizes 4 and 2
        for shape in ((37, 5, 3), (1, 1), (3, 1030), (70, 33), (5, 2, 3, 3)):
            for dim in sorted({0, 1, len(shape) - 1, -1}):
                v = rand(*shape, dtype=dtype)
                channels = 1 if dim == -1 else shape[dim]
                g = rand(channels, dtype=dtype).abs() + 0.5
                w, norms = call("weight_norm_fwd", v, g, dim)
                call("weight_norm_bwd", torch.ones_like(w), v, g, norms, dim)
                if dim >= 0:
                    h = shape[dim]
                    u, vv = unit(h, dtype), unit(v.numel() // h, dtype)
                    for training, n in ((True, 1), (True, 2), (False, 1)):
                        out, sigma, u_used, v_used = call("spectral_norm_fwd", v, u, vv, None, dim, n, 1e-12, training)
                        call("spectral_norm_bwd", torch.ones_like(out), v, u_used, v_used, sigma, dim, 1e-12)
                    call("spectral_norm_fwd", v, u, vv, sigma, dim, 1, 1e-12, False)
                calls += 1
            flat = v.flatten()
            out, sigma = call("spectral_norm_vector_fwd", flat, 1e-12)
            call("spectral_norm_vector_bwd", torch.ones_like(out), flat, sigma, 1e-12)
            # top-k (k = 2, where both sides allow it), rows along dim 0
            h, w = shape[0], v.numel() // shape[0]
            if min(h, w) >= 2:
                for training in (True, False):
                    uk = torch.linalg.qr(rand(h, 2, dtype=torch.float32))[0].t().contiguous().to(dtype)
                    vk = torch.linalg.qr(rand(w, 2, dtype=torch.float32))[0].t().contiguous().to(dtype)
                    out, sigmas, u_used, v_used = call("spectral_norm_topk_fwd", v, uk, vk, 0, 2, 1e-12, training)
                    call("spectral_norm_topk_bwd", torch.ones_like(out), v, u_used, v_used, sigmas, 0, 1e-12)
        # grouped: the shapes above in one launch set (layers of different sizes, dims 0 and 1)
        weights = [rand(*shape, dtype=dtype) for shape in ((37, 5, 3), (1, 1), (3, 1030), (70, 33), (5, 2, 3, 3))]
        dims = [0, 0, 1, 0, 1]
        for training, n in ((True, 1), (True, 2), (False, 1)):
            us = [unit(w.shape[d], dtype) for w, d in zip(weights, dims)]
            vs = [unit(w.numel() // w.shape[d], dtype) for w, d in zip(weights, dims)]
            outs, sigmas, u_used, v_used = call("spectral_norm_group_fwd", weights, us, vs, dims, n, 1e-12, training)
            call("spectral_norm_group_bwd", [torch.ones_like(o) for o in outs], weights, u_used, v_used, sigmas, dims,
                                        1e-12)
        for n, d in ((2, 1), (45, 19), (65, 300), (3, 2049)):
            f = rand(n, d, dtype=dtype)
            penalty, s, norms = call("similarity_cosine_fwd", f, 1e-12)
            call("similarity_cosine_bwd", torch.ones_like(penalty), f, s, norms, 1e-12)
            penalty = call("similarity_rbf_fwd", f, 3.0)
            call("similarity_rbf_bwd", torch.ones_like(penalty), f, 3.0)
        for n, b, c in ((1, 1, 1), (37, 5, 3), (70, 33, 2)):
            m = rand(n, b, c, dtype=dtype) * 0.3
            o = call("minibatch_discrimination_fwd", m)
            call("minibatch_discrimination_bwd", torch.ones_like(o), m)
        for n, c, h, w, group, f in ((1, 1, 1, 1, 4, 1), (8, 6, 5, 3, 4, 2), (6, 4, 7, 9, 3, 4)):
            x = rand(n, c, h, w, dtype=dtype)
            out = call("minibatch_stddev_fwd", x, group, f)
            call("minibatch_stddev_bwd", torch.ones_like(out), x, group, f)
print("operators called:", " ".join(sorted(called)))
print(f"asan sweep: {calls} weight/spectral-norm cases (top-k and grouped too) and every minibatch op, clean")
