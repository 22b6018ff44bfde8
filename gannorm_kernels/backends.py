"""Backend names, where each one can run (and why not), and the rule that picks one.

| name      | runs on                                        |
| --------- | ---------------------------------------------- |
| reference | any device: plain PyTorch, the ground truth    |
| triton    | CUDA tensors; CPU tensors under TRITON_INTERPRET=1 |
| cuda      | CUDA tensors, with the compiled extension `_C` |
| cuda-emu  | CPU tensors: the CUDA kernels under host emulation (`_emu`) |
| auto      | CUDA tensor: cuda if built for this GPU, else triton, else reference; CPU: reference |

The choice: the `backend=` argument; where that is "auto", the GANNORM_BACKEND environment
variable; else the auto rule. An explicit backend runs or raises; it never falls back.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

BACKENDS = ("reference", "triton", "cuda", "cuda-emu")
CHOICES = BACKENDS + ("auto",)
ENV_VAR = "GANNORM_BACKEND"

# Where the compiled kernels of each C++ backend live, as torch.ops namespaces.
OPS_NAMESPACE = {"cuda": "gannorm_cuda", "cuda-emu": "gannorm_emu"}
_EXTENSION_MODULE = {"cuda": "gannorm_kernels._C", "cuda-emu": "gannorm_kernels._emu"}

_imports: dict[str, tuple[object, str | None]] = {}


def _import(module_name: str):
    """Imports an optional part once: (module, None) or (None, why it cannot be imported)."""
    if module_name not in _imports:
        try:
            _imports[module_name] = (importlib.import_module(module_name), None)
        except Exception as error:  # an ImportError, or an OSError from a broken .so
            _imports[module_name] = (None, f"{type(error).__name__}: {error}")
    return _imports[module_name]


def build_info():
    """What setup.py built (gannorm_kernels/_build_info.py), or None for an unbuilt checkout."""
    module, _ = _import("gannorm_kernels._build_info")
    return module


def extension_error(backend: str) -> str | None:
    """Why the compiled library of `backend` ("cuda" or "cuda-emu") cannot be used, or None.

    An extension that was built but does not load is an error to report, never a reason for
    `auto` to quietly pick something else.
    """
    info = build_info()
    if info is None:
        return ("the package was not built (no gannorm_kernels/_build_info.py): "
                "run `pip install --no-build-isolation .`")
    built, reason = ((info.CUDA_EXTENSION, info.CUDA_EXTENSION_REASON) if backend == "cuda"
                     else (info.EMU_EXTENSION, info.EMU_EXTENSION_REASON))
    if not built:
        return f"the {backend} kernels were not built: {reason}"
    # C++ extensions are tied to the torch they were compiled against (a build that pip made in an
    # isolated environment used whatever torch it downloaded): another minor version may load and
    # then crash, so it is refused by name
    if not _same_minor_version(info.TORCH_VERSION):
        return (f"the {backend} kernels were built but do not load with this torch: built against torch "
                f"{info.TORCH_VERSION}, running {torch.__version__}; rebuild (`pip install --no-build-isolation .`)")
    _, error = _import(_EXTENSION_MODULE[backend])
    if error is None:
        return None
    where = Path(__file__).resolve().parent
    if error.startswith("ModuleNotFoundError") and (where.parent / "setup.py").exists():
        # a source checkout on sys.path (scripts run from the clone) hides the installed package;
        # setup.py's build info is written into the checkout, the compiled modules went elsewhere
        error += (f" (gannorm_kernels was imported from the source checkout {where.parent}, not from the "
                  "installed package: run outside the checkout, or build in place: "
                  "`pip install --no-build-isolation -e .`)")
    return f"the {backend} kernels were built but do not load: {error}"


_SAME_MINOR: dict[str, bool] = {}  # plain dicts, not lru_cache: torch.compile traces these calls


def _same_minor_version(built: str) -> bool:
    """Whether torch `built` (a version string) has the running torch's major.minor version."""
    if built not in _SAME_MINOR:
        _SAME_MINOR[built] = built.split("+")[0].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    return _SAME_MINOR[built]


