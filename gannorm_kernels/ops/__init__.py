"""torch.library operators, one file per kernel family, all in the `gannorm_kernels` namespace.

Each forward operator takes the backend name as its last argument and runs that backend's
launcher; a fake kernel gives torch.compile its output shapes, and its Autograd kernel is the
family's torch.autograd.Function, whose backward calls the matching backward operator. The
low-level Library API is used (not `torch.library.custom_op`) because spectral norm updates
its power-iteration buffers in place and custom_op refuses autograd for mutating operators.

Eager calls go through the same autograd.Functions but call the launchers directly: a Python
operator costs tens of microseconds of host time per call, more than the kernels of a
typical GAN layer take on a GPU. torch.compile traces the operators.
"""

import torch

from .. import backends

NAMESPACE = "gannorm_kernels"
LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def define(schema: str, kernel, fake, autograd):
    """Defines `NAMESPACE::schema` with its kernel (any device), fake kernel and Autograd
    kernel; returns the OpOverload. The compiled backends' operators of the same name (same
    arguments but the backend) share the fake kernel."""
    name = schema.split("(", 1)[0]
    LIBRARY.define(schema)
    LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    LIBRARY.impl(name, autograd, "Autograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIBRARY)
    for namespace in backends.loaded_ops_namespaces():
        torch.library.register_fake(f"{namespace}::{name}", fake)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def below_autograd(op, *args):
    """Runs `op` past its Autograd kernel (from inside the autograd.Function that is it)."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def no_double_backward(name: str, message: str):
    """The Autograd kernel of a backward operator: first-order use passes through; asking for
    its gradient (create_graph=True) raises `message`."""

    def autograd(*args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            raise NotImplementedError(message)
        return below_autograd(getattr(getattr(torch.ops, NAMESPACE), name).default, *args)

    return autograd
