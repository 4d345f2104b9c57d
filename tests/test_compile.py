"""``transformer.compile()`` (regional) and ``torch.compile(transformer)`` against eager, CPU.

CPU inductor compiles take seconds each on a small CI machine, so most tests compile with the ``aot_eager`` backend
(Dynamo capture and AOT tracing, no code generation): that checks the capture, the graph count (one graph per block
class, no recompiles across layers or steps) and the outputs. One test runs the default inductor backend on the
smallest model.
"""

import pytest
import torch
from conftest import NABLA_ATTENTION, TINY_TRANSFORMER, randomize_
from tolerances import INDUCTOR_FORWARD, NABLA_FORWARD, assert_close
from torch._dynamo.testing import CompileCounterWithBackend

from kandinsky5.models.dit import Kandinsky5Transformer3DModel
from kandinsky5.pipelines.base import Kandinsky5PipelineBase
from kandinsky5.runtime.compile import (
    EXACT_CAST_OPTIONS,
    compile_repeated_blocks,
    inductor_exact_casts,
    repeated_blocks,
)

CAPTURE_BACKEND = "aot_eager"
# A sparse NABLA setting for the tiny grids (the checkpoint windows would cover them entirely).
SPARSE_NABLA = dict(NABLA_ATTENTION, attention_wT=1, attention_P=0.3)
GRID = (3, 32, 32)  # latent grid: 3 frames x 2 x 2 tiles of 8x8 tokens after the 2x2 patch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Graph counts are per test: compilations earlier in the session (the benchmark smoke runs compile the same
    block classes) would otherwise mark shapes dynamic and add graphs."""
    torch._dynamo.reset()
    yield


def tiny_model(nabla=False, **overrides):
    config = dict(TINY_TRANSFORMER, **(SPARSE_NABLA if nabla else {}), **overrides)
    model = Kandinsky5Transformer3DModel.from_config(config).eval()
    randomize_(model, seed=3)
    return model


def model_inputs(model, grid=GRID, seed=0, timestep=900.0):
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    return dict(
        hidden_states=torch.randn(1, t, h, w, model.config.visual_input_dim, generator=gen),
        encoder_hidden_states=torch.randn(1, 5, model.config.in_text_dim, generator=gen),
        timestep=torch.tensor([timestep]),
        pooled_projections=torch.randn(1, model.config.in_text_dim2, generator=gen),
        scale_factor=(1, 2, 2),
    )


def sparse_params(model, grid=GRID):
    c = model.config
    t, h, w = grid[0], grid[1] // 2, grid[2] // 2
    window = Kandinsky5PipelineBase.fast_sta_nabla(
        t, h // 8, w // 8, c.attention_wT, c.attention_wH, c.attention_wW, "cpu"
    )
    return {"sta_mask": window[None, None], "to_fractal": True, "P": c.attention_P}


def run(model, **kwargs):
    with torch.no_grad():
        return model(**kwargs).sample


def test_compile_is_opt_in_and_in_place():
    model = tiny_model()
    blocks = repeated_blocks(model)
    assert len(blocks) == model.config.num_text_blocks + model.config.num_visual_blocks
    assert all(block._compiled_call_impl is None for block in model.modules())  # eager by default
    keys = list(model.state_dict())
    assert model.compile(backend=CAPTURE_BACKEND) is model
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert model._compiled_call_impl is None  # regional: the model's own forward stays eager
    assert list(model.state_dict()) == keys


def test_regional_compile_equals_eager_without_recompiles():
    model = tiny_model(num_visual_blocks=3)
    steps = [model_inputs(model, seed=s, timestep=t) for s, t in [(0, 900.0), (1, 500.0), (2, 100.0)]]
    expected = [run(model, **inputs) for inputs in steps]
    counter = CompileCounterWithBackend(CAPTURE_BACKEND)
    model.compile(backend=counter)
    for inputs, reference in zip(steps, expected, strict=True):
        assert torch.equal(run(model, **inputs), reference)
    assert counter.frame_count == 2  # one graph for the text block, one for all visual blocks, across all steps


@pytest.mark.parametrize("backend", ["auto", "flex"])
def test_regional_compile_with_nabla(backend):
    """NABLA inside compiled blocks: the block map, then SDPA with its mask (auto) or flex_attention (flex).

    On the CPU a flex call leaves the block's graph (CPU inductor cannot lower it there) and runs the separately
    compiled kernel, so the flex case has more graphs; neither case recompiles for another step.
    """
    model = tiny_model(nabla=True)
    inputs = dict(model_inputs(model), sparse_params=sparse_params(model))
    expected = run(model, **inputs)
    assert (expected - run(model, **model_inputs(model))).abs().max().item() > 1e-2  # sparsity matters
    model.set_attention_backend(backend)
    counter = CompileCounterWithBackend(CAPTURE_BACKEND)
    model.compile(backend=counter)
    got = run(model, **inputs)
    graphs = counter.frame_count
    run(model, **dict(inputs, timestep=torch.tensor([300.0])))  # another step
    assert counter.frame_count == graphs
    if backend == "auto":
        assert torch.equal(got, expected) and graphs == 2
    else:
        assert_close(got, expected, NABLA_FORWARD)  # flex vs SDPA with the expanded mask


def test_whole_model_torch_compile_equals_eager():
    model = tiny_model(nabla=True)
    inputs = dict(model_inputs(model), sparse_params=sparse_params(model))
    expected = run(model, **inputs)
    counter = CompileCounterWithBackend(CAPTURE_BACKEND)
    compiled = torch.compile(model, backend=counter)
    assert torch.equal(run(compiled, **inputs), expected)
    assert counter.frame_count == 1


def test_regional_inductor_compile_equals_eager():
    """The default backend, on the smallest model (one block of each kind, four tokens)."""
    model = tiny_model(num_visual_blocks=1)
    inputs = model_inputs(model, grid=(1, 4, 4))
    expected = run(model, **inputs)
    model.compile()
    assert_close(run(model, **inputs), expected, INDUCTOR_FORWARD)


def test_compile_options():
    assert inductor_exact_casts(None, None, {}) == {"options": EXACT_CAST_OPTIONS}
    max_autotune = inductor_exact_casts("max-autotune-no-cudagraphs", None, {})["options"]
    assert max_autotune["max_autotune"] and max_autotune["emulate_precision_casts"]
    mine = inductor_exact_casts(None, None, {"options": {"emulate_precision_casts": False}})
    assert mine == {"options": {"emulate_precision_casts": False}}
    assert inductor_exact_casts("default", None, {"backend": "aot_eager"}) == {
        "backend": "aot_eager",
        "mode": "default",
    }
    with pytest.raises(ValueError, match="not both"):
        inductor_exact_casts("max-autotune", None, {"options": {}})
    with pytest.raises(ValueError, match="no repeated blocks"):
        compile_repeated_blocks(torch.nn.Linear(2, 2))
