"""Block streaming (kandinsky5/runtime/block_offload.py) on the tiny checkpoints, on the CPU.

The execution device is ``cpu:0``, as in test_offload.py: the slots are new storage, so a watch on every tensor
operation tells a streamed block's resting host tensors from its device copies. The transfers are recorded: which
block was copied into which slot, and which block ran from which slot, in order.
"""

import numpy as np
import pytest
import torch
from test_offload import TensorWatch, load, run, storage

from kandinsky5 import Kandinsky5I2VPipeline, Kandinsky5T2VPipeline
from kandinsky5.runtime.block_offload import BlockOffload, Transfers, named_block_lists, tensor_places

EXECUTION = "cpu:0"


class RecordingTransfers(Transfers):
    """Synchronous copies that log ``("copy", ring, block, slot)`` and ``("run", ring, block, slot)`` in order."""

    def __init__(self):
        self.log: list[tuple[str, int, int, int]] = []
        self.slot_of_leaf: dict[int, int] = {}
        self.in_copy = False

    def copy(self, destination, source, after=None, block=None):
        self.in_copy = True
        try:
            super().copy(destination, source, after, block)
        finally:
            self.in_copy = False
        self.log.append(("copy", id(block.stack), block.index, storage(destination[0])))
        return None

    def synchronize(self):
        self.log.append(("release", 0, 0, 0))  # a component left: its slots are freed

    def block_runs(self, block, slot):
        slot_tensor = block.places[0].get()
        self.log.append(("run", id(block.stack), block.index, storage(slot_tensor)))


# More blocks than slots, so that the visual blocks really stream (the checkpoints' tiny DiT has two).
DEEPER = dict(num_text_blocks=3, num_visual_blocks=5)


def deeper_transformer(pipe):
    """The pipeline's tiny DiT with more blocks, random weights (compared with itself, offloaded or not)."""
    from conftest import randomize_

    from kandinsky5.models.dit import Kandinsky5Transformer3DModel

    model = Kandinsky5Transformer3DModel.from_config(dict(pipe.transformer.config.to_dict(), **DEEPER))
    randomize_(model, seed=3)
    return model.eval().requires_grad_(False)


def load_deeper(pipeline_class, folder):
    pipe = load(pipeline_class, folder)
    pipe.transformer = deeper_transformer(pipe)
    return pipe


@pytest.fixture
def pipe(reference_checkpoint):
    return load_deeper(Kandinsky5T2VPipeline, reference_checkpoint[0])


def stream(pipe, blocks_on_gpu=1, prefetch=1) -> RecordingTransfers:
    recorder = RecordingTransfers()
    pipe._enable_offload(
        BlockOffload, None, EXECUTION, blocks_on_gpu=blocks_on_gpu, prefetch=prefetch, transfers=recorder
    )
    return recorder


def check_schedule(log, blocks_on_gpu: int, prefetch: int) -> None:
    """At most ``blocks_on_gpu + prefetch`` slots per ring; each block runs from the slot its latest copy filled,
    copied before it runs and, with prefetch, before the block ahead of it ran."""
    slots_per_ring: dict[int, set[int]] = {}
    filled: dict[int, tuple[int, int]] = {}  # slot -> (ring, block) it holds
    copied_at: dict[tuple[int, int], int] = {}
    runs = 0
    most_slots = 0
    for position, (kind, ring, block, slot) in enumerate(log):
        if kind == "release":
            slots_per_ring, filled = {}, {}
            continue
        slots_per_ring.setdefault(ring, set()).add(slot)
        most_slots = max(most_slots, len(slots_per_ring[ring]))
        if kind == "copy":
            filled[slot] = (ring, block)
            copied_at[(ring, block)] = position
            continue
        runs += 1
        assert filled.get(slot) == (ring, block), f"block {block} ran from slot {slot} holding {filled.get(slot)}"
    assert runs > 0
    assert most_slots <= blocks_on_gpu + prefetch
    if prefetch:
        # every visual block after the first is copied before its predecessor runs (it streams ahead)
        runs_at = [(p, ring, block) for p, (kind, ring, block, _) in enumerate(log) if kind == "run"]
        for (p_prev, ring_prev, _), (p, ring, block) in zip(runs_at, runs_at[1:], strict=False):
            if ring == ring_prev and block > 0:
                copies = [q for q, entry in enumerate(log[:p]) if entry[0] == "copy" and entry[1:3] == (ring, block)]
                last_copy = max(copies)
                assert last_copy < p_prev


@pytest.mark.parametrize(("blocks_on_gpu", "prefetch"), [(1, 1), (1, 0), (2, 2)])
def test_block_offload_equals_no_offload_bit_for_bit_and_streams_ahead(pipe, blocks_on_gpu, prefetch):
    expected = run(pipe)
    recorder = stream(pipe, blocks_on_gpu, prefetch)
    got = run(pipe)
    assert np.array_equal(got, expected)
    check_schedule(recorder.log, blocks_on_gpu, prefetch)
    # the transformer's visual blocks were streamed: more copies than blocks (two calls per step, two steps)
    visual = pipe.transformer.visual_transformer_blocks
    copies = [e for e in recorder.log if e[0] == "copy" and e[1] == id(visual)]
    assert len(copies) > len(visual)


def test_block_offload_without_guidance_and_with_nabla(reference_nabla_checkpoint):
    pipe = load_deeper(Kandinsky5T2VPipeline, reference_nabla_checkpoint[0])

    def nabla_run(guidance_scale):
        # NABLA needs a token grid of 8x8 tiles: 128x128 pixels
        generator = torch.Generator().manual_seed(0)
        size = dict(height=128, width=128, num_frames=5, num_inference_steps=2, output_type="latent")
        return pipe("a cat", guidance_scale=guidance_scale, generator=generator, **size).frames

    for guidance_scale in (1.0, 5.0):
        expected = nabla_run(guidance_scale)
        stream(pipe)
        assert torch.equal(nabla_run(guidance_scale), expected)
        pipe.remove_all_hooks()


