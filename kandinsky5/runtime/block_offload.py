"""Block streaming: a network's repeated blocks rest in (pinned) host memory and are copied to the execution device
a few blocks ahead of the one computing, on a side stream, into a fixed set of reused device buffers.

``pipe.enable_block_offload(blocks_on_gpu=1, prefetch=1)`` makes a :class:`BlockOffload` plan. It is model offload
(runtime/offload.py: one component on the device at a time) in which two components visit the device only in part:

- the transformer: its text and visual blocks are streamed; the rest (embeddings, time embeddings, modulation of the
  output head, the head itself: a few percent of the weights) stays on the device while the transformer is in use;
- the Qwen2.5-VL text encoder: its decoder layers are streamed; its token embeddings and final norm stay; its vision
  tower and language-model head, which text encoding never runs, stay on the host.

For each group of same-shaped blocks (the DiT's text blocks, its visual blocks, Qwen's decoder layers) a
:class:`BlockRing` owns ``blocks_on_gpu + prefetch`` slots, each a device copy of one block's tensors, allocated
when the component arrives and freed when it leaves (so no allocation per step). Before block ``i`` runs, the
blocks ``i .. i + prefetch`` (cyclically: after the last block the next forward starts again at the first) are made
resident: a missing one is copied into the slot whose occupant was loaded longest ago and is not in that window,
after the compute stream has finished with that occupant (an event). The compute stream then waits for block
``i``'s copy (another event), and the block's parameters point at its slot for the length of its forward; they point
back at the host tensors afterwards, so that nothing outside a forward sees a slot. Transfers go through a
:class:`Transfers` object: :class:`StreamTransfers` (a side stream and events) on CUDA-like devices,
:class:`Transfers` (plain synchronous copies) elsewhere; tests pass a recording one.

A block's tensors may be torchao tensor subclasses (quantized weights): they are copied leaf by leaf (their inner
plain tensors), so quantized weights stream at their stored size. A component whose blocks hold anything else (a
bitsandbytes 4-bit layer) is moved whole instead, as model offload does.

The hooks are ``torch.compiler.disable``-d, so regional compilation (runtime/compile.py) compiles the blocks' forward
and leaves the swapping to eager Python; a compiled block sees the same tensor shapes from every slot.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from kandinsky5.runtime.offload import OFFLOAD_DEVICE, ModelCpuOffload

logger = logging.getLogger(__name__)

# The text encoder's parts that text encoding never runs: they stay on the host in block mode (the vision tower
# runs for the image-editing model, whose prompt includes the source image: then it is resident).
TEXT_ENCODER_UNUSED = ("model.visual", "lm_head")
TEXT_ENCODER_VISION = "model.visual"


# ---------------------------------------------------------------------------------------------- tensors and leaves


def tensor_leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``tensor``'s data: itself, or a tensor subclass's inner tensors, recursively."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [leaf for name in names for leaf in tensor_leaves(getattr(tensor, name))]
    return [tensor]


def map_leaves(tensor: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``tensor`` rebuilt with ``fn`` applied to each of its plain leaves (a plain tensor: ``fn(tensor)``)."""
    if is_traceable_wrapper_subclass(tensor):
        names, context = tensor.__tensor_flatten__()
        inner = {name: map_leaves(getattr(tensor, name), fn) for name in names}
        return type(tensor).__tensor_unflatten__(inner, context, tensor.size(), tensor.stride())
    return fn(tensor)


def streamable(tensor: torch.Tensor) -> bool:
    """A plain tensor or a traceable tensor subclass (torchao's); not a tensor carrying state outside its leaves."""
    if is_traceable_wrapper_subclass(tensor):
        return True
    return type(tensor) in (torch.Tensor, nn.Parameter)


