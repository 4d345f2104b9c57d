"""Fused attention projections (``fuse_qkv_projections``) against the plain model and the reference, float32 CPU.

Fusing changes only how many matrix multiplies read an input, so the fused model must give the plain model's output
within float32 rounding, keep the checkpoint layout in ``state_dict()``, and load the reference's tensors. A wider
matrix multiply may sum in another order (on another BLAS), so the rotated queries and keys may round to bfloat16
differently: outputs are compared within ``tolerances.BF16_FLIP``.
"""

import pytest
import torch
from conftest import NABLA_ATTENTION
from test_transformer import make_pair, nabla_sparse_params, run_both
from tolerances import BF16_FLIP, PIPELINE_BF16_FLIP, assert_close

from kandinsky5 import Kandinsky5T2VPipeline
from kandinsky5.loading.diffusers_format import load_component
from kandinsky5.models.dit import FUSED_PROJECTION, Attention, Kandinsky5Transformer3DModel

GRID = (3, 4, 6)
PROMPT = "A lighthouse on a cliff at dusk, waves below"
SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=2, output_type="np")


def fused_layers(model):
    return [m for m in model.modules() if isinstance(m, Attention) and m.fused]


def test_fused_forward_equals_plain_and_reference():
    ref, ours = make_pair()
    expected, plain = run_both(ref, ours, GRID, batch=2)
    ours.fuse_qkv_projections()
    config = ours.config
    assert len(fused_layers(ours)) == config.num_text_blocks + 2 * config.num_visual_blocks
    _, fused = run_both(ref, ours, GRID, batch=2)
    assert_close(fused, plain, BF16_FLIP)
    assert_close(fused, expected, BF16_FLIP)
    ours.unfuse_qkv_projections()
    assert not fused_layers(ours)
    _, unfused = run_both(ref, ours, GRID, batch=2)
    assert torch.equal(unfused, plain)


def test_fused_nabla_forward_equals_plain():
    """NABLA selects blocks from the queries and keys: fused projections must select the same ones."""
    ref, ours = make_pair(**NABLA_ATTENTION)
    grid = (2, 16, 16)
    sparse = nabla_sparse_params(grid, NABLA_ATTENTION)
    _, plain = run_both(ref, ours, grid, sparse_params=sparse, reference=False)
    ours.fuse_qkv_projections()
    _, fused = run_both(ref, ours, grid, sparse_params=sparse, reference=False)
    assert_close(fused, plain, BF16_FLIP)


def test_fused_state_dict_keeps_the_checkpoint_layout(tmp_path):
    ref, ours = make_pair()
    plain = ours.state_dict()
    ours.fuse_qkv_projections()
    fused = ours.state_dict()
    assert set(fused) == set(plain)
    assert all(torch.equal(fused[k], plain[k]) for k in plain)
    # save_pretrained of a fused model writes a checkpoint the plain loader (and diffusers) reads
    ours.save_pretrained(tmp_path / "transformer")
    reloaded = load_component(Kandinsky5Transformer3DModel, tmp_path / "transformer")
    assert all(torch.equal(reloaded.state_dict()[k], plain[k]) for k in plain)


def test_reference_tensors_load_into_a_fused_meta_model():
    """gpt-fast style: fuse the empty model first, then assign the checkpoint's separate tensors (joined by the
    load hook)."""
    ref, ours = make_pair()
    with torch.device("meta"):
        fused = Kandinsky5Transformer3DModel.from_config(ours.config)
    fused.fuse_qkv_projections()
    fused.load_state_dict(ref.state_dict(), strict=True, assign=True)
    fused.eval()
    expected, plain = run_both(ref, ours, GRID)
    _, got = run_both(ref, fused, GRID)
    assert not any(p.is_meta for p in fused.parameters())
    assert_close(got, plain, BF16_FLIP)


def test_fused_query_key_value_refuses_a_context():
    attention = Attention(16, 8)
    attention.fuse_projections(("to_query", "to_key", "to_value"))
    with pytest.raises(ValueError, match="self-attention only"):
        attention(torch.randn(1, 3, 16), context=torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="can fuse"):
        attention.fuse_projections(("to_query", "to_value"))


def test_fused_pipeline_matches_reference(reference_checkpoint):
    folder, ref = reference_checkpoint
    pipe = Kandinsky5T2VPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.fuse_qkv_projections()
    args = dict(SMALL, prompt=PROMPT, guidance_scale=5.0)
    expected = ref(**args, generator=torch.Generator().manual_seed(3)).frames
    got = pipe(**args, generator=torch.Generator().manual_seed(3)).frames
    assert_close(got, expected, PIPELINE_BF16_FLIP)


def test_fusing_an_offloaded_pipeline_rearms_the_hooks(reference_checkpoint):
    pipe = Kandinsky5T2VPipeline.from_pretrained(reference_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    args = dict(SMALL, prompt=PROMPT, guidance_scale=5.0)
    expected = pipe(**args, generator=torch.Generator().manual_seed(4)).frames
    pipe.enable_sequential_cpu_offload(device="cpu:0")
    pipe.fuse_qkv_projections()
    layers = [getattr(m, FUSED_PROJECTION) for m in fused_layers(pipe.transformer)]
    assert layers and all(layer._forward_pre_hooks for layer in layers)
    got = pipe(**args, generator=torch.Generator().manual_seed(4)).frames
    assert_close(got, expected, PIPELINE_BF16_FLIP)
