"""`make demo`: do this package's tools stop a GAN from collapsing?

Small GANs train on the standard mode-collapse benchmarks, the 2-D ring of 8 Gaussians (radius
1, std 0.01, means at angles 2 pi k / 8) and the 2-D grid of 25 Gaussians (means in
{-4, -2, 0, 2, 4}^2, std 0.05), in four variants that differ only in the discriminator:

  plain                    no normalisation
  spectral norm            gannorm_kernels.spectral_norm on every layer
  adaptive weight norm     gannorm_kernels.adaptive_weight_norm (magnitudes start at 1 and
                           train 10x faster, through scale_param_groups)
  spectral norm + penalty  spectral norm, and the generator also pays
                           pairwise_similarity_penalty on the discriminator's features of its
                           samples (cosine), which punishes a batch of look-alikes

Each run is scored as in the PacGAN and VEEGAN tables, from 2,500 samples: modes captured (a
mode counts when it is the nearest mode of at least one high-quality sample), the percentage
of high-quality samples (within 3 std of a mode), and the reverse KL between the captured-mode
histogram and the uniform one. In every variant the discriminator sees its input scaled by
0.1 / (mode std), 10 for the ring and 2 for the grid: a 1-Lipschitz (spectrally normalised)
discriminator cannot otherwise tell apart points 0.03 apart, the size of a ring mode.

Writes demo_out/results.md (the table; mean and standard error over seeds with --seeds N),
demo_out/samples.png (every variant) and demo_out/samples_<variant>.png (first seed). Then each
kernel backend that runs here repeats a few steps of the last variant, to show that they train
alike and what they launch.

Usage: python examples/demo.py [--seeds N] [--steps N] [--workers N] [--check-steps N] [--out DIR]
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import gannorm_kernels as gk  # noqa: E402
from gannorm_kernels import backends  # noqa: E402
from gannorm_kernels.tools.launches import count_launches  # noqa: E402
from torch import nn  # noqa: E402

VARIANTS = ("plain", "spectral norm", "adaptive weight norm", "spectral norm + penalty")
EVAL_SAMPLES = 2500
PENALTY_WEIGHT = 1.0


def ring_means():
    angles = 2 * math.pi * torch.arange(8) / 8
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def grid_means():
    return torch.tensor([[x, y] for x in (-4, -2, 0, 2, 4) for y in (-4, -2, 0, 2, 4)], dtype=torch.float32)


DATASETS = {"ring of 8": (ring_means(), 0.01), "grid of 25": (grid_means(), 0.05)}


def sample_data(dataset, n, generator):
    means, std = DATASETS[dataset]
    which = torch.randint(0, len(means), (n,), generator=generator)
    return means[which] + std * torch.randn(n, 2, generator=generator)


def score(samples, dataset):
    """(modes captured, % high-quality samples, reverse KL to uniform over modes)."""
    means, std = DATASETS[dataset]
    distance, nearest = torch.cdist(samples, means).min(dim=1)
    high_quality = distance <= 3 * std
    counts = torch.bincount(nearest[high_quality], minlength=len(means)).double()
    if counts.sum() == 0:
        return 0, 0.0, float("nan")
    p = counts / counts.sum()
    kl = float((p[p > 0] * (p[p > 0] * len(means)).log()).sum())
    return int((counts > 0).sum()), 100.0 * float(high_quality.float().mean()), kl


class ScaleInput(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


def mlp(width, out, activation):
    return [nn.Linear(2, width), activation(), nn.Linear(width, width), activation(), nn.Linear(width, width),
            activation(), nn.Linear(width, out)]


def make_models(dataset, variant, backend, width=64):
    generator = nn.Sequential(*mlp(width, 2, nn.ReLU))
    input_scale = 0.1 / DATASETS[dataset][1]
    discriminator = nn.Sequential(ScaleInput(input_scale), *mlp(width, 1, lambda: nn.LeakyReLU(0.2)))
    for layer in discriminator:
        if isinstance(layer, nn.Linear) and variant.startswith("spectral norm"):
            gk.spectral_norm(layer, backend=backend)
        elif isinstance(layer, nn.Linear) and variant == "adaptive weight norm":
            gk.adaptive_weight_norm(layer, init_scale=1.0, backend=backend)
    return generator, discriminator


def train(dataset, variant, seed, steps, backend="auto", device="cpu", batch=128, lr=1e-3, progress=None):
    """Trains one GAN; returns its evaluation samples (and the discriminator)."""
    torch.manual_seed(seed)
    data = torch.Generator().manual_seed(10_000 + seed)
    generator, discriminator = make_models(dataset, variant, backend)
    generator, discriminator = generator.to(device), discriminator.to(device)
    d_params = gk.scale_param_groups(discriminator, 10 * lr) if variant == "adaptive weight norm" else \
        discriminator.parameters()
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d_params, lr=lr, betas=(0.5, 0.999))
    features = discriminator[:-1]  # the last hidden layer's activations
    bce = nn.functional.binary_cross_entropy_with_logits
    for step in range(steps):
        real = sample_data(dataset, batch, data).to(device)
        fake = generator(torch.randn(batch, 2, generator=data).to(device))
        d_real, d_fake = discriminator(real), discriminator(fake.detach())
        loss_d = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        d_gen = discriminator(fake)
        loss_g = bce(d_gen, torch.ones_like(d_gen))
        if variant == "spectral norm + penalty":
            loss_g = loss_g + PENALTY_WEIGHT * gk.pairwise_similarity_penalty(features(fake), "cosine", backend=backend)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        if progress is not None and (step + 1) % 100 == 0:
            progress(100)
    with torch.no_grad():
        samples = generator(torch.randn(EVAL_SAMPLES, 2, generator=data).to(device)).cpu()
    return samples, discriminator


def _run_job(job):
    dataset, variant, seed, steps, queue = job
    torch.set_num_threads(1)  # the workers share the cores
    samples, _ = train(dataset, variant, seed, steps, progress=queue.put)
    return dataset, variant, seed, samples


def run_all(seeds, steps, workers):
    """{(dataset, variant): [samples per seed]}, the runs spread over worker processes."""
    import multiprocessing as mp

    from tqdm import tqdm

    jobs = [(d, v, s) for s in range(seeds) for d in DATASETS for v in VARIANTS]
    manager = mp.Manager()
    queue = manager.Queue()
    results = {}
    bar = tqdm(total=len(jobs) * steps, desc=f"training {len(jobs)} GANs", unit="step", unit_scale=True,
               file=sys.stderr, mininterval=1.0)
    with mp.get_context("spawn").Pool(workers) as pool:
        pending = pool.map_async(_run_job, [(d, v, s, steps, queue) for d, v, s in jobs])
        while not pending.ready():
            pending.wait(0.5)
            while not queue.empty():
                bar.update(queue.get())
        for dataset, variant, seed, samples in pending.get():
            results.setdefault((dataset, variant), []).append(samples)
    bar.close()
    return results


def table(results, seeds):
    def cell(values, digits):
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return "n/a"
        mean = sum(values) / len(values)
        if len(values) < 2:
            return f"{mean:.{digits}f}"
        se = (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5
        return f"{mean:.{digits}f} ± {se:.{digits}f}"

    header = ("mean ± standard error over " if seeds > 1 else "") + f"{seeds} seed{'s' if seeds > 1 else ''}"
    lines = [f"| dataset | variant | modes captured | high-quality samples (%) | reverse KL | ({header}) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (dataset, variant), runs in results.items():
        scores = [score(samples, dataset) for samples in runs]
        modes = len(DATASETS[dataset][0])
        lines.append(f"| {dataset} | {variant} | {cell([s[0] for s in scores], 1)} / {modes} | "
                     f"{cell([s[1] for s in scores], 1)} | {cell([s[2] for s in scores], 3)} | |")
    return "\n".join(lines) + "\n"


def plot(results, path, variants=VARIANTS):
    """First seed's samples, one column per variant, one row per dataset."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(DATASETS), len(variants), figsize=(4 * len(variants), 4 * len(DATASETS)),
                             squeeze=False)
    for row, dataset in enumerate(DATASETS):
        means, _ = DATASETS[dataset]
        for column, variant in enumerate(variants):
            ax = axes[row][column]
            samples = results[(dataset, variant)][0]
            ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.4, color="tab:blue")
            ax.scatter(means[:, 0], means[:, 1], s=30, marker="x", color="tab:red")
            limit = 1.6 if dataset.startswith("ring") else 6.0
            ax.set_xlim(-limit, limit)
            ax.set_ylim(-limit, limit)
            ax.set_aspect("equal")
            modes, hq, kl = score(samples, dataset)
            ax.set_title(f"{dataset}, {variant}\n{modes} modes, {hq:.0f}% HQ, KL {kl:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def backend_check(steps):
    """The last variant for a few steps with each backend that runs here: they must train alike."""
    device_of = {"cuda": "cuda", "triton": "cuda" if torch.cuda.is_available() else "cpu"}
    lines = ["| backend | device | mean abs of the samples | max deviation from reference | our launches per "
             "discriminator forward+backward | other ATen kernels |", "| --- | --- | --- | --- | --- | --- |"]
    reference_samples = None
    for name in backends.BACKENDS:
        device = device_of.get(name, "cpu")
        reason = backends.unavailable_reason(name, device)
        if reason is not None:
            lines.append(f"| {name} | {device} | skipped: {reason} | | | |")
            continue
        samples, discriminator = train("ring of 8", "spectral norm + penalty", 0, steps, backend=name, device=device)
        if reference_samples is None:
            reference_samples = samples
        x = sample_data("ring of 8", 128, torch.Generator().manual_seed(1)).to(device)
        with count_launches() as launches:
            discriminator(x).sum().backward()
        deviation = (samples - reference_samples).abs().max().item()
        lines.append(f"| {name} | {device} | {samples.abs().mean():.5f} | {deviation:.2e} | {launches.ours} | "
                     f"{launches.aten} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8000, help="training steps per GAN")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--check-steps", type=int, default=10, help="steps of the per-backend check")
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = gk.info()
    print(f"gannorm_kernels {report['gannorm_kernels']}, torch {report['torch']}; training on the CPU "
          f"({args.workers} worker{'s' if args.workers > 1 else ''}); backend auto = {report['auto']['cpu']}")
    start = time.time()
    results = run_all(args.seeds, args.steps, args.workers)
    results_table = table(results, args.seeds)
    plot(results, args.out / "samples.png")
    for variant in VARIANTS:
        plot(results, args.out / f"samples_{variant.replace(' + ', '_').replace(' ', '_')}.png", [variant])
    print(f"\n{results_table}")
    print(f"Samples: {args.out}/samples*.png. Trained in {time.time() - start:.0f} s.\n")
    check = backend_check(args.check_steps)
    print(f"Each backend, {args.check_steps} steps of 'spectral norm + penalty' on the ring (the kernel "
          "backends run emulated or interpreted without a GPU: slow here, equal results):\n")
    print(check)
    (args.out / "results.md").write_text(
        f"# gannorm_kernels demo\n\n{args.steps} steps per GAN, {EVAL_SAMPLES} samples scored.\n\n{results_table}\n"
        f"![samples](samples.png)\n\n## Backends\n\n{check}")
    print(f"Wrote {args.out / 'results.md'}.")


if __name__ == "__main__":
    main()
