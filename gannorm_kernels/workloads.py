"""The layers this package is built for: weight shapes of three standard GAN discriminators.
The benchmarks time them, and the static GPU check compiles every kernel configuration the
launchers choose for them."""

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