def arch_mismatch(archs: str, capability: tuple[int, int]) -> str | None:
    """Why CUDA kernels built for `archs` (TORCH_CUDA_ARCH_LIST's form, "8.0;9.0+PTX") cannot run
    on a GPU of compute `capability`, or None when they can: machine code runs on its own major
    version at an equal or higher minor one ("9.0a": on 9.0 only), PTX on any GPU at or above its
    arch (compiled by the driver). An entry of another form is not judged (None)."""
    for entry in re.split(r"[;\s]+", archs.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", entry)
        if match is None:
            return None
        arch = (int(match.group(1)), int(match.group(2)))
        if match.group(3):
            runs = arch == capability
        else:
            runs = (arch[0] == capability[0] and arch[1] <= capability[1]) or (match.group(4) and arch <= capability)
        if runs:
            return None
    return (f"the cuda kernels were built for compute capabilities {archs}, not this GPU's "
            f"{capability[0]}.{capability[1]} (rebuild with TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]})")


@dataclass(frozen=True)
class Backend:
    """A backend as a record (xformers' FwOp style): its name, the device types it runs on, and
    why it cannot run on a given device type here (`not_supported_reasons`, empty when it can)."""

    name: str
    device_types: tuple[str, ...]
    description: str

    def not_supported_reasons(self, device_type: str, index: int | None = None) -> list[str]:
        """`index`: the CUDA device (default: the current one), whose compute capability the
        cuda kernels must have been built for."""
        if device_type == "cuda" and not torch.cuda.is_available():
            return ["no CUDA device is available"]
        if self.name == "reference":
            return []
        if self.name == "triton":
            module, error = _import("gannorm_kernels.triton")
            if error is not None:
                return [f"triton cannot be imported ({error})"]
            if device_type == "cpu" and not module.INTERPRETED:
                return ["triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                        "before triton is first imported"]
            if device_type not in self.device_types:
                return [f"triton does not run {device_type} tensors"]
            return []
        if device_type not in self.device_types:
            runs, other, other_runs = ("CUDA", "cuda-emu", "CPU") if self.name == "cuda" else ("CPU", "cuda", "CUDA")
            return [f"it runs {runs} tensors only, not {device_type} ones (use {other!r} for {other_runs} tensors)"]
        error = extension_error(self.name)
        if error is not None:
            return [error]
        if self.name == "cuda":
            mismatch = _cuda_arch_verdict(index)
            return [] if mismatch is None else [mismatch]
        return []


# (built archs, CUDA device index) -> arch_mismatch's verdict: asked on every op call on a CUDA
# tensor, so the device's capability is queried once per device
_CUDA_ARCH_VERDICTS: dict[tuple[str, int], str | None] = {}


def _cuda_arch_verdict(index: int | None) -> str | None:
    index = torch.cuda.current_device() if index is None else index
    key = (build_info().CUDA_ARCHS, index)
    if key not in _CUDA_ARCH_VERDICTS:
        _CUDA_ARCH_VERDICTS[key] = arch_mismatch(key[0], tuple(torch.cuda.get_device_capability(index)))
    return _CUDA_ARCH_VERDICTS[key]


RECORDS = {
    "reference": Backend("reference", ("cpu", "cuda", "meta"), "plain PyTorch, the ground truth"),
    "triton": Backend("triton", ("cuda", "cpu"), "@triton.jit kernels (CPU tensors under the interpreter)"),
    "cuda": Backend("cuda", ("cuda",), "the compiled CUDA extension gannorm_kernels._C"),
    "cuda-emu": Backend("cuda-emu", ("cpu",), "the CUDA kernels compiled for the host, under emulation"),
}
# auto's candidates per device type, in order of preference
AUTO_CANDIDATES = {"cuda": ("cuda", "triton", "reference")}


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """Why `backend` cannot run on tensors of `device_type` here, or None when it can."""
    check_name(backend)
    if backend == "auto":
        return "no CUDA device is available" if device_type == "cuda" and not torch.cuda.is_available() else None
    reasons = RECORDS[backend].not_supported_reasons(device_type)
    return "; ".join(reasons) if reasons else None


def check_name(backend) -> None:
    if backend not in CHOICES:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(map(repr, CHOICES))}")


def requested(backend: str) -> str:
    """The backend asked for: the argument, or GANNORM_BACKEND where the argument is "auto"."""
    check_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto")
        if env not in CHOICES:
            raise ValueError(f"{ENV_VAR}={env!r} is not a backend: expected one of {', '.join(CHOICES)}")
        return env
    return backend


def auto(device_type: str, index: int | None = None) -> str:
    """The auto rule: the first of AUTO_CANDIDATES that can run (anything but CUDA tensors: the
    reference). A compiled extension that was built but does not load is an error, never a
    reason to pick the next candidate; one built for other GPUs than this one is such a reason.
    Raises with every candidate's reason if none can run."""
    candidates = AUTO_CANDIDATES.get(device_type, ("reference",))
    reasons = {}
    for name in candidates:
        found = RECORDS[name].not_supported_reasons(device_type, index)
        if not found:
            return name
        if name in OPS_NAMESPACE and "built but do not load" in " ".join(found):
            raise RuntimeError(f"backend 'auto' would use {name!r} on this {device_type} tensor, but {found[0]}")
        reasons[name] = "; ".join(found)
    listed = "; ".join(f"{name!r}: {reason}" for name, reason in reasons.items())
    raise RuntimeError(f"backend 'auto' has no backend that runs {device_type} tensors here ({listed})")


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend that runs an op on tensors of `device`; raises if it cannot run."""
    name = requested(backend)
    if name == "auto":
        return auto(device.type, device.index)
    reason = "; ".join(RECORDS[name].not_supported_reasons(device.type, device.index)) or None
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run on this {device.type} tensor: {reason}")
    return name


def check_installed(backend: str) -> None:
    """For registration time: the name is known and its kernels exist in this install (the
    device is checked when the op runs, since modules are often moved after being built)."""
    name = requested(backend)
    if name == "triton":
        _, error = _import("gannorm_kernels.triton")
        if error is not None:
            raise RuntimeError(f"backend 'triton' is not available: triton cannot be imported ({error})")
    elif name in OPS_NAMESPACE:
        error = extension_error(name)
        if error is not None:
            raise RuntimeError(f"backend {name!r} is not available: {error}")


def loaded_ops_namespaces() -> list[str]:
    """The torch.ops namespaces of the compiled backends that load here (importing them)."""
    return [ns for backend, ns in OPS_NAMESPACE.items() if extension_error(backend) is None]


def compiled_ops(backend: str):
    """The torch.ops namespace of a compiled backend ("cuda" or "cuda-emu"), loading its library:
    one operator per op spec's forward and backward (registered by csrc/<op>.cu)."""
    _import(_EXTENSION_MODULE[backend])
    return getattr(torch.ops, OPS_NAMESPACE[backend])
