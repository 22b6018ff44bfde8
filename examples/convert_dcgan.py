"""Adopting gannorm_kernels in an existing model: a DCGAN discriminator (Radford et al. 2016,
64x64 images) written with torch's own spectral norm, converted in place, trained a few steps,
and its checkpoint moved back and forth between ours and torch's.

Usage: python examples/convert_dcgan.py [--steps N] [--backend NAME]
"""

import argparse
import copy
import io
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import gannorm_kernels as gk  # noqa: E402
from gannorm_kernels.tools.launches import count_launches  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.parametrizations import spectral_norm  # noqa: E402


def dcgan_discriminator(ndf: int = 64) -> nn.Module:
    """DCGAN's discriminator with spectral norm on every conv (BatchNorm dropped, as SNGAN does)."""
    def block(cin, cout):
        return [spectral_norm(nn.Conv2d(cin, cout, 4, 2, 1, bias=False)), nn.LeakyReLU(0.2, inplace=True)]

    return nn.Sequential(*block(3, ndf), *block(ndf, ndf * 2), *block(ndf * 2, ndf * 4), *block(ndf * 4, ndf * 8),
                         spectral_norm(nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False)), nn.Flatten())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--ndf", type=int, default=16, help="width (DCGAN uses 64; 16 keeps the CPU run short)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    theirs = dcgan_discriminator(args.ndf).to(device)
    ours = gk.convert(copy.deepcopy(theirs), backend=args.backend)
    norms = [m for m in ours.modules() if isinstance(m, gk.SpectralNorm)]
    print(f"converted {len(norms)} spectral norms; state_dict keys unchanged: "
          f"{list(ours.state_dict()) == list(theirs.state_dict())}")

    real = torch.randn(8, 3, 64, 64, device=device)
    with count_launches() as ours_count:
        ours(real).mean().backward()
    with count_launches() as theirs_count:
        theirs(real).mean().backward()
    print(f"one forward+backward: our norm kernels {ours_count.ours}, ATen kernels {ours_count.aten} "
          f"(torch's own model: {theirs_count.total} ATen kernels)")

    optimizer = torch.optim.Adam(ours.parameters(), lr=2e-4, betas=(0.5, 0.999))
    for step in range(args.steps):
        fake = torch.randn(8, 3, 64, 64, device=device)
        loss = nn.functional.softplus(-ours(real)).mean() + nn.functional.softplus(ours(fake)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step + 1}: loss {loss.item():.4f}, sigmas "
              + ", ".join(f"{float(s):.3f}" for s in gk.sigmas(ours).values()))

    # Our checkpoint into a torch-only model, and back: strict loads, equal eval outputs.
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    torch_model = dcgan_discriminator(args.ndf).to(device)
    torch_model.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    ours.eval()
    torch_model.eval()
    probe = torch.randn(4, 3, 64, 64, device=device)
    difference = (ours(probe) - torch_model(probe)).abs().max().item()
    print(f"our checkpoint in torch's model: max |output difference| {difference:.2e}")
    gk.revert(ours)
    print(f"reverted to torch's parametrizations: {type(ours[0].parametrizations.weight[0]).__name__}, "
          f"outputs equal to torch's model: {torch.allclose(ours(probe), torch_model(probe), rtol=1e-5, atol=1e-6)}")


if __name__ == "__main__":
    main()
