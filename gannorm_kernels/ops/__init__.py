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


_COMPILED_DOUBLE_BACKWARD = ("{name}: double backward (create_graph=True) through torch.compile'd code is not "
                             "supported (torch.compile itself does not support it); run that step eagerly, where "
                             "every op supports it")


def no_double_backward(name: str, message: str = _COMPILED_DOUBLE_BACKWARD):
    """The Autograd kernel of a backward operator, which only torch.compile'd code reaches:
    first-order use passes through; asking for its gradient (create_graph=True) raises."""
    message = message.format(name=name)

    def autograd(*args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            raise NotImplementedError(message)
        return below_autograd(getattr(getattr(torch.ops, NAMESPACE), name).default, *args)

    return autograd


def differentiable_grads(kernel_grads, reference, grad_outputs, inputs):
    """First-order gradients that can be differentiated again (create_graph=True, as R1/R2 and
    WGAN-GP do): their values come from the kernel (`kernel_grads()`, returning one gradient
    per input), and their own gradient is the second derivative of `reference`, the op's
    plain-PyTorch formula (`reference(*inputs)` returns the differentiable outputs that
    `grad_outputs` belong to). StyleGAN2-ADA's bias_act splits its double backward the same
    way: a kernel gradient whose backward is written in torch ops.

    Second order only: the returned gradients' backward is not itself differentiable.
    """
    return _KernelGrads.apply(kernel_grads, reference, len(grad_outputs), *grad_outputs, *inputs)


class _KernelGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel_grads, reference, n_grad_outputs, *tensors):
        ctx.reference, ctx.n_grad_outputs = reference, n_grad_outputs
        ctx.save_for_backward(*tensors)
        ctx.set_materialize_grads(False)
        return tuple(kernel_grads())

    @staticmethod
    def backward(ctx, *grad_grads):
        if torch.is_grad_enabled():  # asked for a differentiable second derivative
            raise NotImplementedError("gannorm_kernels ops support gradients of first and second order; a third "
                                      "order (create_graph=True through a second derivative) is not supported")
        tensors = ctx.saved_tensors
        n = ctx.n_grad_outputs
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(needs) for t, needs in zip(tensors, ctx.needs_input_grad[3:])]
            inputs = leaves[n:]
            outputs = ctx.reference(*inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            wrt = [x for x in inputs if x.requires_grad]
            first = dict(zip(map(id, wrt), torch.autograd.grad(outputs, wrt, leaves[:n], create_graph=True,
                                                               allow_unused=True)))
            pairs = [(first.get(id(x)), gg) for x, gg in zip(inputs, grad_grads)]
            pairs = [(f, gg) for f, gg in pairs if f is not None and gg is not None and f.requires_grad]
            targets = [t for t in leaves if t.requires_grad]
            second = torch.autograd.grad([f for f, _ in pairs], targets, [gg for _, gg in pairs],
                                         allow_unused=True) if pairs and targets else [None] * len(targets)
        by_leaf = dict(zip(map(id, targets), second))
        return (None, None, None) + tuple(by_leaf.get(id(t)) for t in leaves)


class KernelPair:
    """A forward operator and its backward, for ops with one differentiable input (the first)
    and one differentiable output (the first); further outputs are saved for backward.

    Convention (the compiled and Triton launchers follow it too): the backward takes
    `(grad, input, *further forward outputs, *non-tensor arguments)`. Calling the pair runs
    the forward with autograd: the launchers directly in eager mode, the operators when
    torch.compile traces.
    """

    def __init__(self, forward_schema: str, backward_schema: str, forward_fake, backward_fake, reference):
        """`reference(input, *non-tensor arguments but the backend)`: the first output in plain
        PyTorch, which the double backward differentiates."""
        self.forward_name = forward_schema.split("(", 1)[0]
        self.backward_name = backward_schema.split("(", 1)[0]
        self.forward_op = define(forward_schema, self._forward_kernel, forward_fake,
                                 lambda *args: _KernelPairFunction.apply(self, True, *args))
        self.backward_op = define(backward_schema, self._backward_kernel, backward_fake,
                                  no_double_backward(self.backward_name))
        self.reference = reference

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
        scalars = tuple(a for a in ctx.args if not isinstance(a, torch.Tensor))
        saved = ctx.saved_tensors
        if ctx.traced:
            return (None, None, ctx.pair.backward_op(grad, *saved, *scalars)) + nones[2:]
        if torch.is_grad_enabled():  # create_graph=True
            grad_x, = differentiable_grads(lambda: (ctx.pair._backward_kernel(grad, *saved, *scalars),),
                                           lambda x: ctx.pair.reference(x, *scalars[:-1]), (grad,), (saved[0],))
        else:
            grad_x = ctx.pair._backward_kernel(grad, *saved, *scalars)
        return (None, None, grad_x) + nones[2:]
