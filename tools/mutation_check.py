"""`make mutation-check`: plants realistic kernel bugs one at a time in a scratch copy of the
tree and runs the tests that should notice. A bug the tests miss is a hole in the suite.

Each mutation replaces one exact snippet (which must occur exactly once). C++ mutations rebuild
the emulator in the scratch copy (the CUDA build is not needed: cuda-emu runs the same source).
Before any mutation, every test selection runs once on the unmutated copy and must pass, so a
"killed" can never come from a broken environment. Writes build/mutation_check.md.

Usage: python tools/mutation_check.py [--only ID,ID] [--keep]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / "build" / "mutation" / "tree"
PYTEST_TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Mutation:
    id: str
    path: str
    find: str
    replace: str
    tests: tuple  # pytest arguments: files and a -k expression
    bug: str


SN_TRITON = ("tests/test_spectral_norm.py", "tests/test_double_backward.py", "-k", "triton")
SN_EMU = ("tests/test_spectral_norm.py", "tests/test_emulator.py", "-k", "cuda-emu or emulator")
WN_TRITON = ("tests/test_weight_norm.py", "-k", "triton")
WN_EMU = ("tests/test_weight_norm.py", "tests/test_emulator.py", "-k", "cuda-emu or emulator")
SIM_TRITON = ("tests/test_similarity.py", "-k", "triton")
SIM_EMU = ("tests/test_similarity.py", "tests/test_emulator.py", "-k", "cuda-emu or emulator")
DISC_EMU = ("tests/test_minibatch_discrimination.py", "tests/test_emulator.py", "-k", "cuda-emu or emulator")
STD_TRITON = ("tests/test_minibatch_stddev.py", "-k", "triton")
STD_EMU = ("tests/test_minibatch_stddev.py", "tests/test_emulator.py", "-k", "cuda-emu or emulator")
SN_TRITON_LOWP = ("tests/test_spectral_norm.py", "-k", "triton and (float16 or bfloat16)")
TOPK_TRITON = ("tests/test_spectral_norm.py", "tests/test_properties.py", "-k", "(topk or nan) and triton")
GROUP_EMU = ("tests/test_spectral_norm.py", "-k", "group and cuda-emu")
GLUE_TRAINING = ("tests/test_training.py", "tests/test_training_patterns.py", "-k", "not triton and not built_where_nvcc")
GLUE_CONVERT = ("tests/test_convert.py", "tests/test_training_patterns.py", "tests/test_torch_parametrization.py",
                "-k", "not triton and not built_where_nvcc")
WN_GLUE = ("tests/test_weight_norm.py", "-k", "not triton and not built_where_nvcc")
GLUE_TOPK = ("tests/test_spectral_norm.py", "tests/test_properties.py", "-k", "topk and not triton")
GLUE = ("tests/test_training_patterns.py", "tests/test_spectral_norm.py", "tests/test_double_backward.py",
        "tests/test_backends.py", "tests/test_torch_parametrization.py",
        "-k", "not triton and not built_where_nvcc")  # the scratch copy builds the emulator only

MUTATIONS = [
    # ---- Triton ----
    Mutation("T1", "gannorm_kernels/triton/spectral_norm.py",
             "u_denominator = at_least(tl.sqrt(_sum_partials(x_partials_ptr, n_x_partials, BLOCK_P, ACC)), eps)",
             "u_denominator = tl.sqrt(_sum_partials(x_partials_ptr, n_x_partials, BLOCK_P, ACC)) + eps",
             SN_TRITON, "spectral norm column pass: max(norm, eps) became norm + eps"),
    Mutation("T2", "gannorm_kernels/triton/spectral_norm.py",
             "        grad = (g - c * projection) / denominator",
             "        grad = (g + c * projection) / denominator",
             SN_TRITON, "spectral norm backward: the projection's sign"),
    Mutation("T3", "gannorm_kernels/triton/spectral_norm.py",
             "        total += tl.load(ptr + offsets, mask=offsets < n, other=0.0).to(ACC)",
             "        total += tl.load(ptr + offsets, mask=offsets <= n, other=0.0).to(ACC)",
             SN_TRITON, "partial sums: mask off by one (reads one past the partials)"),
    Mutation("T4", "gannorm_kernels/triton/spectral_norm.py",
             "    for start in range(program.to(tl.int64) * BLOCK, numel, programs * BLOCK):\n",
             "    for start in range(program.to(tl.int64) * 2 * BLOCK, numel, programs * BLOCK):\n",
             SN_TRITON, "spectral norm W / sigma (_divide, every scale pass): grid-stride loop starts at the wrong block"),
    Mutation("T5", "gannorm_kernels/triton/similarity.py",
             "    denominator = at_least(norm, eps)\n    for start in range(0, D, BLOCK_D):",
             "    denominator = norm + eps\n    for start in range(0, D, BLOCK_D):",
             SIM_TRITON, "cosine penalty forward: max(norm, eps) became norm + eps"),
    Mutation("T6", "gannorm_kernels/triton/similarity.py",
             "    return 1.0 / (2.0 * h * h)", "    return 1.0 / (h * h)",
             SIM_TRITON, "rbf kernel: the 2 in 2 bandwidth^2 dropped"),
    Mutation("T7", "gannorm_kernels/triton/minibatch_stddev.py",
             "        total += tl.where(mask, tl.sqrt(variance / G + 1e-8), 0.0)",
             "        total += tl.where(mask, tl.sqrt(variance / G), 0.0)",
             STD_TRITON, "minibatch stddev: the 1e-8 under the root dropped"),
    Mutation("T8", "gannorm_kernels/triton/weight_norm.py",
             "    tl.store(norms_ptr + c, norm, mask=c_mask)",
             "    tl.store(norms_ptr + c, norm)",
             WN_TRITON, "weight norm columns: the norms' store unmasked (writes past the end)"),
    Mutation("T9", "gannorm_kernels/triton/weight_norm.py",
             "        factor = tl.where(norm != 0, div_ieee(tl.full([], 1.0, ACC), safe), 0.0)  # rnorm",
             "        factor = div_ieee(tl.full([], 1.0, ACC), norm)  # rnorm",
             WN_TRITON, "weight norm rows (fused dims): the zero-direction guard dropped (0 * inf)"),
    Mutation("T10", "gannorm_kernels/triton/spectral_norm.py",
             "layer = tl.sum((ends <= pid).to(tl.int32), axis=0)", "layer = tl.sum((ends < pid).to(tl.int32), axis=0)",
             ("tests/test_spectral_norm.py", "-k", "group and triton"),
             "grouped spectral norm: a layer's last program taken for the next layer's"),
    Mutation("T11", "gannorm_kernels/triton/spectral_norm.py",
             "pivot = at_least(tl.sqrt(diag), eps)", "pivot = at_least(diag, eps)",
             ("tests/test_spectral_norm.py", "-k", "topk and triton"),
             "top-k spectral norm: the Cholesky pivot without its square root"),
    Mutation("T12", "gannorm_kernels/triton/common.py",
             "    return tl.where(x < floor, floor, x)", "    return tl.maximum(x, floor)",
             ("tests/test_properties.py", "-k", "nan and triton"),
             "max(norm, eps) as fmax, which drops a NaN (a diverged weight comes out finite)"),
    # T13-T16, C14-C18, P8-P13: planted by an independent audit (helper session)
    Mutation("T13", "gannorm_kernels/triton/spectral_norm.py",
             "    total = tl.zeros([BLOCK], dtype=ACC)\n"
             "    for start in range(pid.to(tl.int64) * BLOCK, numel, tl.num_programs(0) * BLOCK):\n"
             "        offsets, mask = block_at(start, numel, BLOCK)\n"
             "        a = tl.load(a_ptr + start + offsets, mask=mask, other=0.0).to(ACC)\n"
             "        b = tl.load(b_ptr + start + offsets, mask=mask, other=0.0).to(ACC)\n",
             "    total = tl.zeros([BLOCK], dtype=a_ptr.dtype.element_ty)\n"
             "    for start in range(pid.to(tl.int64) * BLOCK, numel, tl.num_programs(0) * BLOCK):\n"
             "        offsets, mask = block_at(start, numel, BLOCK)\n"
             "        a = tl.load(a_ptr + start + offsets, mask=mask, other=0.0)\n"
             "        b = tl.load(b_ptr + start + offsets, mask=mask, other=0.0)\n",
             SN_TRITON_LOWP, "spectral norm <G, W> / ||w||^2 partials accumulated in the weight's dtype (fp16/bf16)"),
    Mutation("T14", "gannorm_kernels/triton/spectral_norm.py",
             "diag = at_least(tl.sum(tl.where(c == col, row, 0.0), axis=0), 0.0)",
             "diag = tl.sum(tl.where(c == col, row, 0.0), axis=0)",
             TOPK_TRITON, "top-k Cholesky: the clamp of a negative residual to 0 dropped (rank-deficient W: NaN)"),
    Mutation("T15", "gannorm_kernels/triton/weight_norm.py",
             "        rnorm3 = rnorm * rnorm * rnorm\n        grad_g = total * rnorm",
             "        rnorm3 = rnorm * rnorm\n        grad_g = total * rnorm",
             WN_TRITON, "weight norm fused rows backward: rnorm^3 term written rnorm^2"),
    Mutation("T16", "gannorm_kernels/triton/minibatch_stddev.py",
             "coefficient = tl.sum(statistic_grad, axis=0) / (tl.cast(span, ACC) * G)",
             "coefficient = tl.sum(statistic_grad, axis=0) / (tl.cast(HW, ACC) * G)",
             STD_TRITON, "minibatch stddev backward: statistic averaged over H W instead of the group's span"),
    # ---- CUDA (run by cuda-emu) ----
    Mutation("C1", "csrc/common.cuh",
             "  __syncthreads();  // the previous call's readers are done with warp_totals\n",
             "", SN_EMU, "block_sum: the barrier before warp_totals is reused, dropped"),
    Mutation("C2", "csrc/common.cuh",
             "  if (tid % kWarpSize == 0) warp_totals[tid / kWarpSize] = x;\n  __syncthreads();\n",
             "  if (tid % kWarpSize == 0) warp_totals[tid / kWarpSize] = x;\n",
             SN_EMU, "block_sum: the barrier between the writes and the reads of warp_totals dropped"),
    Mutation("C3", "csrc/similarity.cu",
             "    for (int d = 0; GANNORM_LOOP(d < kChunk); ++d) {",
             "    for (int d = 0; GANNORM_LOOP(d <= kChunk); ++d) {",
             SIM_EMU, "rbf: reads the shared tile's padding column"),
    Mutation("C4", "csrc/minibatch_discrimination.cu",
             "  for (int c = 0; GANNORM_LOOP(c < C); ++c) l1 += ",
             "  for (int c = 0; GANNORM_LOOP(c <= C); ++c) l1 += ",
             DISC_EMU, "minibatch discrimination: one element past each row (past the tensor on the last)"),
    Mutation("C5", "csrc/similarity.cu",
             "    __syncthreads();  // the previous chunk is consumed\n", "",
             SIM_EMU, "rbf: the barrier before a tile is overwritten dropped"),
    Mutation("C6", "csrc/minibatch_stddev.cu",
             "    total += sqrt_acc(variance / acc(L.G) + acc(1e-8));",
             "    total += sqrt_acc(variance / acc(L.G));",
             STD_EMU, "minibatch stddev: the 1e-8 under the root dropped"),
    Mutation("C7", "csrc/spectral_norm.cu",
             "  return max_acc(sqrt_acc(sum_of_squares), eps);", "  return sqrt_acc(sum_of_squares) + eps;",
             SN_EMU, "spectral norm: max(norm, eps) became norm + eps"),
    Mutation("C8", "csrc/spectral_norm.cu",
             "      sigma = norm_denominator(total, eps);\n    }\n  }\n  const acc denominator = abs_acc(sigma) <= eps ? eps : sigma;  // NaN stays NaN",
             "      sigma = norm_denominator(total, eps);\n    }\n  }\n  const acc denominator = sigma;",
             SN_EMU, "spectral norm scale: the tiny-sigma guard dropped"),
    Mutation("C9", "csrc/weight_norm.cu",
             "  acc sum = 0;\n  for (int64_t i = begin + threadIdx.x; GANNORM_LOOP(i < end); i += blockDim.x) {",
             "  acc sum = 0;\n  for (int64_t i = begin + threadIdx.x; GANNORM_LOOP(i <= end); i += blockDim.x) {",
             WN_EMU, "whole-tensor weight norm partials: each block's range one element too long"),
    Mutation("C10", "csrc/weight_norm.cu",
             "  partial[threadIdx.y][threadIdx.x] = sumsq;\n  __syncthreads();\n",
             "  partial[threadIdx.y][threadIdx.x] = sumsq;\n", WN_EMU,
             "weight norm columns: the barrier between the partial sums and their reader dropped"),
    Mutation("C11", "csrc/spectral_norm.cu",
             "const int64_t stride = int64_t(g.start[1][layer + 1] - g.start[1][layer]) * kThreads;",
             "const int64_t stride = int64_t(gridDim.x) * kThreads;",
             ("tests/test_spectral_norm.py", "-k", "group and cuda-emu"),
             "grouped spectral norm: a layer's u writes stride over the whole grid, not its own blocks"),
    Mutation("C12", "csrc/spectral_norm.cu",
             "value -= q[d] * static_cast<acc>(R[d][c]);", "value -= q[d] * static_cast<acc>(R[c][d]);",
             ("tests/test_spectral_norm.py", "-k", "topk and cuda-emu"),
             "top-k spectral norm: the triangular solve reads R transposed"),
    Mutation("C13", "csrc/spectral_norm.cu",
             "const acc denominator = abs_acc(sigma) <= eps ? eps : sigma;  // NaN stays NaN\n  const int64_t first",
             "const acc denominator = abs_acc(sigma) > eps ? sigma : eps;  // NaN stays NaN\n  const int64_t first",
             ("tests/test_properties.py", "-k", "nan and cuda-emu"),
             "grouped spectral norm scale: the tiny-sigma guard sends a NaN sigma to eps"),
    Mutation("C14", "csrc/spectral_norm.cu",
             "if (local == 0 && threadIdx.x == 0) sigmas[g.first_layer + layer] = sigma;",
             "if (local == 0 && threadIdx.x == 0) sigmas[layer] = sigma;",
             GROUP_EMU, "grouped spectral norm (> 24 layers: chunks): a chunk's sigmas written at its local index"),
    Mutation("C15", "csrc/minibatch_stddev.cu",
             "      const int64_t sample = int64_t(g) * L.groups + m;\n      const scalar_t value",
             "      const int64_t sample = int64_t(m) * L.G + g;\n      const scalar_t value",
             STD_EMU, "minibatch stddev forward: groups of consecutive samples instead of strided ones"),
    Mutation("C16", "csrc/minibatch_discrimination.cu",
             "      __syncwarp();  // the previous chunk's weights are read\n", "",
             DISC_EMU, "minibatch discrimination backward: the warp barrier before the weights are overwritten dropped"),
    Mutation("C17", "csrc/similarity.cu",
             "  const int rows = remaining < kRowsPerBlock ? remaining : kRowsPerBlock;",
             "  const int rows = kRowsPerBlock;",
             SIM_EMU, "cosine rows: the last block sums rows past N"),
    Mutation("C18", "csrc/weight_norm.cu",
             "  acc sumsq = 0;\n  if (active) {",
             "  scalar_t sumsq = 0;\n  if (active) {",
             WN_EMU, "weight norm columns (last dim): sum of squares accumulated in fp16/bf16"),
    # ---- Python glue ----
    Mutation("P1", "gannorm_kernels/nn.py",
             "spectral_norm(\n                weight, self._u, self._v, self.dim, self.n_power_iterations, self.eps, "
             "training,",
             "spectral_norm(\n                weight, self._u, self._v, self.dim, self.n_power_iterations, self.eps, True,",
             GLUE, "SpectralNorm: the power iteration also runs in eval"),
    Mutation("P2", "gannorm_kernels/convert.py",
             "eps=self.eps, training=do_power_iteration, backend=self.backend)",
             "eps=self.eps, training=True, backend=self.backend)",
             GLUE, "converted legacy spectral norm: iterates in eval and in remove_spectral_norm"),
    Mutation("P3", "gannorm_kernels/ops/__init__.py",
             "leaves[:n],\n                                        create_graph=True, allow_unused=True)",
             "leaves[:n],\n                                        create_graph=False, allow_unused=True)",
             GLUE, "double backward: the first derivative no longer differentiable"),
    Mutation("P4", "gannorm_kernels/reference.py",
             "a cached sigma).\n    \"\"\"\n    compute = acc_dtype(weight.dtype)\n    weight_mat = weight_matrix(weight, dim)"
             ".to(compute)\n    u_used = u.detach().to(compute).clone()",
             "a cached sigma).\n    \"\"\"\n    compute = acc_dtype(weight.dtype)\n    weight_mat = weight_matrix(weight, dim)"
             ".to(compute)\n    u_used = u.detach().to(compute)",
             GLUE, "reference spectral norm: u used without a copy"),
    Mutation("P5", "gannorm_kernels/ops/spectral_norm.py",
             "        weight, u_used, v_used, dim, 1, eps, training=False)[0],",
             "        weight, u_used, v_used, dim, 1, eps, training=True)[0],",
             GLUE, "spectral norm double backward: differentiates a fresh power iteration"),
    Mutation("P6", "gannorm_kernels/ops/__init__.py",
             "        self.differentiable = tuple(inputs.index(name[5:]) for name in grads)",
             "        self.differentiable = tuple(inputs.index(name[5:]) for name in reversed(grads))",
             ("tests/test_weight_norm.py", "tests/test_double_backward.py", "-k", "not triton"),
             "op spec: each backward gradient given to the wrong input (weight norm's grad_v and grad_g swapped)"),
    Mutation("P7", "gannorm_kernels/nn.py",
             "            out, self.grouped = self.grouped, None\n", "            out = self.grouped\n",
             ("tests/test_training.py", "-k", "group and cuda-emu"),
             "grouped spectral norm: a layer's second use in a forward reuses the grouped weight (torch iterates)"),
    Mutation("P8", "gannorm_kernels/training.py",
             '                if training and hasattr(owner, "_sigmas"):',
             '                if hasattr(owner, "_sigmas"):',
             GLUE_TRAINING, "grouped spectral norm: the _sigmas buffer also overwritten by eval forwards"),
    Mutation("P9", "gannorm_kernels/training.py",
             "                buffer_names = (\"_u\", \"_v\")\n                training = owner.training",
             "                buffer_names = (\"_u\", \"_v\")\n                training = model.training",
             GLUE_TRAINING, "grouped spectral norm: a layer iterates by the model's mode, not its own"),
    Mutation("P10", "gannorm_kernels/convert.py",
             'getattr(theirs, "n_power_iterations", 1), theirs.dim, theirs.eps,',
             '1, theirs.dim, theirs.eps,',
             GLUE_CONVERT, "convert: torch's parametrization's n_power_iterations dropped (becomes 1)"),
    Mutation("P11", "gannorm_kernels/nn.py",
             "reference.spectral_norm_topk(weight_mat, u, v, 0, 15 + n_power_iterations, eps, True)",
             "reference.spectral_norm_topk(weight_mat, u, v, 0, 15, eps, True)",
             GLUE_TOPK, "num_svs > 1 layer: the registration forward's n iterations left out of the warm-up"),
    Mutation("P12", "gannorm_kernels/training.py",
             "reference.spectral_power_method(matrix.t(), new_v, new_u, n_warmup, eps)",
             "reference.spectral_power_method(matrix, new_u, new_v, n_warmup, eps)",
             GLUE_TRAINING, "reset_spectral_norm: a legacy hook warmed up in the new API's order (u first)"),
    Mutation("P13", "gannorm_kernels/training.py",
             "torch._foreach_lerp_(targets, sources, 1.0 - decay)",
             "torch._foreach_lerp_(targets, sources, decay)",
             GLUE_TRAINING, "ema_update: decay and 1 - decay swapped"),
    Mutation("T17", "gannorm_kernels/triton/weight_norm.py",
             "    grad_w, v, g, norms = grad_w.contiguous(), v.contiguous(), g.contiguous(), norms.contiguous()",
             "    v, g, norms = v.contiguous(), g.contiguous(), norms.contiguous()",
             ("tests/test_weight_norm.py", "tests/test_layouts.py", "-k", "triton"),
             "weight norm backward launcher: the incoming gradient not made contiguous (read in storage order)"),
    # planted by a second independent audit (the Python layer), each a hole a test now closes
    Mutation("P14", "gannorm_kernels/nn.py",
             "if isinstance(parametrizations[0], AdaptiveWeightNorm):",
             "if isinstance(parametrizations[0], WeightNorm):",
             WN_GLUE, "scale_param_groups: every weight norm's g (not only adaptive ones) gets scale_lr"),
    Mutation("P15", "gannorm_kernels/convert.py",
             "            ours[id(theirs)].train(theirs.training)\n", "",
             GLUE_CONVERT, "convert: the new parametrizations left in training mode in an eval model"),
    Mutation("P16", "gannorm_kernels/convert.py",
             "theirs.n_power_iterations = ours.n_power_iterations", "theirs.n_power_iterations = 1",
             GLUE_CONVERT, "revert: n_power_iterations dropped (becomes 1)"),
    Mutation("P17", "gannorm_kernels/convert.py",
             "module.register_parameter(name, nn.Parameter(value, original.requires_grad))",
             "module.register_parameter(name, nn.Parameter(value))",
             GLUE_CONVERT, "fold: a frozen (requires_grad=False) weight becomes trainable"),
    Mutation("P18", "gannorm_kernels/convert.py",
             "                for p in chain:\n                    p.eval()  # spectral norm: W / (u^T W v) with the "
             "buffers as they are\n", "",
             GLUE_CONVERT, "fold: a model in training mode folds after one more power iteration"),
    Mutation("P19", "gannorm_kernels/nn.py",
             "module._register_load_state_dict_pre_hook(functools.partial(_load_legacy_weight_norm, name))",
             'module._register_load_state_dict_pre_hook(functools.partial(_load_legacy_weight_norm, "weight"))',
             WN_GLUE, "weight_norm: the legacy-checkpoint load hook maps weight_g/v whatever the parameter's name"),
    Mutation("P20", "gannorm_kernels/ops/weight_norm.py",
             "v.new_empty((_channels(v.shape, dim),), dtype=acc_dtype(v.dtype))),",
             "v.new_empty((_channels(v.shape, dim),), dtype=v.dtype)),",
             ("tests/test_weight_norm.py", "-k", "opcheck and cuda-emu"),
             "weight norm's fake kernel: norms in v's dtype, not fp32 (fp16/bf16 under torch.compile)"),
    Mutation("P21", "gannorm_kernels/training.py",
             "            key = (backend, weight.device, weight.dtype, owner.n_power_iterations, owner.eps, training)",
             "            key = (backend, weight.device, weight.dtype, 1, owner.eps, training)",
             GLUE_TRAINING, "grouped spectral norm: every layer iterates once, whatever its n_power_iterations"),
    # planted by a third independent audit (this session's Python and bench code), and the fold
    # bug it found; each a hole a test now closes
    Mutation("P22", "gannorm_kernels/convert.py",
             "                        module.register_parameter(name, nn.Parameter(value, trainable))",
             "                        module.register_buffer(name, value)",
             ("tests/test_convert.py", "-k", "fold"), "fold: a weight-normed layer left as a buffer, not a Parameter"),
    Mutation("P23", "gannorm_kernels/training.py",
             "        sources.append(source.to(device=target.device, dtype=target.dtype))",
             "        sources.append(source.to(device=target.device))",
             ("tests/test_training.py", "-k", "ema_update"), "ema_update: a bf16 G into an fp32 G_ema not cast"),
    Mutation("P24", "gannorm_kernels/convert.py",
             "    theirs.dim, theirs.eps = ours.dim, ours.eps",
             "    theirs.dim, theirs.eps = ours.dim, 1e-12",
             ("tests/test_convert.py", "-k", "settings and reference"), "revert: a spectral norm's eps reset"),
    Mutation("P25", "setup.py",
             'requires = [f"torch=={torch_minor}.*"] if ext_modules and not ASAN else ["torch>=2.11,<2.16"]',
             'requires = [f"torch=={torch_minor}.*"] if build_cuda and not ASAN else ["torch>=2.11,<2.16"]',
             ("tests/test_backends.py", "-k", "pins_torch"), "setup.py: an emulator-only wheel not pinned to its torch"),
    Mutation("P26", "bench/gan_layers.py",
             "    if not error <= bound:  # NaN fails too",
             "    if error > bound:  # NaN fails too",
             ("tests/test_bench_report.py", "-k", "wrong_result"), "bench check before timing: a NaN passes"),
]


def copy_tree(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the working tree."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    if dest.exists():
        shutil.rmtree(dest)
    for name in files:
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def build(tree: Path, log) -> None:
    env = dict(os.environ, GANNORM_NO_CUDA="1", GANNORM_EMU="1")
    run = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, env=env,
                         capture_output=True, text=True)
    log.write(run.stdout + run.stderr)
    if run.returncode:
        raise RuntimeError(f"the scratch build failed (see {log.name})")


def run_tests(tree: Path, tests, log) -> tuple[int, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    start = time.monotonic()
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=tree,
                             env=env, capture_output=True, text=True, timeout=PYTEST_TIMEOUT_S)
        code, output = run.returncode, run.stdout[-3000:] + run.stderr[-2000:]
    except subprocess.TimeoutExpired:
        code, output = -1, "timed out"
    log.write(f"$ pytest {' '.join(tests)} -> {code}\n{output}\n")
    return code, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated mutation ids")
    parser.add_argument("--keep", action="store_true", help="keep the scratch tree")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only.split(",")]
    (ROOT / "build").mkdir(exist_ok=True)
    log_path = ROOT / "build" / "mutation_check.log"
    with open(log_path, "w") as log:
        print(f"mutation-check: {len(chosen)} mutations; scratch tree {SCRATCH}; log {log_path}")
        copy_tree(SCRATCH)
        build(SCRATCH, log)
        # the scratch copy's own package must be imported, and both backends the mutations
        # are tested on must run there (a skipped test would let every bug "survive" unseen)
        probe = ("import os; os.environ['TRITON_INTERPRET'] = '1'; import gannorm_kernels as gk; "
                 "from gannorm_kernels import backends; print(gk.__file__); "
                 "print(backends.unavailable_reason('cuda-emu', 'cpu')); print(backends.unavailable_reason('triton', 'cpu'))")
        found = subprocess.run([sys.executable, "-c", probe], cwd=SCRATCH, env=dict(os.environ, PYTHONPATH=str(SCRATCH)),
                               capture_output=True, text=True).stdout.split("\n")
        if not found[0].startswith(str(SCRATCH)) or found[1:3] != ["None", "None"]:
            raise RuntimeError(f"the scratch tree is not usable: package, cuda-emu, triton: {found[:3]}")
        for tests in tqdm(sorted({m.tests for m in chosen}), desc="baseline (unmutated)", unit="selection"):
            code, _ = run_tests(SCRATCH, tests, log)
            if code != 0:
                raise RuntimeError(f"the unmutated tree fails {' '.join(tests)} (see {log_path})")
        rows = []
        for m in tqdm(chosen, desc="mutations", unit="bug"):
            path = SCRATCH / m.path
            original = path.read_text()
            if original.count(m.find) != 1:
                raise RuntimeError(f"{m.id}: the snippet occurs {original.count(m.find)} times in {m.path}")
            log.write(f"\n==== {m.id}: {m.bug}\n")
            path.write_text(original.replace(m.find, m.replace))
            try:
                native = m.path.startswith("csrc/")
                if native:
                    build(SCRATCH, log)
                code, seconds = run_tests(SCRATCH, m.tests, log)
            finally:
                path.write_text(original)
                if native:
                    build(SCRATCH, log)
            # pytest exits 1 when tests failed; anything else (a crash, a collection error, a
            # timeout) is no evidence that the tests noticed the bug
            rows.append((m, {0: "SURVIVED", 1: "killed"}.get(code, f"ERROR (exit {code})"), seconds))
    killed = sum(r[1] == "killed" for r in rows)
    lines = ["| id | where | planted bug | tests run | result |", "| --- | --- | --- | --- | --- |"]
    for m, result, seconds in rows:
        lines.append(f"| {m.id} | `{m.path}` | {m.bug} | `{' '.join(m.tests)}` | {result} ({seconds:.0f} s) |")
    lines.append(f"\n{killed} of {len(rows)} killed ({100 * killed / len(rows):.0f}%).")
    report = "\n".join(lines)
    (ROOT / "build" / "mutation_check.md").write_text(report + "\n")
    print(report)
    if not args.keep:
        shutil.rmtree(SCRATCH.parent, ignore_errors=True)
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