def test_block_offload_image_to_video(reference_i2v_checkpoint):
    from PIL import Image

    pipe = load_deeper(Kandinsky5I2VPipeline, reference_i2v_checkpoint[0])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    expected = run(pipe, image=image)
    stream(pipe)
    assert np.array_equal(run(pipe, image=image), expected)


def test_block_offload_with_fused_projections_compile_and_magcache(pipe):
    from kandinsky5.sampling.caches import MagCacheConfig, official_ratios
    from kandinsky5.variants import get_variant

    pipe.fuse_qkv_projections()
    pipe.transformer.compile(backend="aot_eager")
    ratios = official_ratios(get_variant("lite-sft-5s"))
    cache = pipe.transformer.enable_cache(MagCacheConfig(ratios=ratios, threshold=1.0, retention_ratio=0.0))

    def cached_run():
        generator = torch.Generator().manual_seed(0)
        return pipe("a cat", height=32, width=48, num_frames=5, num_inference_steps=6, generator=generator).frames

    expected = cached_run()
    assert cache.skipped_calls > 0
    recorder = stream(pipe)
    assert np.array_equal(cached_run(), expected)
    check_schedule(recorder.log, 1, 1)


def test_only_slot_copies_are_computed_with_and_the_rest_is_resident(pipe):
    expected = run(pipe)
    streamed = [
        t
        for component in (pipe.transformer, pipe.text_encoder)
        for blocks in named_block_lists(component)
        for block in blocks
        for t in (p.get() for p in tensor_places(block))
    ]
    recorder = stream(pipe)
    plan = pipe._offload_plan
    resting = {
        storage(p.get())
        for c in (pipe.transformer, pipe.text_encoder)
        for blocks in named_block_lists(c)
        for block in blocks
        for p in tensor_places(block)
    }
    assert len(resting) == len(streamed)

    def check(op, tensor):
        if not recorder.in_copy:
            assert storage(tensor) not in resting, f"{op} used a streamed block's resting host tensor"

    with TensorWatch(check):
        got = run(pipe)
    assert np.array_equal(got, expected)
    # the text encoder's decoder layers streamed too; its vision tower and LM head stayed on the host
    layers = pipe.text_encoder.model.language_model.layers
    assert any(e[1] == id(layers) for e in recorder.log if e[0] == "run")
    assert all(p.device.type == "cpu" and p.device.index is None for p in pipe.text_encoder.lm_head.parameters())
    # after the call: everything rests on the CPU, blocks point at their host tensors, slots are freed
    assert all(not stream.rings or all(not ring.slots for ring in stream.rings) for stream in plan.streams.values())
    assert {
        storage(p.get())
        for c in (pipe.transformer, pipe.text_encoder)
        for blocks in named_block_lists(c)
        for block in blocks
        for p in tensor_places(block)
    } == resting


def test_block_offload_arguments_and_moves(pipe):
    with pytest.raises(ValueError, match="`blocks_on_gpu` must be an integer >= 1"):
        pipe.enable_block_offload(blocks_on_gpu=0, device=EXECUTION)
    with pytest.raises(ValueError, match="`prefetch` must be an integer >= 0"):
        pipe.enable_block_offload(prefetch=-1, device=EXECUTION)
    assert pipe._offload_plan is None
    pipe.enable_block_offload(device=EXECUTION)
    assert pipe._execution_device == torch.device(EXECUTION)
    with pytest.raises(ValueError, match="Block offload is on"):
        pipe.to("cuda")
    with pytest.raises(ValueError, match="cast the pipeline"):
        pipe.to(torch.bfloat16)
    pipe.fuse_qkv_projections()  # re-armed with the same settings
    assert isinstance(pipe._offload_plan, BlockOffload)
    assert pipe._offload_plan.options == {"blocks_on_gpu": 1, "prefetch": 1, "vision_input": False}
    pipe.remove_all_hooks()
    assert all(not module._forward_pre_hooks for module in pipe.transformer.modules())


def test_quantized_blocks_stream_at_their_stored_size(pipe):
    pytest.importorskip("torchao")
    pipe.quantize(transformer="int8")
    expected = run(pipe)
    stream(pipe)
    plan = pipe._offload_plan
    got = run(pipe)
    assert np.array_equal(got, expected)
    block = plan.streams["transformer"].rings[-1].blocks[0]
    linear = block.block.feed_forward.in_layer.weight
    assert type(linear).__name__ == "Int8Tensor"
    # a streamed block's bytes: int8 codes plus scales, about a quarter of its float32 linear weights
    float_bytes = sum(p.numel() * 4 for p in block.block.parameters())
    assert block.nbytes < float_bytes


def test_a_failing_block_leaves_every_block_at_home(pipe):
    """A forward that raises inside a streamed block: the hooks still put the block's host tensors back, and the
    next call runs as before."""
    expected = run(pipe)
    stream(pipe)
    block = pipe.transformer.visual_transformer_blocks[1]
    resting = [storage(p.get()) for p in tensor_places(block)]

    def fail(module, args):
        raise RuntimeError("injected")

    handle = block.feed_forward.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="injected"):
        run(pipe)
    handle.remove()
    assert [storage(p.get()) for p in tensor_places(block)] == resting
    pipe.maybe_free_model_hooks()
    assert np.array_equal(run(pipe), expected)
