"""What this install can do: versions, the compiled extension and its archs, and every
backend's availability with the reason when it cannot run. `python -m gannorm_kernels` prints it."""

from __future__ import annotations

import json
import platform

import torch

from . import __version__, backends


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def info() -> dict:
    """A dict describing this install (see the keys below); cheap, launches nothing.

    Keys: versions (``gannorm_kernels``, ``torch``, ``torch_cuda``, ``triton``, ``python``),
    ``cuda_available`` and ``gpus``; ``cuda_extension_built`` (the CUDA extension was built
    and loads), ``cuda_extension_archs``, ``nvcc``, ``cuda_extension_error`` (why it is not
    usable, else None); ``emu_extension_built``; ``triton_interpreter``; ``backends``:
    ``{name: {"cpu": reason or None, "cuda": reason or None}}`` (None: it runs there);
    ``auto``: the backend "auto" picks per device type (or the error it raises).
    """
    build = backends.build_info()
    cuda_error = backends.extension_error("cuda")
    triton_module, _ = backends._import("gannorm_kernels.triton")
    result = {
        "gannorm_kernels": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cuda_extension_built": cuda_error is None,
        "cuda_extension_archs": build.CUDA_ARCHS.split(";") if build is not None and build.CUDA_ARCHS else [],
        "nvcc": build.NVCC_VERSION if build is not None else None,
        "cuda_extension_error": cuda_error,
        "emu_extension_built": backends.extension_error("cuda-emu") is None,
        "triton_interpreter": bool(triton_module is not None and triton_module.INTERPRETED),
        "backends": {
            name: {device: backends.unavailable_reason(name, device) for device in ("cpu", "cuda")}
            for name in backends.BACKENDS
        },
    }
    auto = {}
    for device in ("cpu", "cuda"):
        try:
            auto[device] = backends.auto(device)
        except RuntimeError as error:
            auto[device] = f"none: {error}"
    result["auto"] = auto
    return result


def main() -> None:
    """Prints info(), one backend and device per line."""
    report = info()
    for key, value in report.items():
        if key == "backends":
            print("backends:")
            for name, where in value.items():
                for device, reason in where.items():
                    print(f"  {name:<10} {device:<5} {'yes' if reason is None else 'no: ' + reason}")
        else:
            print(f"{key}: {json.dumps(value)}")


if __name__ == "__main__":  # python -m gannorm_kernels.info, as python -m gannorm_kernels
    main()
