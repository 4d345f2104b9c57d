"""Checks that need a CUDA GPU (skipped elsewhere): the GPU kernels against the reference on tiny models.

Run on a GPU machine with ``python -m pytest -q tests/test_gpu.py``. The CPU suite proves the arithmetic; these
prove the GPU paths (cuDNN attention by default on Hopper, fused projections, compiled blocks, the VAE's per-frame
attention and channels-last layout) and that the denoising loop never waits for the GPU.
"""

import pytest
import torch
from test_transformer import make_pair
from test_vae import LATENT_CHANNELS, build_pair
from tolerances import BF16_FORWARD_RELATIVE_L2, VAE_CUDA, assert_close, relative_l2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def dit_inputs(model, grid=(3, 8, 12), text_len=7, batch=2, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    t, h, w = grid
    return dict(
        hidden_states=torch.randn(batch, t, h, w, model.config.visual_input_dim, generator=gen).to(CUDA, dtype),
        encoder_hidden_states=torch.randn(batch, text_len, model.config.in_text_dim, generator=gen).to(CUDA, dtype),
        timestep=torch.full((batch,), 937.5, device=CUDA, dtype=dtype),
        pooled_projections=torch.randn(batch, model.config.in_text_dim2, generator=gen).to(CUDA, dtype),
        visual_rope_pos=[torch.arange(n, device=CUDA) for n in (t, h // 2, w // 2)],
        text_rope_pos=torch.arange(text_len, device=CUDA),
        scale_factor=(1, 2, 2),
    )


@pytest.mark.parametrize("variant", ["eager", "fused", "compiled", "fused+compiled"])
@torch.no_grad()
def test_bf16_forward_close_to_reference(variant):
    ref, ours = make_pair()
    ref.to(CUDA)  # its buffers (RoPE frequencies); the parameters are replaced below
    ours.to_dtype(torch.bfloat16).to(CUDA)
    ours_params = dict(ours.named_parameters())
    for name, param in ref.named_parameters():  # the same tensors, float32 islands included (as from_pretrained)
        param.data = ours_params[name].data.clone()
    inputs = dit_inputs(ours)
    expected = ref(**inputs).sample
    if "fused" in variant:
        ours.fuse_qkv_projections()
    if "compiled" in variant:
        ours.compile()
    got = ours(**inputs).sample
    # bf16, ours (cuDNN on Hopper) against the reference (SDPA's choice): the bound
    assert relative_l2(got, expected) <= BF16_FORWARD_RELATIVE_L2


@pytest.fixture()
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize("layout", ["default", "channels-last"])
@pytest.mark.parametrize("frames", [3, 7], ids=["direct", "framewise"])
@torch.no_grad()
def test_vae_decode_equals_reference(no_tf32, layout, frames):
    ref, ours = build_pair()
    ref.to(CUDA)
    ours.to(CUDA)
    if layout == "channels-last":
        ours.to(memory_format=torch.channels_last_3d)
    latents = torch.randn(1, LATENT_CHANNELS, frames, 6, 8, generator=torch.Generator().manual_seed(2)).to(CUDA)
    expected = ref.decode(latents).sample
    got = ours.decode(latents).sample
    assert_close(got, expected, VAE_CUDA)  # float32, TF32 off


def test_denoising_loop_never_waits_for_the_gpu(our_pipeline):
    """CUDA's sync debug mode turns every host synchronisation inside the loop into an error. Tables built once per
    shape (copied from the CPU, which waits) are built by a first, unwatched call."""
    pipe = our_pipeline
    pipe.to(CUDA)
    steps = 3
    call = dict(
        prompt=["A fox", "A slow aerial shot over a foggy pine forest at sunrise"],
        height=32,
        width=48,
        num_frames=5,
        num_inference_steps=steps,
        guidance_scale=5.0,
        output_type="latent",
    )

    def arm(*_):
        torch.cuda.set_sync_debug_mode("error")

    def on_step_end(_pipe, i, _t, tensors):
        if i == steps - 1:
            torch.cuda.set_sync_debug_mode("default")
        return tensors

    handle = None
    try:
        for batched in (False, True):
            pipe.batched_guidance = batched
            pipe(**call, generator=torch.Generator().manual_seed(0))
            handle = pipe.transformer.register_forward_pre_hook(arm)
            pipe(**call, generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end)
            handle.remove()
            handle = None
    finally:
        if handle is not None:
            handle.remove()
        torch.cuda.set_sync_debug_mode("default")
        pipe.batched_guidance = False
        pipe.to("cpu")
