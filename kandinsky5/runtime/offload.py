"""CPU offloading: a pipeline's networks rest on the CPU and visit the execution device only while they run.

Two plans, each an :class:`OffloadPlan` held by the pipeline (``pipe._offload_plan``); all their state lives in
the plan, and their hooks are ``register_forward_pre_hook`` / ``register_forward_hook`` handles that
:meth:`OffloadPlan.remove` takes off again.

- :class:`ModelCpuOffload` (``pipe.enable_model_cpu_offload()``): a whole component moves to the device when it
  starts and goes back to the CPU when another one starts, so at most one component is on the device; the last
  one stays until :meth:`OffloadPlan.free` (the pipeline's ``maybe_free_model_hooks()``, the end of ``__call__``).
  A component starts when its ``forward`` or the ``forward`` of one of its direct children runs: that catches the
  methods the pipelines call besides ``forward`` (``vae.decode`` and ``vae.encode`` compute through the VAE's
  ``decoder``/``post_quant_conv`` and ``encoder``/``quant_conv``).
- :class:`SequentialCpuOffload` (``pipe.enable_sequential_cpu_offload()``): every module that holds parameters or
  buffers of its own gets a copy of them on the device for the length of its ``forward``; the CPU tensors are put
  back afterwards. Least memory, one host-to-device copy per module call. Checked in eager mode; with compiled
  blocks (runtime/compile.py) it gives the same frames on the CPU but is unchecked on a GPU.

With the pipeline order text encoder, CLIP encoder, transformer, VAE (``model_cpu_offload_seq``) the model plan
moves exactly as diffusers' (accelerate's ``cpu_offload_with_hook`` chain). Where a pipeline comes back to an
earlier component (the negative prompt's encoders, image-to-video's ``vae.encode`` before the transformer), ours
still keeps one component on the device, where diffusers' chain only offloads a component's fixed predecessor.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger(__name__)

# Where components rest.
OFFLOAD_DEVICE = torch.device("cpu")


def offload_execution_device(
    method: str, gpu_id: int | None, device: torch.device | str | None, previous: torch.device | None
) -> torch.device:
    """The device offloaded components run on, resolved as diffusers does.

    ``device`` defaults to the machine's accelerator (an error if there is none: offloading to the CPU from the
    CPU is pointless, so a CPU execution device must be asked for explicitly). The index is ``gpu_id``, else the
    one in ``device``, else the previous plan's, else 0; giving both ``gpu_id`` and an index is an error.
    """
    if device is None:
        device = torch.accelerator.current_accelerator()
        if device is None:
            raise RuntimeError(
                f"`{method}` needs an accelerator (CUDA, XPU, MPS, ...) and none was found; "
                "pass `device=` to choose the execution device explicitly"
            )
    device = torch.device(device)
    if gpu_id is not None and device.index is not None:
        raise ValueError(
            f"`{method}` got both `gpu_id`={gpu_id} and the index in `device`={device}; pass one of them "
            f"(e.g. `device`={device.type!r} with `gpu_id`={gpu_id})"
        )
    if device.type == OFFLOAD_DEVICE.type:
        return device
    for index in (gpu_id, device.index, previous.index if previous is not None else None):
        if index is not None:
            return torch.device(device.type, index)
    return torch.device(device.type, 0)


def offload_components(pipeline) -> dict[str, nn.Module]:
    """The pipeline's networks by name, in the order of its ``model_cpu_offload_seq``, then any others."""
    if pipeline.model_cpu_offload_seq is None:
        raise ValueError(f"{type(pipeline).__name__} sets no `model_cpu_offload_seq`; it cannot be offloaded")
    modules = {name: c for name, c in pipeline.components.items() if isinstance(c, nn.Module)}
    ordered = {name: modules.pop(name) for name in pipeline.model_cpu_offload_seq.split("->") if name in modules}
    return ordered | modules


def release_cached_memory(device: torch.device) -> None:
    """Hand the caching allocator's free blocks back, so the next component finds contiguous memory."""
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is not None and accelerator.type == device.type:
        torch.accelerator.empty_cache()


