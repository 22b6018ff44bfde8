"""The op spec: each kernel family declared once, as an `OpSpec`, and everything derived from it.

A family is a forward operator and its backward, both written as `torch.library` schemas once
(here; each csrc/<op>.cu repeats its own for the compiled libraries, and a test holds the two equal).
The schemas carry the whole autograd contract, by argument name:
- the backward's first argument is the gradient of the forward's first output (the only
  differentiable output; the others are returned for the caller or saved for backward);
- its other arguments are forward inputs or outputs of the same name: the tensors among them
  are saved for backward, the rest kept as they are;
- it returns `grad_<name>` for each differentiable forward input `<name>`;
- `Tensor(a!)` marks an input the forward updates in place (spectral norm's u and v), which it
  does only when its `bool training` argument is true;
- `Tensor[]` lists work anywhere: a list first output is a list of differentiable outputs
  (its gradient a list), a list input has a list of gradients (the grouped spectral norm).

From a spec come: the operators `torch.ops.gannorm_kernels.<name>` (the backend name appended
as a last `str backend` argument), their fake kernels, the one autograd.Function that runs the
launchers eagerly and the operators under torch.compile, the double backward (the second
derivative of the spec's plain-PyTorch reference), each backend's launchers (Triton's as real
functions, imported on first use since triton is optional; the compiled ones are the
`torch.ops.gannorm_cuda` / `gannorm_emu` operators of the same name), and its cost model.
`SPECS` lists every spec, for the tests and tools that iterate over them.

The low-level Library API is used (not `torch.library.custom_op`) because custom_op refuses
autograd for mutating operators. Eager calls skip the operators: a Python operator costs tens
of microseconds of host time per call, more than the kernels of a typical GAN layer take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import backends
from ..checks import unbatched_buffers_error

NAMESPACE = "gannorm_kernels"
LIBRARY = torch.library.Library(NAMESPACE, "DEF")


@dataclass(frozen=True)
class Cost:
    """What one call of a family's kernels costs: launches, bytes moved, arithmetic. The
    launches are the budget the tests hold; with tools/perf_model.py's peak figures, bytes and
    flops give a lower bound on GPU time."""

    launches: int
    bytes: int
    flops: int = 0

    def lower_bound_seconds(self, bandwidth: float, fp32_flops: float | None, launch_latency: float) -> float:
        """max(bytes / bandwidth, flops / fp32 peak) + launches * launch latency (seconds per
        small-kernel launch)."""
        compute = self.flops / fp32_flops if fp32_flops else 0.0
        return max(self.bytes / bandwidth, compute) + self.launches * launch_latency

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.launches + other.launches, self.bytes + other.bytes, self.flops + other.flops)


SPECS: dict[str, "OpSpec"] = {}


def _is_tensor_list(type_) -> bool:
    return isinstance(type_, torch.ListType) and isinstance(type_.getElementType(), torch.TensorType)


def _flatten(values, lists):
    """The tensors of `values` with the lists (where `lists` is true) spliced in, and the
    lengths to undo it (None for a value that was not a list): autograd.Function only tracks
    tensors passed to it directly."""
    flat, lengths = [], []
    for value, is_list in zip(values, lists):
        if is_list:
            flat.extend(value)
            lengths.append(len(value))
        else:
            flat.append(value)
            lengths.append(None)
    return flat, tuple(lengths)


def _unflatten(flat, lengths):
    values, k = [], 0
    for n in lengths:
        if n is None:
            values.append(flat[k])
            k += 1
        else:
            values.append(list(flat[k:k + n]))
            k += n
    return values


def _below_autograd(op, *args):
    """Runs `op` past its Autograd kernel (from inside the autograd.Function that is it)."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


