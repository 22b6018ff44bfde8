"""The layers the benchmarks run on: weight shapes of three standard GAN discriminators, and
the device. On a CPU-only machine only a small smoke set runs (CI: --benchmark-disable),
since CPU timings of emulated or interpreted kernels say nothing about GPU speed."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

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
SMOKE_LAYERS = [GAN_LAYERS[0], GAN_LAYERS[5]]
LAYERS = GAN_LAYERS if DEVICE == "cuda" else SMOKE_LAYERS
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


def layer_id(layer):
    return f"{layer[0]}-{layer[1]}"


def element_bytes(shape, dtype):
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_name():
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