class OffloadPlan:
    """Hooks that move a pipeline's components between the CPU and ``device``, and the state they need."""

    # the pipeline method that makes this plan, for messages
    method = ""
    # whether the plan keeps its own host copies of weights (a cast of the networks would bypass them)
    holds_host_copies = False

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._handles: list[RemovableHandle] = []
        # the keyword arguments the plan was made with (re-armed with them after a layout transform)
        self.options: dict = {}

    def free(self) -> None:
        """Put everything back on the CPU (end of a generation); the hooks stay armed for the next one."""
        raise NotImplementedError

    def pipeline_moving(self, device: torch.device) -> None:
        """Called by ``pipe.to(device)`` before it moves the components."""
        raise NotImplementedError

    def remove(self) -> None:
        """Take the hooks off and leave every component on the CPU."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.free()


class ModelCpuOffload(OffloadPlan):
    """Whole components visit the device one at a time, each when it starts."""

    method = "enable_model_cpu_offload"

    def __init__(self, components: dict[str, nn.Module], device: torch.device):
        super().__init__(device)
        self.components = dict(components)
        # names of the components this plan (or a pipe.to) put on the device
        self.on_device: set[str] = set()
        for name, component in self.components.items():
            # The children too: methods such as vae.decode() run through them, not through forward.
            for entry in (component, *component.children()):
                self._handles.append(entry.register_forward_pre_hook(partial(self._on_forward, name)))

    def _on_forward(self, name: str, module: nn.Module, args) -> None:
        self.use(name)

    def use(self, name: str) -> None:
        """Make ``name`` the one component on the device (the others go to the CPU first, to make room)."""
        if self.on_device == {name}:
            return
        leaving = [other for other in self.components if other in self.on_device and other != name]
        for other in leaving:
            self.move_out(other)
        if leaving:
            release_cached_memory(self.device)
        if name not in self.on_device:
            self.move_in(name)
        self.on_device = {name}

    def move_in(self, name: str) -> None:
        """Put component ``name`` on the device (a subclass may move only part of it)."""
        self.components[name].to(self.device)

    def move_out(self, name: str) -> None:
        self.components[name].to(OFFLOAD_DEVICE)

    def free(self) -> None:
        for name in self.components:
            if name in self.on_device:
                self.move_out(name)
        if self.on_device:
            release_cached_memory(self.device)
        self.on_device = set()

    def pipeline_moving(self, device: torch.device) -> None:
        if device.type == OFFLOAD_DEVICE.type:
            self.on_device = set()
            return
        logger.warning(
            "Model CPU offload is on (`enable_model_cpu_offload`) but the pipeline is being moved to %s: the memory "
            "it saves is lost until the next component runs, and offloading moves each of %s to the device when "
            "it is needed. Leave the pipeline on the CPU (`pipe.to('cpu')`) or drop the move.",
            device,
            ", ".join(self.components),
        )
        # everything will be on a device: the next component to start sends the others back to the CPU
        self.on_device = set(self.components)


def direct_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The parameters and buffers ``module`` holds itself (not its children's)."""
    return itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))


class SequentialCpuOffload(OffloadPlan):
    """Each module's own parameters and buffers are copied to the device for the length of its forward."""

    method = "enable_sequential_cpu_offload"

    def __init__(self, components: dict[str, nn.Module], device: torch.device):
        super().__init__(device)
        # id(tensor) -> (tensor, its CPU data while a copy is on the device, forwards using the copy)
        self._onloaded: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        for component in components.values():
            for module in component.modules():
                if next(direct_tensors(module), None) is None:
                    continue
                self._handles.append(module.register_forward_pre_hook(self._onload))
                # always_call: the CPU tensors come back even when the forward raises
                self._handles.append(module.register_forward_hook(self._offload, always_call=True))

    def _onload(self, module: nn.Module, args) -> None:
        for tensor in direct_tensors(module):
            entry = self._onloaded.get(id(tensor))
            if entry is not None:  # shared with a module whose forward is running: already there
                self._onloaded[id(tensor)] = (tensor, entry[1], entry[2] + 1)
                continue
            resting = tensor.data
            # copy=True: a distinct copy even when the device is the CPU, so the swap is the same everywhere
            tensor.data = resting.to(self.device, copy=True)
            self._onloaded[id(tensor)] = (tensor, resting, 1)

    def _offload(self, module: nn.Module, args, output) -> None:
        for tensor in direct_tensors(module):
            entry = self._onloaded.pop(id(tensor), None)
            if entry is None:  # replaced during the forward; nothing of ours to put back
                continue
            _, resting, users = entry
            if users > 1:
                self._onloaded[id(tensor)] = (tensor, resting, users - 1)
            else:
                tensor.data = resting

    @property
    def onloaded_count(self) -> int:
        """How many tensors have a copy on the device now (0 between forwards)."""
        return len(self._onloaded)

    def free(self) -> None:
        for tensor, resting, _ in self._onloaded.values():
            tensor.data = resting
        if self._onloaded:
            release_cached_memory(self.device)
        self._onloaded.clear()

    def pipeline_moving(self, device: torch.device) -> None:
        if device.type != OFFLOAD_DEVICE.type:
            raise ValueError(
                "Sequential CPU offload is on (`enable_sequential_cpu_offload`): the weights stay on the CPU and "
                f"each layer's are copied to {self.device} while it runs, so the pipeline cannot be moved to "
                f"{device}. Leave it on the CPU (`pipe.to('cpu')`), or call `pipe.remove_all_hooks()` first."
            )
