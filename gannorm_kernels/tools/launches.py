"""Counting what would be GPU kernel launches, so tests and benchmarks can hold each op to its
launch budget on machines without a GPU.

``count_launches()`` adds up
- this package's own kernel launches (Triton launches, counted by the launcher, and compiled
  ones, counted by the extension's launch macro, emulated or real), and
- every ATen operator that would be a kernel on a GPU, seen through a TorchDispatchMode:
  composite operators are decomposed first, views and bare allocations count zero, and the
  package's operators are looked into (Python ones and the C++ launchers alike), so a stray
  copy inside one of them counts;
and records the host syncs a GPU would make: scalar reads, device-to-host copies, and the
`.cpu()` / `.tolist()` / `.numpy()` of the CPU tensors that stand in for GPU ones here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

from .. import backends

# Operators that make the host wait for device data (a GPU sync).
_SYNCS = {"aten::_local_scalar_dense", "aten::equal", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
          "aten::unique_consecutive", "aten::_unique2", "aten::repeat_interleave"}
# Allocations launch nothing; everything else that is not a view is a kernel on a GPU.
_NOT_KERNELS = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::detach", "aten::lift_fresh", "aten::alias",
}
_OUR_COMPILED_NAMESPACES = tuple(backends.OPS_NAMESPACE.values())


def package_launch_count() -> int:
    """Kernel launches this package has made so far (Triton + compiled, emulated or real)."""
    total = 0
    triton_mod, _ = backends._imports.get("gannorm_kernels.triton", (None, None))
    if triton_mod is not None:
        total += triton_mod.launch_count()
    for backend, namespace in backends.OPS_NAMESPACE.items():
        module, _ = backends._imports.get(backends._EXTENSION_MODULE[backend], (None, None))
        if module is not None:
            total += getattr(torch.ops, namespace).launch_count()
    return total


def _copies_to_host(name, args, kwargs) -> bool:
    """A device-to-host copy (`.cpu()`, `.to("cpu")`, `cpu_tensor.copy_(cuda_tensor)`)."""
    if name == "aten::_to_copy":
        target = kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"
    if name == "aten::copy_":
        return args[0].device.type == "cpu" and isinstance(args[1], torch.Tensor) and args[1].device.type != "cpu"
    return False


def _on_cuda(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args)


@dataclass
class LaunchCount:
    """Launches seen inside a ``count_launches()`` block."""

    ours: int = 0
    aten_ops: list = field(default_factory=list)
    syncs: list = field(default_factory=list)  # ops that would make the host wait for the GPU

    @property
    def aten(self) -> int:
        return len(self.aten_ops)

    @property
    def total(self) -> int:
        return self.ours + self.aten


class _AtenKernelCounter(TorchDispatchMode):
    def __init__(self, record: LaunchCount):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        opdef = OPDEFS.get(name)
        if opdef is not None:  # one of our Python operators: count what it runs
            with self:
                return opdef._init_fn(*args, **kwargs)
        if name.split("::")[0] in _OUR_COMPILED_NAMESPACES:  # ours counted by the launch macro;
            key = torch._C.DispatchKey.CUDA if _on_cuda(args) else torch._C.DispatchKey.CPU
            with self:  # the ATen ops its C++ launcher calls (copies, fills) counted here
                return func._op_dk(key, *args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:
                return func.decompose(*args, **kwargs)
        if name in _SYNCS or _copies_to_host(name, args, kwargs):
            self.record.syncs.append(str(func.overloadpacket.__name__))
        if not func.is_view and name not in _NOT_KERNELS:
            self.record.aten_ops.append(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)


# Reads of a tensor's data by the host. On a GPU tensor they dispatch a copy or a scalar read,
# which the mode sees; on the CPU tensors that stand in for GPU ones without a GPU they
# dispatch nothing, so they are caught at the Python method.
_HOST_READS = ("cpu", "tolist", "numpy")


@contextlib.contextmanager
def _host_reads_recorded(record: LaunchCount):
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}
    own = {name for name in _HOST_READS if name in vars(torch.Tensor)}  # the rest come from TensorBase

    def recording(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            if self.device.type == "cpu":
                record.syncs.append(name)
            return original(self, *args, **kwargs)
        return read

    for name in _HOST_READS:
        setattr(torch.Tensor, name, recording(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            if name in own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)


@contextlib.contextmanager
def count_launches():
    """Counts kernel launches (ours and ATen's) in the block: ``with count_launches() as n: ...``;
    then ``n.ours``, ``n.aten``, ``n.aten_ops``, ``n.total``, and ``n.syncs``: the operators
    that would make the host wait for the GPU (``.item()``, device-to-host copies, ...)."""
    record = LaunchCount()
    start = package_launch_count()
    try:
        with _AtenKernelCounter(record), _host_reads_recorded(record):
            yield record
    finally:
        record.ours = package_launch_count() - start