class OpSpec:
    """One kernel family, declared once; calling it runs the forward with autograd.

    Args:
        forward_schema, backward_schema: the operators' schemas without the backend argument,
            following the naming contract above.
        forward_fake, backward_fake: the output shapes from the arguments (meta tensors),
            without the backend.
        reference: the forward's first output in plain PyTorch, from the backward's arguments
            but the gradient (positionally); its second derivative is the double backward.
        triton: returns the Triton launchers (forward, backward); imports them when called.
        cost: the family's cost model (op-specific arguments), returning a Cost.
    """

    def __init__(self, forward_schema: str, backward_schema: str, *, forward_fake: Callable,
                 backward_fake: Callable, reference: Callable, triton: Callable, cost: Callable):
        self.forward_schema, self.backward_schema = forward_schema, backward_schema
        forward, backward = torch._C.parse_schema(forward_schema), torch._C.parse_schema(backward_schema)
        self.name = forward.name.removesuffix("_fwd")
        self.forward_name, self.backward_name = forward.name, backward.name
        inputs = [a.name for a in forward.arguments]
        outputs = [r.name for r in forward.returns]
        if not all(outputs):
            raise ValueError(f"{forward.name}: name every return (they are matched to the backward's arguments)")
        self.mutated = tuple(a.name for a in forward.arguments if a.alias_info is not None and a.alias_info.is_write)
        self.mutated_inputs = tuple(inputs.index(name) for name in self.mutated)
        if self.mutated and "training" not in inputs:
            raise ValueError(f"{forward.name}: an op that updates inputs in place takes `bool training` (they are "
                             "written only in training)")
        self.training_input = inputs.index("training") if self.mutated else None
        # the backward's arguments after the gradient: ("input", i) or ("output", i) of the forward
        self.backward_sources = []
        for arg in backward.arguments[1:]:
            if arg.name in inputs:
                self.backward_sources.append(("input", inputs.index(arg.name)))
            elif arg.name in outputs:
                self.backward_sources.append(("output", outputs.index(arg.name)))
            else:
                raise ValueError(f"{backward.name}: argument {arg.name!r} is neither an input nor an output of "
                                 f"{forward.name}")
        grads = [r.name for r in backward.returns]
        if not all(name.startswith("grad_") and name[5:] in inputs for name in grads):
            raise ValueError(f"{backward.name}: name its returns grad_<input> (got {grads})")
        self.differentiable = tuple(inputs.index(name[5:]) for name in grads)
        # where each differentiable input sits among the backward's arguments (for the reference)
        self.differentiable_in_backward = tuple(self.backward_sources.index(("input", i)) for i in self.differentiable)
        self.single_output = len(outputs) == 1
        self.input_lists = tuple(_is_tensor_list(a.type) for a in forward.arguments) + (False,)  # + backend
        self.output_lists = tuple(_is_tensor_list(r.type) for r in forward.returns)
        self.backward_lists = tuple(_is_tensor_list(a.type) for a in backward.arguments[1:])
        self.triton, self.cost, self.reference = triton, cost, reference
        self._launchers: dict[str, tuple[Callable, Callable]] = {}
        self.forward_op = self._define(forward_schema, self._forward_kernel, forward_fake,
                                       lambda *args: self._apply(True, args))
        self.backward_op = self._define(backward_schema, self._backward_kernel, backward_fake,
                                        self._backward_autograd)
        SPECS[self.name] = self

    def _define(self, schema: str, kernel, fake, autograd):
        """`NAMESPACE::<schema + str backend>` with its kernel, fake and Autograd kernel; the
        compiled backends' operators of the same name share the fake."""
        name = schema.split("(", 1)[0]
        head, tail = schema.split(") ->", 1)
        LIBRARY.define(f"{head}, str backend) ->{tail}")
        LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
        LIBRARY.impl(name, autograd, "Autograd")
        torch.library.register_fake(f"{NAMESPACE}::{name}", lambda *args: fake(*args[:-1]), lib=LIBRARY)
        for namespace in backends.loaded_ops_namespaces():
            torch.library.register_fake(f"{namespace}::{name}", fake)
        return getattr(getattr(torch.ops, NAMESPACE), name).default

    def launchers(self, backend: str) -> tuple[Callable, Callable]:
        """(forward, backward) launchers of a kernel backend, without the backend argument."""
        found = self._launchers.get(backend)
        if found is None:
            if backend == "triton":
                found = self.triton()
            else:  # the compiled library's operators (csrc/<family>.cu), loading it if needed
                library = backends.compiled_ops(backend)
                found = (getattr(library, self.forward_name).default, getattr(library, self.backward_name).default)
            self._launchers[backend] = found
        return found

    def _forward_kernel(self, *args):
        return self.launchers(args[-1])[0](*args[:-1])

    def _backward_kernel(self, *args):
        return self.launchers(args[-1])[1](*args[:-1])

    def _backward_autograd(self, *args):
        """The backward operator's Autograd kernel, which only torch.compile'd code reaches."""
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            raise NotImplementedError(
                f"{self.backward_name}: double backward (create_graph=True) through torch.compile'd code is not "
                "supported (torch.compile itself does not support it); run that step eagerly, where every op "
                "supports it")
        return _below_autograd(self.backward_op, *args)

    def _apply(self, traced: bool, args):
        flat, lengths = _flatten(args, self.input_lists)
        layout = _Layout(lengths)
        outputs = _SpecFunction.apply(self, traced, layout, *flat)
        outputs = _unflatten(_as_tuple(outputs), layout.outputs)
        return outputs[0] if self.single_output else tuple(outputs)

    def __call__(self, *args):
        """args: the forward's, backend last; returns its outputs as a tuple (the first
        differentiable, the others not). Eager: the launchers; under torch.compile: the operator."""
        if torch.compiler.is_compiling():
            outputs = self.forward_op(*args)
        else:
            outputs = self._apply(False, args)
        return outputs if isinstance(outputs, tuple) else (outputs,)

    def __repr__(self) -> str:
        return f"OpSpec({self.forward_schema!r})"


