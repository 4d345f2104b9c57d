"""CPU offloading (kandinsky5/runtime/offload.py) on the tiny checkpoints, on the CPU.

The execution device is ``cpu:0``: a device argument distinct from the resting ``cpu``, so a spy on ``Module.to``
tells moves to the device from moves back, and ``to("cpu:0")`` copies the weights into new storage as a move to a
GPU would. A dispatch mode watches every tensor operation: with model offload, a component's weights are only used
while the plan has that component (alone) on the device; with sequential offload, no operation outside the hooks
ever sees a resting CPU weight, only the copies the hooks make.
"""

import itertools
import logging

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kandinsky5 import Kandinsky5I2VPipeline, Kandinsky5T2VPipeline
from kandinsky5.runtime import offload
from kandinsky5.runtime.offload import ModelCpuOffload, SequentialCpuOffload, offload_execution_device

EXECUTION = "cpu:0"
RESTING = "cpu"
SEQUENCE = ("text_encoder", "text_encoder_2", "transformer", "vae")
SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=2, output_type="np")
# with guidance the negative prompt is encoded after the prompt: both encoders run twice
T2V_USE_ORDER = ["text_encoder", "text_encoder_2", "text_encoder", "text_encoder_2", "transformer", "vae"]
# image-to-video encodes the image with the VAE after the prompts, before sampling
I2V_USE_ORDER = T2V_USE_ORDER[:4] + ["vae", "transformer", "vae"]


def run(pipe, **kwargs):
    return pipe(prompt="A red fox in fresh snow", generator=torch.Generator().manual_seed(0), **SMALL, **kwargs).frames


def load(pipeline_class, folder):
    pipe = pipeline_class.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(reference_checkpoint):
    """A pipeline of our own (offloading changes it; the shared fixture stays as it is)."""
    return load(Kandinsky5T2VPipeline, reference_checkpoint[0])


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def storages(module: torch.nn.Module) -> list[int]:
    """Storage addresses of the parameters and buffers of ``module``."""
    return [storage(t) for t in itertools.chain(module.parameters(), module.buffers()) if storage(t)]


class TensorWatch(TorchDispatchMode):
    """Calls ``check(op, tensor)`` for every tensor argument of every operation."""

    def __init__(self, check):
        super().__init__()
        self.check = check

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                self.check(func, leaf)
        return func(*args, **kwargs)


class MoveSpy:
    """Records ``(component, device)`` for every ``Module.to(device)`` on one of the pipeline's networks, and keeps
    ``owners`` (storage address of each weight -> its component) current: ``to("cpu:0")`` makes new copies."""

    def __init__(self, pipe, monkeypatch):
        self.names = {id(getattr(pipe, name)): name for name in SEQUENCE}
        self.moves: list[tuple[str, str]] = []
        self.owners = {address: name for name in SEQUENCE for address in storages(getattr(pipe, name))}
        self.moving = False
        original_to = torch.nn.Module.to
        spy = self

        def to(module, *args, **kwargs):
            name = spy.names.get(id(module))
            if name is None:
                return original_to(module, *args, **kwargs)
            spy.moves.append((name, str(kwargs.get("device", args[0] if args else None))))
            for address in storages(module):
                spy.owners.pop(address, None)
            spy.moving = True
            try:
                return original_to(module, *args, **kwargs)
            finally:
                spy.moving = False
                spy.owners.update(dict.fromkeys(storages(module), name))

        monkeypatch.setattr(torch.nn.Module, "to", to)

    def take(self) -> list[tuple[str, str]]:
        moves, self.moves = self.moves, []
        return moves


def expected_moves(use_order: list[str]) -> list[tuple[str, str]]:
    """One component on the device at a time: the one in use leaves when the next starts; the last at the end."""
    moves, previous = [], None
    for name in use_order:
        if previous is not None:
            moves.append((previous, RESTING))
        moves.append((name, EXECUTION))
        previous = name
    return moves + [(previous, RESTING)]


