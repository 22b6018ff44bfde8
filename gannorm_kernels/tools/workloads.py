"""The workloads this package is built for: weight shapes of three standard GAN discriminators
and the minibatch shapes of its penalties. The benchmarks time them, and the static GPU check
compiles every kernel configuration the launchers choose for them."""

# (model, layer, weight shape)
GAN_LAYERS = [
    # DCGAN, 64x64 images, ndf = 64
    ("dcgan64", "conv1", (64, 3, 4, 4)),
    ("dcgan64", "conv3", (256, 128, 4, 4)),
    ("dcgan64", "conv4", (512, 256, 4, 4)),
    ("dcgan64", "conv5", (1, 512, 4, 4)),
    # SNGAN, CIFAR-10 ResNet discriminator, 128 channels
    ("sngan-cifar", "block.conv", (128, 128, 3, 3)),
    ("sngan-cifar", "linear", (1, 128)),
    # BigGAN, 128x128, ch = 96
    ("biggan128", "block2.conv", (192, 96, 3, 3)),
    ("biggan128", "block4.conv", (768, 768, 3, 3)),
    ("biggan128", "block5.conv", (1536, 1536, 3, 3)),
    ("biggan128", "embed", (1000, 1536)),
]

# Minibatch penalties: (N, D) discriminator features (a DCGAN's 512 x 4 x 4 last block, a
# pooled 512-vector), N in {64, 256, 1024}
MINIBATCH_FEATURES = [(n, d) for n in (64, 256, 1024) for d in (512, 8192)]
# Minibatch discrimination (N, num_kernels, kernel_dim), Salimans et al.'s 100 x 5 and a wider one
MINIBATCH_DISCRIMINATION = [(n, b, c) for n in (64, 256, 1024) for b, c in ((100, 5), (50, 16))]
# Minibatch stddev inputs (N, C, H, W): StyleGAN2's 4 x 4 epilogue at 512 channels
MINIBATCH_STDDEV = [(n, 512, 4, 4) for n in (64, 256, 1024)]


def dcgan64(ndf: int):
    """Radford et al.'s 64x64 discriminator without batch norm (as with spectral norm), without
    norms: (model, its image shape). The training-step benchmark's and launch test's model."""
    from torch import nn
    layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
    for i in range(3):
        layers += [nn.Conv2d(ndf * 2 ** i, ndf * 2 ** (i + 1), 4, 2, 1), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Conv2d(ndf * 8, 1, 4, 1, 0), nn.Flatten()), (3, 64, 64)