class _Layout:
    """The list lengths of a call's flat inputs, and of its outputs once the forward ran (see
    _flatten). An object, not a dict: torch.func rebuilds pytree containers among a Function's
    inputs, and the forward's lengths must reach setup_context and the caller."""

    def __init__(self, inputs):
        self.inputs, self.outputs = inputs, None


_SAVED = object()  # marks a backward argument kept by ctx.save_for_backward (None is a value)


class _SpecFunction(torch.autograd.Function):
    """Every family's autograd formula: eager (`traced=False`, the launchers called directly) and
    as the forward operator's Autograd kernel (`traced=True`, the operators, so torch.compile
    sees them). Takes and returns flat tensors; `layout` holds the list lengths (see _flatten)."""

    # forward / setup_context apart: the form torch.func (grad, vmap, functional_call) accepts
    @staticmethod
    def forward(spec, traced, layout, *flat):
        args = _unflatten(flat, layout.inputs)
        if traced:
            outputs = _below_autograd(spec.forward_op, *args)
        else:
            outputs = spec.launchers(args[-1])[0](*args[:-1])
        outputs = (outputs,) if spec.single_output else tuple(outputs)
        flat_outputs, layout.outputs = _flatten(outputs, spec.output_lists)
        return flat_outputs[0] if len(flat_outputs) == 1 else tuple(flat_outputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, traced, layout, *flat = inputs
        flat_outputs = list(_as_tuple(output))
        args = _unflatten(flat, layout.inputs)
        outputs = _unflatten(flat_outputs, layout.outputs)
        sources = [(args if kind == "input" else outputs)[i] for kind, i in spec.backward_sources]
        flat_sources, ctx.source_lengths = _flatten(sources, spec.backward_lists)
        ctx.save_for_backward(*(s for s in flat_sources if isinstance(s, torch.Tensor)))
        ctx.spec, ctx.traced, ctx.backend = spec, traced, args[-1]
        ctx.flat_sources = [_SAVED if isinstance(s, torch.Tensor) else s for s in flat_sources]
        ctx.input_lengths = layout.inputs
        differentiable = layout.outputs[0] or 1
        ctx.first_output = [(t.shape, t.dtype, t.device) for t in flat_outputs[:differentiable]]
        ctx.n_flat_outputs = len(flat_outputs)
        ctx.mark_non_differentiable(*flat_outputs[differentiable:])
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(*(s for s in flat_sources if isinstance(s, torch.Tensor)))

    @staticmethod
    def jvp(ctx, *tangents):
        """Forward mode (torch.func.jvp, forward_ad): the reference's, at the forward's values
        (the same formula whose second derivative the double backward uses)."""
        spec = ctx.spec
        saved = iter(ctx.saved_tensors)
        sources = _unflatten([next(saved) if s is _SAVED else s for s in ctx.flat_sources], ctx.source_lengths)
        positions = _flat_positions(ctx.input_lengths)
        tangent_of = {p: [tangents[3 + k] for k in _as_positions(positions[i])]
                      for i, p in zip(spec.differentiable, spec.differentiable_in_backward)}
        wrt = [p for p in tangent_of if any(t is not None for t in tangent_of[p])]
        if not wrt:  # tangents on the buffers only: the output does not depend on them
            return None if ctx.n_flat_outputs == 1 else (None,) * ctx.n_flat_outputs
        primals = [sources[p] for p in wrt]
        directions = [[torch.zeros_like(x) if t is None else t for x, t in zip(_as_tuple(sources[p]), tangent_of[p])]
                      for p in wrt]
        directions = [d if spec.backward_lists[p] else d[0] for p, d in zip(wrt, directions)]

        def reference(*values):
            args = list(sources)
            for p, value in zip(wrt, values):
                args[p] = value
            out = spec.reference(*args)
            return tuple(out) if spec.output_lists[0] else out

        _, out_tangent = torch.func.jvp(reference, tuple(primals), tuple(directions))
        flat = list(_as_tuple(out_tangent))
        n_outputs = len(ctx.first_output) if spec.output_lists[0] else 1
        rest = (None,) * (ctx.n_flat_outputs - n_outputs)
        return flat[0] if ctx.n_flat_outputs == 1 else tuple(flat) + rest

    @staticmethod
    def vmap(info, in_dims, spec, traced, layout, *flat):
        """torch.func.vmap with the op's own tensors batched (an ensemble's stacked weights,
        several minibatches through a minibatch layer): the op once per batch element, since
        the kernels take no batch dimension of their own. (torch runs the op itself where none
        of its tensors is batched.) Each element goes through apply, so that autograd and the
        transforms outside this vmap see the Function."""
        dims = in_dims[3:]
        positions = _flat_positions(layout.inputs)
        mutated = [k for i in spec.mutated_inputs for k in _as_positions(positions[i])]
        if mutated and _unflatten(flat, layout.inputs)[spec.training_input]:
            if any(dims[k] is None for k in mutated):
                raise unbatched_buffers_error(spec.forward_name)
        outputs = _per_sample(info.batch_size, dims, flat,
                              lambda sample: _SpecFunction.apply(spec, traced, layout, *sample))
        return (outputs[0], 0) if len(outputs) == 1 else (outputs, (0,) * len(outputs))

    @staticmethod
    def backward(ctx, *flat_grads):
        spec = ctx.spec
        # a sparse gradient (nn.Embedding(sparse=True) on a normed weight): the kernels take dense
        flat_grads = tuple(g.to_dense() if g is not None and g.layout != torch.strided else g for g in flat_grads)
        result = [None] * len(ctx.needs_input_grad)  # spec, traced, layout, the flat inputs
        grads_in = flat_grads[:len(ctx.first_output)]
        if all(g is None for g in grads_in):
            return tuple(result)
        if spec.output_lists[0]:  # a layer whose output took no part: a zero gradient
            grad = [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                    for g, (shape, dtype, device) in zip(grads_in, ctx.first_output)]
        else:
            grad = grads_in[0]
        saved = iter(ctx.saved_tensors)
        sources = _unflatten([next(saved) if s is _SAVED else s for s in ctx.flat_sources], ctx.source_lengths)
        batched = any(_is_batched(g) for g in flat_grads if g is not None)
        if ctx.traced:
            if batched:
                raise NotImplementedError(
                    f"{spec.backward_name}: torch.func.vmap of a gradient through torch.compile'd code is not "
                    "supported; run it eagerly, where every op supports it")
            grads = _per_input(spec, spec.backward_op(grad, *sources, ctx.backend))
        elif torch.is_grad_enabled() or batched:
            # create_graph=True: R1/R2, WGAN-GP, torch.func.grad; and a batch of gradients
            # (per-sample gradients, jacrev), which _KernelGrads' vmap runs a sample at a time
            wrt_lists = [spec.backward_lists[p] for p in spec.differentiable_in_backward]
            flat_sources, lengths = _flatten(sources, spec.backward_lists)
            source_positions = _flat_positions(lengths)
            wrt = [k for p in spec.differentiable_in_backward for k in _as_positions(source_positions[p])]
            backend = ctx.backend

            def reference(*flat):
                out = spec.reference(*_unflatten(flat, lengths))
                return tuple(out) if spec.output_lists[0] else out

            def kernel_grads(grads, flat):
                grad = list(grads) if spec.output_lists[0] else grads[0]
                return _flatten(_per_input(spec, spec.launchers(backend)[1](grad, *_unflatten(flat, lengths))),
                                wrt_lists)[0]

            wrt_lengths = _flatten([sources[p] for p in spec.differentiable_in_backward], wrt_lists)[1]
            grads = _unflatten(differentiable_grads(kernel_grads, reference, tuple(_as_tuple(grad)), flat_sources, wrt),
                               wrt_lengths)
        else:
            grads = _per_input(spec, spec.launchers(ctx.backend)[1](grad, *sources))
        positions = _flat_positions(ctx.input_lengths)
        for i, g in zip(spec.differentiable, grads):
            if isinstance(g, (list, tuple)):
                for k, gk in zip(positions[i], g):
                    result[3 + k] = gk
            else:
                result[3 + positions[i]] = g
        return tuple(result)


def _is_batched(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and torch._C._functorch.is_batchedtensor(tensor)


def _per_sample(batch_size, in_dims, values, run):
    """A vmap rule for ops that take no batch: `run` once per batch element, on that element of
    each batched value (the others as they are), its outputs stacked along a new first dim. An
    element of a buffer the op updates in place is a view, so the update reaches the batch (the
    ops' checks refuse a buffer whose elements are not contiguous)."""
    if batch_size == 0:
        raise NotImplementedError("gannorm_kernels ops: torch.func.vmap over a batch of size 0 is not supported")
    results = []
    for b in range(batch_size):
        sample = [value if not isinstance(value, torch.Tensor) or dim is None else value.select(dim, b)
                  for value, dim in zip(values, in_dims)]
        results.append(_as_tuple(run(sample)))
    return tuple(torch.stack(outputs) for outputs in zip(*results))


def _per_input(spec, grads):
    """A backward's returns as one value (a tensor, or a list for a list input) per
    differentiable input."""
    return (grads,) if len(spec.differentiable) == 1 else tuple(grads)


def _flat_positions(lengths):
    """Each value's position among the flat tensors (a list's: a range)."""
    positions, k = [], 0
    for n in lengths:
        if n is None:
            positions.append(k)
            k += 1
        else:
            positions.append(range(k, k + n))
            k += n
    return positions


def _as_positions(position):
    return [position] if isinstance(position, int) else list(position)


def _as_tuple(outputs):
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def differentiable_grads(kernel_grads, reference, grad_outputs, sources, wrt):
    """First-order gradients that can be differentiated again (create_graph=True, as R1/R2 and
    WGAN-GP do): their values come from the kernel (`kernel_grads(grad_outputs, sources)`,
    one gradient per position in `wrt`), and their own gradient is the second derivative of
    `reference`, the op's plain-PyTorch formula (`reference(*sources)` returns the
    differentiable outputs that `grad_outputs` belong to; `wrt` are the positions in `sources`
    of the inputs they are differentiated by). Every tensor goes through the Function's
    arguments, none through the closures, so torch.func's transforms can unwrap them.
    StyleGAN2-ADA's bias_act splits its double backward the same way: a kernel gradient whose
    backward is written in torch ops.

    Second order only: the returned gradients' backward is not itself differentiable.
    """
    return _KernelGrads.apply(kernel_grads, reference, len(grad_outputs), tuple(wrt), *grad_outputs, *sources)


class _KernelGrads(torch.autograd.Function):
    @staticmethod
    def forward(kernel_grads, reference, n_grad_outputs, wrt, *values):
        return tuple(kernel_grads(values[:n_grad_outputs], values[n_grad_outputs:]))

    @staticmethod
    def vmap(info, in_dims, kernel_grads, reference, n_grad_outputs, wrt, *values):
        """A batch of gradients (per-sample gradients, jacrev's rows): the kernel's backward
        once per element."""
        outputs = _per_sample(info.batch_size, in_dims[4:], values,
                              lambda sample: _KernelGrads.apply(kernel_grads, reference, n_grad_outputs, wrt,
                                                                *sample))
        return outputs, (0,) * len(outputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.reference, ctx.n_grad_outputs, ctx.wrt, *values = inputs
        ctx.save_for_backward(*(v for v in values if isinstance(v, torch.Tensor)))
        ctx.values = [_SAVED if isinstance(v, torch.Tensor) else v for v in values]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grad_grads):
        if torch.is_grad_enabled():  # asked for a differentiable second derivative
            raise NotImplementedError("gannorm_kernels ops support gradients of first and second order; a third "
                                      "order (create_graph=True through a second derivative, which torch.func's "
                                      "jacrev of jacrev also asks for) is not supported")
        saved = iter(ctx.saved_tensors)
        values = [next(saved) if v is _SAVED else v for v in ctx.values]
        n = ctx.n_grad_outputs
        with torch.enable_grad():
            leaves = [v.detach().requires_grad_(needs) if isinstance(v, torch.Tensor) else v
                      for v, needs in zip(values, ctx.needs_input_grad[4:])]
            sources = leaves[n:]
            outputs = ctx.reference(*sources)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            wrt = [sources[k] for k in ctx.wrt]
            # the first derivative again, in torch ops: one per wrt input, matched to grad_grads
            first = torch.autograd.grad(outputs, [x for x in wrt if x.requires_grad], leaves[:n],
                                        create_graph=True, allow_unused=True)
            first = iter(first)
            first = [next(first) if x.requires_grad else None for x in wrt]  # one per wrt input, as grad_grads
            pairs = [(f, gg) for f, gg in zip(first, grad_grads)
                     if f is not None and gg is not None and f.requires_grad]
            targets = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
            second = torch.autograd.grad([f for f, _ in pairs], targets, [gg for _, gg in pairs],
                                         allow_unused=True) if pairs and targets else [None] * len(targets)
        by_leaf = dict(zip(map(id, targets), second))
        return (None, None, None, None) + tuple(by_leaf.get(id(t)) if isinstance(t, torch.Tensor) else None
                                                for t in leaves)
