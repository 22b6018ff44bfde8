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


class KernelPair:
    """A forward operator and its backward, for ops with one differentiable input (the first)
    and one differentiable output (the first); further outputs are saved for backward.

    Convention (the compiled and Triton launchers follow it too): the backward takes
    `(grad, input, *further forward outputs, *non-tensor arguments)`. Calling the pair runs
    the forward with autograd: the launchers directly in eager mode, the operators when
    torch.compile traces.
    """

    def __init__(self, forward_schema: str, backward_schema: str, forward_fake, backward_fake, no_double: str):
        self.forward_name = forward_schema.split("(", 1)[0]
        self.backward_name = backward_schema.split("(", 1)[0]
        self.forward_op = define(forward_schema, self._forward_kernel, forward_fake,
                                 lambda *args: _KernelPairFunction.apply(self, True, *args))
        self.backward_op = define(backward_schema, self._backward_kernel, backward_fake,
                                  no_double_backward(self.backward_name, no_double))
        self.no_double = no_double

    def _forward_kernel(self, *args):
        return getattr(backends.kernels(args[-1]), self.forward_name)(*args[:-1])

    def _backward_kernel(self, *args):
        return getattr(backends.kernels(args[-1]), self.backward_name)(*args[:-1])

    def __call__(self, *args):
        """args: the forward's, backend last; returns its outputs as a tuple."""
        if torch.compiler.is_compiling():
            outputs = self.forward_op(*args)
        else:
            outputs = _KernelPairFunction.apply(self, False, *args)
        return outputs if isinstance(outputs, tuple) else (outputs,)


class _KernelPairFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pair, traced, x, *args):
        outputs = below_autograd(pair.forward_op, x, *args) if traced else pair._forward_kernel(x, *args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        ctx.save_for_backward(x, *outputs[1:])
        ctx.pair, ctx.traced, ctx.args = pair, traced, args
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.set_materialize_grads(False)
        return outputs if len(outputs) > 1 else outputs[0]  # as the operator's schema returns

    @staticmethod
    def backward(ctx, grad, *_):
        nones = (None,) * (len(ctx.args) + 2)
        if grad is None:
            return (None,) + nones
        if not ctx.traced and torch.is_grad_enabled():  # create_graph=True: not differentiable
            raise NotImplementedError(ctx.pair.no_double)
        scalars = tuple(a for a in ctx.args if not isinstance(a, torch.Tensor))
        run = ctx.pair.backward_op if ctx.traced else ctx.pair._backward_kernel
        return (None, None, run(grad, *ctx.saved_tensors, *scalars)) + nones[2:]