def as_parameter_like(original: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``data`` as a frozen ``nn.Parameter`` when ``original`` is one, else ``data``."""
    if isinstance(original, nn.Parameter):
        return nn.Parameter(data, requires_grad=False)
    return data


@dataclass(frozen=True)
class TensorPlace:
    """Where one tensor of a block lives: ``module._parameters[name]`` or ``module._buffers[name]``."""

    module: nn.Module
    name: str
    is_parameter: bool

    def get(self) -> torch.Tensor:
        return (self.module._parameters if self.is_parameter else self.module._buffers)[self.name]

    def set(self, tensor: torch.Tensor) -> None:
        (self.module._parameters if self.is_parameter else self.module._buffers)[self.name] = tensor


def tensor_places(block: nn.Module) -> list[TensorPlace]:
    """Every parameter and buffer place of ``block``, in a fixed order (the same for same-shaped blocks)."""
    places = []
    for module in block.modules():
        places += [TensorPlace(module, n, True) for n, t in module._parameters.items() if t is not None]
        places += [TensorPlace(module, n, False) for n, t in module._buffers.items() if t is not None]
    return places


class StreamedBlock:
    """Block ``index`` of ``stack``: its tensor places and their resting host tensors (pinned when ``pin``)."""

    def __init__(self, stack: nn.ModuleList, index: int, pin: bool):
        self.stack = stack
        self.block = block = stack[index]
        self.index = index
        self.places = tensor_places(block)

        def pin_leaf(leaf: torch.Tensor) -> torch.Tensor:
            # page-locked, so that copies to the device are asynchronous
            return leaf.to(OFFLOAD_DEVICE).pin_memory() if pin else leaf.to(OFFLOAD_DEVICE)

        self.host = []
        for place in self.places:
            tensor = place.get()
            resting = as_parameter_like(tensor, map_leaves(tensor.detach(), pin_leaf))
            place.set(resting)
            self.host.append(resting)
        self.host_leaves = [tensor_leaves(t) for t in self.host]
        # every plain tensor to copy, in slot order (made once: a copy is issued per block call)
        self.flat_host_leaves = [leaf for leaves in self.host_leaves for leaf in leaves]

    @property
    def signature(self) -> tuple:
        """What a slot must match to hold this block: each tensor's place, type, shape and leaves' dtypes."""
        return tuple(
            (type(p.module).__name__, p.name, type(t).__name__, tuple(t.shape), tuple(leaf.dtype for leaf in leaves))
            for p, t, leaves in zip(self.places, self.host, self.host_leaves, strict=True)
        )

    @property
    def nbytes(self) -> int:
        return sum(leaf.numel() * leaf.element_size() for leaf in self.flat_host_leaves)

    def point_to(self, tensors: list[torch.Tensor]) -> None:
        for place, tensor in zip(self.places, tensors, strict=True):
            place.set(tensor)

    def point_home(self) -> None:
        self.point_to(self.host)


# ---------------------------------------------------------------------------------------------- transfers


class Transfers:
    """Copies from host to device and their ordering; this base class copies synchronously (CPU, tests)."""

    def copy(self, destination: list[torch.Tensor], source: list[torch.Tensor], after=None, block=None):
        """Copy ``source`` leaves into ``destination`` leaves once the compute event ``after`` has passed; returns
        an event the compute stream waits for before using them (``None``: already done). ``block`` says whose."""
        for dst, src in zip(destination, source, strict=True):
            dst.copy_(src)
        return None

    def compute_event(self):
        """An event marking the compute stream's current position (``None`` when work is synchronous)."""
        return None

    def wait(self, event) -> None:
        """Make the compute stream wait for ``event``."""

    def synchronize(self) -> None:
        """Wait until every copy issued has finished (before the slots are freed)."""

    def block_runs(self, block: StreamedBlock, slot: int) -> None:
        """Called just before ``block`` computes from ``slot`` (recorded by tests)."""


class StreamTransfers(Transfers):
    """Copies on a side stream of a CUDA-like device, ordered against the compute stream by events."""

    def __init__(self, device: torch.device):
        self.module = torch.get_device_module(device)
        self.device = device
        self.stream = self.module.Stream(device=device)

    def copy(self, destination, source, after=None, block=None):
        with self.module.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            for dst, src in zip(destination, source, strict=True):
                dst.copy_(src, non_blocking=True)
            done = self.module.Event()
            done.record(self.stream)
        return done

    def compute_event(self):
        event = self.module.Event()
        event.record(self.module.current_stream(self.device))
        return event

    def wait(self, event) -> None:
        if event is not None:
            self.module.current_stream(self.device).wait_event(event)

    def synchronize(self) -> None:
        self.stream.synchronize()


def transfers_for(device: torch.device) -> Transfers:
    return StreamTransfers(device) if device.type not in ("cpu", "meta", "mps") else Transfers()


# ---------------------------------------------------------------------------------------------- rings of slots


@dataclass
class Slot:
    """Device copies of one block's tensors, and which block they hold."""

    tensors: list[torch.Tensor]
    leaves: list[torch.Tensor]
    occupant: int | None = None
    loaded_at: int = -1
    ready: object = None  # event: the occupant's copy has finished
    free: object = None  # event: the compute stream has finished with the occupant


@dataclass
class BlockRing:
    """Streams one group of same-shaped blocks, in execution order, through ``slot_count`` device slots."""

    blocks: list[StreamedBlock]
    slot_count: int
    prefetch: int
    device: torch.device
    transfers: Transfers
    slots: list[Slot] = field(default_factory=list)
    _loads: Iterator[int] = field(default_factory=itertools.count)

    def window(self, position: int) -> list[int]:
        """Positions of the blocks to have resident when the block at ``position`` runs (cyclic)."""
        count = len(self.blocks)
        return [(position + k) % count for k in range(min(self.prefetch + 1, count))]

    def before(self, position: int) -> None:
        """Make the block at ``position`` (and the next ``prefetch``) resident; point the block at its slot."""
        window = self.window(position)
        for ahead in window:
            self._ensure(ahead, window)
        slot_index = self._slot_of(position)
        slot = self.slots[slot_index]
        self.transfers.wait(slot.ready)
        block = self.blocks[position]
        block.point_to(slot.tensors)
        self.transfers.block_runs(block, slot_index)

    def after(self, position: int) -> None:
        """The block at ``position`` has been issued: its slot may be refilled once the compute gets there. Also
        called when the forward (or :meth:`before`) raised: then the block may hold no slot."""
        slot = next((s for s in self.slots if s.occupant == position), None)
        if slot is not None:
            slot.free = self.transfers.compute_event()
        self.blocks[position].point_home()

    def release(self) -> None:
        """Free the slots (the component leaves the device); copies in flight finish first."""
        self.transfers.synchronize()
        for block in self.blocks:
            block.point_home()
        self.slots = []

    def _slot_of(self, position: int) -> int:
        return next(i for i, s in enumerate(self.slots) if s.occupant == position)

    def _ensure(self, position: int, window: list[int]) -> None:
        if any(slot.occupant == position for slot in self.slots):
            return
        block = self.blocks[position]
        if len(self.slots) < self.slot_count:
            slot = self._new_slot(block)
            self.slots.append(slot)
        else:
            candidates = [s for s in self.slots if s.occupant not in window]
            slot = min(candidates, key=lambda s: s.loaded_at)
        slot.ready = self.transfers.copy(slot.leaves, block.flat_host_leaves, after=slot.free, block=block)
        slot.occupant, slot.loaded_at, slot.free = position, next(self._loads), None

    def _new_slot(self, block: StreamedBlock) -> Slot:
        def empty(leaf: torch.Tensor) -> torch.Tensor:
            # from the metadata alone: no operation reads the host tensor
            return torch.empty_strided(leaf.size(), leaf.stride(), dtype=leaf.dtype, device=self.device)

        tensors = [as_parameter_like(t, map_leaves(t, empty)) for t in block.host]
        # The memory may have served the compute stream until now (the caching allocator reuses it in that
        # stream's order): the first copy into it waits for the compute stream's present position.
        leaves = [leaf for t in tensors for leaf in tensor_leaves(t)]
        return Slot(tensors=tensors, leaves=leaves, free=self.transfers.compute_event())


# ---------------------------------------------------------------------------------------------- what streams


def named_block_lists(component: nn.Module) -> list[nn.ModuleList]:
    """The lists of repeated blocks of ``component`` that block mode streams, in execution order."""
    from kandinsky5.models.dit import Kandinsky5Transformer3DModel

    if isinstance(component, Kandinsky5Transformer3DModel):
        return [component.text_transformer_blocks, component.visual_transformer_blocks]
    language_model = getattr(getattr(component, "model", None), "language_model", None)
    if language_model is not None and isinstance(getattr(language_model, "layers", None), nn.ModuleList):
        return [language_model.layers]
    return []


def host_only_modules(component: nn.Module, vision_input: bool = False) -> list[nn.Module]:
    """Parts of a streamed component that its pipeline use never runs, left on the host in block mode
    (``vision_input``: the text encoder's vision tower runs)."""
    if not named_block_lists(component) or not hasattr(component, "lm_head"):
        return []
    unused = [path for path in TEXT_ENCODER_UNUSED if not (vision_input and path == TEXT_ENCODER_VISION)]
    return [component.get_submodule(path) for path in unused]


class ComponentStream:
    """A component in block mode: rings for its blocks, the hooks that drive them, and its resident part."""

    def __init__(
        self,
        component: nn.Module,
        device: torch.device,
        slots: int,
        prefetch: int,
        transfers: Transfers,
        vision_input: bool = False,
    ):
        self.component = component
        self.device = device
        pin = device.type == "cuda"
        self.rings: list[BlockRing] = []
        self.handles = []
        streamed: set[int] = set()
        for block_list in named_block_lists(component):
            blocks = [StreamedBlock(block_list, i, pin) for i in range(len(block_list))]
            for group in group_by_signature(blocks):
                ring = BlockRing(group, slots, prefetch, device, transfers)
                self.rings.append(ring)
                for position, streamed_block in enumerate(group):
                    self._hook(streamed_block.block, ring, position)
            streamed.update(id(m) for block in block_list for m in block.modules())
        for module in host_only_modules(component, vision_input):
            streamed.update(id(m) for m in module.modules())
        self.resident = [m for m in component.modules() if id(m) not in streamed]

    def _hook(self, block: nn.Module, ring: BlockRing, position: int) -> None:
        self.handles.append(block.register_forward_pre_hook(partial(_before_block, ring, position)))
        self.handles.append(block.register_forward_hook(partial(_after_block, ring, position), always_call=True))

    def arrive(self) -> None:
        """Move the resident part to the device (the blocks come one by one)."""
        for module in self.resident:
            module._apply(lambda t: t.to(self.device), recurse=False)

    def leave(self) -> None:
        for ring in self.rings:
            ring.release()
        for module in self.resident:
            module._apply(lambda t: t.to(OFFLOAD_DEVICE), recurse=False)

    @property
    def block_bytes(self) -> int:
        """Bytes of the largest streamed block."""
        return max((b.nbytes for ring in self.rings for b in ring.blocks), default=0)


def group_by_signature(blocks: list[StreamedBlock]) -> list[list[StreamedBlock]]:
    groups: dict[tuple, list[StreamedBlock]] = {}
    for block in blocks:
        groups.setdefault(block.signature, []).append(block)
    return list(groups.values())


@torch.compiler.disable
def _before_block(ring: BlockRing, position: int, module: nn.Module, args) -> None:
    ring.before(position)


@torch.compiler.disable
def _after_block(ring: BlockRing, position: int, module: nn.Module, args, output) -> None:
    ring.after(position)


def can_stream(component: nn.Module) -> bool:
    """Whether every tensor of the component's blocks can be streamed leaf by leaf."""
    lists = named_block_lists(component)
    return bool(lists) and all(
        streamable(p.get()) for block_list in lists for block in block_list for p in tensor_places(block)
    )


# ---------------------------------------------------------------------------------------------- the plan


class BlockOffload(ModelCpuOffload):
    """Model offload in which the transformer's and the text encoder's repeated blocks stream."""

    method = "enable_block_offload"
    holds_host_copies = True

    def __init__(
        self,
        components: dict[str, nn.Module],
        device: torch.device,
        blocks_on_gpu: int = 1,
        prefetch: int = 1,
        transfers: Transfers | None = None,
        vision_input: bool = False,
    ):
        check_stream_settings(blocks_on_gpu, prefetch)
        device = torch.device(device)
        transfers = transfers if transfers is not None else transfers_for(device)
        self.streams: dict[str, ComponentStream] = {}
        for name, component in components.items():
            if can_stream(component):
                slots = blocks_on_gpu + prefetch
                self.streams[name] = ComponentStream(component, device, slots, prefetch, transfers, vision_input)
            elif named_block_lists(component):
                logger.info("%s holds layers that cannot stream block by block; it moves whole", name)
        super().__init__(components, device)
        self.options = {"blocks_on_gpu": blocks_on_gpu, "prefetch": prefetch, "vision_input": vision_input}
        self._handles += [handle for stream in self.streams.values() for handle in stream.handles]

    def move_in(self, name: str) -> None:
        stream = self.streams.get(name)
        if stream is None:
            super().move_in(name)
        else:
            stream.arrive()

    def move_out(self, name: str) -> None:
        stream = self.streams.get(name)
        if stream is None:
            super().move_out(name)
        else:
            stream.leave()

    def pipeline_moving(self, device: torch.device) -> None:
        if device.type != OFFLOAD_DEVICE.type:
            raise ValueError(
                "Block offload is on (`enable_block_offload`): the repeated blocks rest on the CPU and stream to "
                f"{self.device}, so the pipeline cannot be moved to {device}. Leave it on the CPU "
                "(`pipe.to('cpu')`), or call `pipe.remove_all_hooks()` first."
            )
        self.free()


def check_stream_settings(blocks_on_gpu: int, prefetch: int) -> None:
    if isinstance(blocks_on_gpu, bool) or not isinstance(blocks_on_gpu, int) or blocks_on_gpu < 1:
        raise ValueError(f"`blocks_on_gpu` must be an integer >= 1 (blocks computing at once), got {blocks_on_gpu!r}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"`prefetch` must be an integer >= 0 (blocks copied ahead), got {prefetch!r}")
