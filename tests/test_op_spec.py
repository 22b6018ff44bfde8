"""The op specs (gannorm_kernels/ops/__init__.py) against everything that must agree with them:
the compiled libraries' schemas, the Triton launchers' signatures, the file layout (one
basename per op in every tree), the static check's workloads and the derived autograd
contract. Each check iterates over every spec, so a new op is held to all of them."""

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch

import gannorm_kernels.functional  # noqa: F401  (declares every op spec)
from gannorm_kernels import backends, ops
from gannorm_kernels.ops import SPECS, OpSpec
from gannorm_kernels.tools import static_check

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(SPECS)


def spec_modules():
    """{spec name: the basename of the ops/ module that declares it}."""
    found = {}
    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"gannorm_kernels.ops.{info.name}")
        for value in vars(module).values():
            if isinstance(value, OpSpec):
                found[value.name] = info.name
    return found


def test_every_spec_is_declared_in_an_ops_module():
    assert sorted(spec_modules()) == NAMES
    assert {"weight_norm", "spectral_norm", "similarity_cosine", "minibatch_stddev"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_one_basename_per_op_in_every_tree(name):
    """ops/<op>.py declares it, triton/<op>.py and csrc/<op>.cu hold its kernels, tests/test_<op>.py
    tests it and bench/bench_<op>.py times it (StyleGAN3's torch_utils/ops layout)."""
    basename = spec_modules()[name]
    forward, backward = SPECS[name].triton()
    assert forward.__module__ == backward.__module__ == f"gannorm_kernels.triton.{basename}"
    for path in (f"csrc/{basename}.cu", f"tests/test_{basename}.py", f"bench/bench_{basename}.py"):
        assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("backend", ["cuda", "cuda-emu"])
@pytest.mark.parametrize("name", NAMES)
def test_compiled_schemas_are_the_specs(name, backend):
    """Each csrc/<op>.cu repeats its schemas for the compiled libraries: names, types, aliasing and
    return names must be the spec's."""
    error = backends.extension_error(backend)
    if error is not None:
        pytest.skip(error)
    library = getattr(torch.ops, backends.OPS_NAMESPACE[backend])
    spec = SPECS[name]
    for schema in (spec.forward_schema, spec.backward_schema):
        op_name = schema.split("(", 1)[0]
        compiled = getattr(library, op_name).default._schema
        assert str(compiled) == f"{backends.OPS_NAMESPACE[backend]}::{schema}"


@pytest.mark.parametrize("backend", ["cuda", "cuda-emu"])
def test_compiled_libraries_hold_only_spec_operators(backend):
    error = backends.extension_error(backend)
    if error is not None:
        pytest.skip(error)
    namespace = backends.OPS_NAMESPACE[backend]
    declared = {s.forward_name for s in SPECS.values()} | {s.backward_name for s in SPECS.values()}
    registered = {str(s.name).split("::", 1)[1] for s in torch._C._jit_get_all_schemas()
                  if str(s.name).startswith(f"{namespace}::")}
    # besides the specs: the launch counter; the emulator's schedule seed, loop counts and its
    # deliberately broken kernels (csrc/emu/hazard_demos.cpp)
    tooling = {"launch_count"} | ({"set_schedule_seed", "set_loop_counting", "loop_counts", "hazard_block_sum",
                                   "hazard_neighbour_sums", "hazard_padded_tile_row_sums"}
                                  if backend == "cuda-emu" else set())
    assert registered - declared == tooling
    assert declared <= registered


@pytest.mark.parametrize("name", NAMES)
def test_operators_are_the_specs_with_a_backend(name):
    spec = SPECS[name]
    for schema, op in ((spec.forward_schema, spec.forward_op), (spec.backward_schema, spec.backward_op)):
        head, tail = schema.split(") ->", 1)
        assert str(op._schema) == f"gannorm_kernels::{head}, str backend) ->{tail}"


@pytest.mark.parametrize("name", NAMES)
def test_triton_launchers_take_the_schemas_arguments(name):
    spec = SPECS[name]
    for launcher, schema in zip(spec.triton(), (spec.forward_schema, spec.backward_schema)):
        expected = [a.name for a in torch._C.parse_schema(schema).arguments]
        assert list(inspect.signature(launcher).parameters) == expected, launcher.__name__


@pytest.mark.parametrize("name", NAMES)
def test_static_check_covers_every_spec(name):
    assert name in static_check.WORKLOAD_CALLS


def test_autograd_contract_derived_from_the_schemas():
    """What the names say: differentiable inputs from grad_<input>, mutated inputs from (a!),
    the backward's arguments from the forward's inputs and outputs."""
    weight_norm, spectral_norm = SPECS["weight_norm"], SPECS["spectral_norm"]
    assert weight_norm.differentiable == (0, 1)
    assert weight_norm.backward_sources == [("input", 0), ("input", 1), ("output", 1), ("input", 2)]
    assert spectral_norm.differentiable == (0,)
    assert spectral_norm.mutated == ("u", "v")
    assert spectral_norm.backward_sources == [("input", 0), ("output", 2), ("output", 3), ("output", 1),
                                              ("input", 4), ("input", 6)]


def test_a_malformed_spec_is_refused_with_its_reason():
    with pytest.raises(ValueError, match="neither an input nor an output"):
        OpSpec("spec_test_a_fwd(Tensor x) -> Tensor y", "spec_test_a_bwd(Tensor grad_y, Tensor z) -> Tensor grad_x",
               forward_fake=None, backward_fake=None, reference=None, triton=None, cost=None)
    with pytest.raises(ValueError, match="grad_<input>"):
        OpSpec("spec_test_b_fwd(Tensor x) -> Tensor y", "spec_test_b_bwd(Tensor grad_y, Tensor x) -> Tensor dx",
               forward_fake=None, backward_fake=None, reference=None, triton=None, cost=None)
    with pytest.raises(ValueError, match="name every return"):
        OpSpec("spec_test_c_fwd(Tensor x) -> Tensor", "spec_test_c_bwd(Tensor grad_y, Tensor x) -> Tensor grad_x",
               forward_fake=None, backward_fake=None, reference=None, triton=None, cost=None)
    assert not any(name.startswith("spec_test") for name in SPECS)