def watch_model_offload(pipe, spy: MoveSpy, used: list[str]):
    """A dispatch mode asserting that each weight used (outside the plan's own moves) belongs to the one component
    on the device; appends each component to ``used`` when its weights start being used."""
    plan = pipe._offload_plan

    def check(op, tensor):
        owner = spy.owners.get(storage(tensor))
        if owner is None or spy.moving:
            return
        assert plan.on_device == {owner}, f"{op} used {owner} while {plan.on_device} was on the device"
        if not used or used[-1] != owner:
            used.append(owner)

    return TensorWatch(check)


def assert_all_on_cpu(pipe):
    for name in SEQUENCE:
        assert {t.device.type for t in getattr(pipe, name).parameters()} == {"cpu"}, name


# ---------------------------------------------------------------- model offload


def test_model_offload_moves_components_in_turn_and_keeps_the_video(pipe, monkeypatch):
    expected = run(pipe)
    pipe.enable_model_cpu_offload(device=EXECUTION)
    assert pipe._execution_device == torch.device(EXECUTION)
    assert isinstance(pipe._offload_plan, ModelCpuOffload)
    spy = MoveSpy(pipe, monkeypatch)
    for _ in range(2):  # the second call finds the hooks armed again
        used = []
        with watch_model_offload(pipe, spy, used):
            got = run(pipe)
        assert np.abs(got - expected).max() == 0
        assert used == T2V_USE_ORDER
        assert spy.take() == expected_moves(T2V_USE_ORDER)
        assert pipe._offload_plan.on_device == set()
        assert_all_on_cpu(pipe)


def test_model_offload_without_guidance_runs_each_encoder_once(pipe, monkeypatch):
    expected = run(pipe, guidance_scale=1.0)
    pipe.enable_model_cpu_offload(device=EXECUTION)
    spy = MoveSpy(pipe, monkeypatch)
    got = run(pipe, guidance_scale=1.0)
    assert np.abs(got - expected).max() == 0
    assert spy.take() == expected_moves(list(SEQUENCE))


def test_model_offload_catches_vae_encode_in_image_to_video(reference_i2v_checkpoint, monkeypatch):
    pipe = load(Kandinsky5I2VPipeline, reference_i2v_checkpoint[0])
    image = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(1))
    expected = run(pipe, image=image)
    pipe.enable_model_cpu_offload(device=EXECUTION)
    spy = MoveSpy(pipe, monkeypatch)
    used = []
    with watch_model_offload(pipe, spy, used):
        got = run(pipe, image=image)
    assert np.abs(got - expected).max() == 0
    assert used == I2V_USE_ORDER
    assert spy.take() == expected_moves(I2V_USE_ORDER)
    assert_all_on_cpu(pipe)


def test_moving_a_model_offloaded_pipeline_warns_and_the_next_call_sends_the_rest_back(pipe, monkeypatch, caplog):
    expected = run(pipe)
    pipe.enable_model_cpu_offload(device=EXECUTION)
    spy = MoveSpy(pipe, monkeypatch)
    with monkeypatch.context() as no_moves, caplog.at_level(logging.WARNING, logger=offload.__name__):
        no_moves.setattr(torch.nn.Module, "to", lambda module, *args, **kwargs: module)  # no CUDA needed
        pipe.to("cuda")
    assert "enable_model_cpu_offload" in caplog.text
    assert pipe._offload_plan.on_device == set(SEQUENCE)
    got = run(pipe)
    assert np.abs(got - expected).max() == 0
    # the first component to start finds the others on the device and sends them back
    assert spy.take()[:3] == [("text_encoder_2", RESTING), ("transformer", RESTING), ("vae", RESTING)]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=offload.__name__):
        pipe.to("cpu")
    assert caplog.text == ""


# ---------------------------------------------------------------- sequential offload


