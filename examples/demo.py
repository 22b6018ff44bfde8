"""`make demo`: a small GAN whose discriminator uses gannorm_kernels' weight norm, then its
spectral norm, trained a few steps with every backend that runs here, and what each did.

The data is the 2-D ring of 8 Gaussians (radius 1, std 0.01). Each backend trains the same
generator/discriminator pair from the same seed; the table shows the losses it reached, how
far its trajectory strayed from the reference backend's (rounding only, if the kernels are
right), the kernel launches of one discriminator forward+backward, and the wall time; then
the discriminator's spectral norms as `sigmas()` reports them.
Without a GPU, Triton runs under its interpreter and the CUDA kernels under host emulation,
so times here say nothing about GPU speed.

Usage: python examples/demo.py [--steps N]
"""

import argparse
import math
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import gannorm_kernels as gk  # noqa: E402
from gannorm_kernels import backends  # noqa: E402
from gannorm_kernels.launches import count_launches  # noqa: E402
from torch import nn  # noqa: E402


def ring_of_gaussians(n, generator, device):
    angles = 2 * math.pi * torch.randint(0, 8, (n,), generator=generator) / 8
    means = torch.stack([angles.cos(), angles.sin()], dim=1)
    return (means + 0.01 * torch.randn(n, 2, generator=generator)).to(device)


def make_models(norm, backend, device):
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    discriminator = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.LeakyReLU(0.2),
                                  nn.Linear(32, 1))
    for layer, dim in ((discriminator[0], 0), (discriminator[2], 1), (discriminator[4], 0)):
        if norm == "weight norm":
            gk.weight_norm(layer, dim=dim, backend=backend)
        else:
            gk.spectral_norm(layer, backend=backend)
    return generator.to(device), discriminator.to(device)


def progress(label, done, total, width=30):
    """A progress bar on a terminal; nothing in a log."""
    if not sys.stderr.isatty():
        return
    filled = width * done // total
    end = "\n" if done == total else ""
    print(f"\r  {label:<10} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr,
          flush=True)


def train(norm, backend, device, steps, batch=128):
    generator, discriminator = make_models(norm, backend, device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    bce = nn.functional.binary_cross_entropy_with_logits
    data = torch.Generator().manual_seed(1)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        real = ring_of_gaussians(batch, data, device)
        z = torch.randn(batch, 2, generator=data).to(device)
        fake = generator(z)
        d_real, d_fake = discriminator(real), discriminator(fake.detach())
        loss_d = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        d_gen = discriminator(fake)
        loss_g = bce(d_gen, torch.ones_like(d_gen))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        losses.append((loss_d.item(), loss_g.item()))
        progress(backend, step + 1, steps)
    elapsed = time.perf_counter() - start
    # one discriminator forward+backward, counted
    x = ring_of_gaussians(batch, data, device)
    with count_launches() as launches:
        discriminator(x).sum().backward()
    return losses, launches, elapsed, discriminator


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = gk.info()
    print(f"gannorm_kernels {report['gannorm_kernels']}, torch {report['torch']}, triton {report['triton']}; "
          f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (no GPU)'}")
    print(f"CUDA extension built: {report['cuda_extension_built']} {report['cuda_extension_archs']}\n")

    runnable = [b for b in backends.BACKENDS if backends.unavailable_reason(b, device) is None]
    for name in backends.BACKENDS:
        if name not in runnable:
            print(f"  {name:<10} skipped: {backends.unavailable_reason(name, device)}")
    print("\nGAN on the 8-Gaussian ring, discriminator with 3 normalised layers, "
          f"{args.steps} steps per run:\n")
    print("| norm | backend | final D loss | final G loss | max loss deviation from reference | "
          "our kernels per D fwd+bwd | other ATen kernels | time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    last_discriminator = None
    for norm in ("weight norm", "spectral norm"):
        results = {name: train(norm, name, device, args.steps) for name in runnable}
        reference_losses = results["reference"][0]
        for name, (losses, launches, elapsed, discriminator) in results.items():
            deviation = max(abs(a - b) for ours, ref in zip(losses, reference_losses) for a, b in zip(ours, ref))
            print(f"| {norm} | {name} | {losses[-1][0]:.4f} | {losses[-1][1]:.4f} | {deviation:.2e} | "
                  f"{launches.ours} | {launches.aten} | {elapsed:.1f} s |")
            last_discriminator = discriminator
    print("\nOur kernel backends launch, per normalised layer: weight norm 1 forward + 1 backward; spectral "
          "norm 3 + 2 (torch's own: 13 + 9 ops). The reference backend runs the same math as plain "
          "PyTorch ops (the 'other ATen' column).")
    found = gk.sigmas(last_discriminator)
    print("\nsigmas(discriminator) after training: " + ", ".join(f"{k} {float(v):.4f}" for k, v in found.items()))


if __name__ == "__main__":
    main()
