"""No host synchronisation inside the denoising loop.

On a GPU, reading a tensor's value on the host (``.item()``, ``bool(t)``, data-dependent shapes as in ``nonzero``)
waits for every queued kernel and stalls the launch queue. Those reads all reach the dispatcher as a few operators,
so a dispatch mode sees them on the CPU too. The loop spans the first transformer call to the last step's end.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kandinsky5 import Kandinsky5T2VPipeline

# Operators whose result the host must wait for.
HOST_READS = {
    "_local_scalar_dense",  # .item(), bool(), int(), float()
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
}
SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=3, output_type="latent")


class HostReadLog(TorchDispatchMode):
    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            self.events.append(("host read", str(func)))
        return func(*args, **(kwargs or {}))


def host_reads_in_loop(pipe, **kwargs) -> list[str]:
    events: list = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: events.append(("transformer", None)))

    def on_step_end(_pipe, _i, _t, tensors):
        events.append(("step end", None))
        return tensors

    try:
        with HostReadLog(events):
            pipe(generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end, **{**SMALL, **kwargs})
    finally:
        handle.remove()
    kinds = [kind for kind, _ in events]
    start = kinds.index("transformer")
    end = len(kinds) - kinds[::-1].index("step end")
    return [op for kind, op in events[start:end] if kind == "host read"]


@pytest.mark.parametrize("batched_guidance", [False, True])
def test_denoising_loop_never_reads_device_values(reference_checkpoint, batched_guidance):
    pipe = Kandinsky5T2VPipeline.from_pretrained(reference_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    pipe.batched_guidance = batched_guidance
    # prompts of different lengths: padding masks in the loop
    prompts = ["A fox", "A slow aerial shot over a foggy pine forest at sunrise, birds in the distance"]
    assert host_reads_in_loop(pipe, prompt=prompts, guidance_scale=5.0) == []


def test_nabla_denoising_loop_never_reads_device_values(reference_nabla_checkpoint):
    pipe = Kandinsky5T2VPipeline.from_pretrained(reference_nabla_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    reads = host_reads_in_loop(pipe, prompt="A fox", guidance_scale=5.0, **dict(height=256, width=256))
    assert reads == []


def test_rope_tables_are_built_once_per_shape(reference_checkpoint):
    """RoPE tables depend only on shapes: steps and layers after the first reuse them."""
    from kandinsky5.models import dit

    pipe = Kandinsky5T2VPipeline.from_pretrained(reference_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    dit._visual_rope.cache_clear()
    dit._text_rope.cache_clear()
    pipe(prompt="A fox", generator=torch.Generator().manual_seed(0), guidance_scale=5.0, **SMALL)
    assert dit._visual_rope.cache_info().misses == 1
    # the prompt and the negative prompt have their own lengths
    assert dit._text_rope.cache_info().misses == 2
    calls = 2 * SMALL["num_inference_steps"]
    assert dit._visual_rope.cache_info().hits == calls - 1


def test_magcache_decides_without_reading_device_values(reference_checkpoint):
    """MagCache's skip decisions come from the calibrated ratios alone: a cached loop queues as freely."""
    from kandinsky5 import MagCacheConfig
    from kandinsky5.sampling.caches import official_ratios
    from kandinsky5.variants import get_variant

    pipe = Kandinsky5T2VPipeline.from_pretrained(reference_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    cache = pipe.transformer.enable_cache(
        MagCacheConfig(ratios=official_ratios(get_variant("lite-sft-5s")), threshold=10.0)
    )
    assert host_reads_in_loop(pipe, prompt="A fox", guidance_scale=5.0, num_inference_steps=6) == []
    assert cache.skipped_calls > 0