def test_sequential_offload_uses_only_device_copies_and_keeps_the_video(pipe, monkeypatch):
    expected = run(pipe)
    in_hook = []  # non-empty while one of the plan's hooks runs: its own copies read the resting weights

    def flagged(hook):
        def run_flagged(*args):
            in_hook.append(hook)
            try:
                return hook(*args)
            finally:
                in_hook.pop()

        return run_flagged

    # patched on the class before the plan is made, so the hooks it registers are the flagged ones
    for name in ("_onload", "_offload"):
        monkeypatch.setattr(SequentialCpuOffload, name, flagged(getattr(SequentialCpuOffload, name)))
    pipe.enable_sequential_cpu_offload(device=EXECUTION)
    assert pipe._execution_device == torch.device(EXECUTION)
    plan = pipe._offload_plan
    assert isinstance(plan, SequentialCpuOffload)
    resting = {name: storages(getattr(pipe, name)) for name in SEQUENCE}
    resting_storages = {address for addresses in resting.values() for address in addresses}
    onloaded_at_use = []

    def check(op, tensor):
        if not in_hook:
            assert storage(tensor) not in resting_storages, f"{op} used a weight resting on the CPU"
            onloaded_at_use.append(plan.onloaded_count)

    for _ in range(2):
        with TensorWatch(check):
            got = run(pipe)
        assert np.abs(got - expected).max() == 0
        assert plan.onloaded_count == 0
        # each module's own CPU tensors are back, nothing left on the device
        assert {name: storages(getattr(pipe, name)) for name in SEQUENCE} == resting
    # copies exist only while their module runs, never all weights at once
    assert 0 < max(onloaded_at_use) < len(resting_storages) // 4


def test_sequential_offload_puts_weights_back_when_a_forward_fails(pipe):
    pipe.enable_sequential_cpu_offload(device=EXECUTION)
    weight = pipe.vae.post_quant_conv.weight
    resting = storage(weight)
    with pytest.raises(RuntimeError):
        pipe.vae.decode(torch.zeros(1, 3, 1, 4, 4))  # wrong channel count: the first convolution fails
    assert pipe._offload_plan.onloaded_count == 0
    assert storage(weight) == resting


def test_moving_a_sequentially_offloaded_pipeline_to_a_device_is_an_error(pipe):
    pipe.enable_sequential_cpu_offload(device=EXECUTION)
    with pytest.raises(ValueError, match="enable_sequential_cpu_offload"):
        pipe.to("meta")
    assert_all_on_cpu(pipe)
    pipe.to("cpu")  # allowed


# ---------------------------------------------------------------- enabling, switching, removing


def hook_count(pipe) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) for name in SEQUENCE for m in getattr(pipe, name).modules()
    )


def test_switching_and_removing_offload_leaves_no_hooks(pipe):
    expected = run(pipe, guidance_scale=1.0)
    own_hooks = hook_count(pipe)  # transformers registers some of its own
    pipe.enable_model_cpu_offload(device=EXECUTION)
    model_hooks = hook_count(pipe) - own_hooks
    # each component and its direct children
    assert model_hooks == sum(1 + len(list(getattr(pipe, name).children())) for name in SEQUENCE)
    pipe.enable_sequential_cpu_offload(device=EXECUTION)
    assert hook_count(pipe) - own_hooks > model_hooks
    pipe.enable_model_cpu_offload(device=EXECUTION)
    assert hook_count(pipe) - own_hooks == model_hooks
    pipe.remove_all_hooks()
    assert hook_count(pipe) == own_hooks and pipe._offload_plan is None
    assert pipe._execution_device == pipe.transformer.device
    assert np.abs(run(pipe, guidance_scale=1.0) - expected).max() == 0


@pytest.mark.parametrize("method", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_offload_without_an_accelerator_needs_an_explicit_device(pipe, monkeypatch, method):
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *args, **kwargs: None)
    with pytest.raises(RuntimeError, match=f"`{method}` needs an accelerator.*device="):
        getattr(pipe, method)()
    assert pipe._offload_plan is None


def test_execution_device_resolution():
    cuda0, cuda1, cuda3 = (torch.device("cuda", i) for i in (0, 1, 3))
    assert offload_execution_device("m", None, "cuda", None) == cuda0
    assert offload_execution_device("m", 1, "cuda", None) == cuda1
    assert offload_execution_device("m", None, "cuda:1", None) == cuda1
    assert offload_execution_device("m", None, "cuda", cuda3) == torch.device("cuda", 3)  # the previous plan's
    assert offload_execution_device("m", 0, "cuda", cuda3) == cuda0  # gpu_id=0 is an index, not "unset"
    assert offload_execution_device("m", None, "cpu", None) == torch.device("cpu")
    with pytest.raises(ValueError, match="gpu_id"):
        offload_execution_device("m", 1, "cuda:0", None)
