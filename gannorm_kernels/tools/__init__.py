"""Tooling, apart from the runtime (nothing a user's `import gannorm_kernels` loads imports it):
launch counting (`launches`), the cost model (`perf_model`), the static GPU check
(`python -m gannorm_kernels.tools.static_check`) and the GAN layer shapes they share
(`workloads`)."""
