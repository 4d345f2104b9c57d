"""The image pipelines (text-to-image, editing) against diffusers 0.42.1 on tiny random checkpoints written by its
``save_pretrained``, float32 on CPU: images, latents, prompt encoding with the source image, the 2D VAE."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPO_ROOT
from tolerances import FORWARD_REORDER, PIPELINE, SAME_KERNEL, VAE, assert_close

from kandinsky5 import Kandinsky5I2IPipeline, Kandinsky5Pipeline, Kandinsky5T2IPipeline
from kandinsky5.loading.diffusers_format import load_component
from kandinsky5.models.vae2d import AutoencoderKL2D

PROMPT = "A cat and a dog baking a cake together in a kitchen."
EDIT_PROMPT = "Make the background a starry night sky."
STEPS = 2
# a real picture (the server page's screenshot), for the editing model's vision input
REAL_IMAGE = REPO_ROOT / "docs" / "serve-page.png"


def source_image() -> PIL.Image.Image:
    with PIL.Image.open(REAL_IMAGE) as image:
        return image.convert("RGB").resize((640, 400))


def generate(pipe, *condition, seed=0, **kwargs):
    args = dict(prompt=PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed))
    args.update(kwargs)
    return pipe(*condition, **args).image


# ------------------------------------------------------------------ text-to-image


@pytest.mark.parametrize("guidance_scale", [3.5, 1.0])
def test_t2i_images_equal_batch_1(our_t2i_pipeline, reference_t2i_checkpoint, guidance_scale):
    _, ref = reference_t2i_checkpoint
    args = dict(height=1024, width=1024, guidance_scale=guidance_scale, output_type="np")
    expected = generate(ref, **args)
    got = generate(our_t2i_pipeline, **args)
    assert got.shape == expected.shape == (1, 1024, 1024, 3)
    assert_close(got, expected, PIPELINE)
    assert expected.std() > 0.01  # a real picture, not a constant


def test_t2i_two_images_per_prompt_as_pt(our_t2i_pipeline, reference_t2i_checkpoint):
    _, ref = reference_t2i_checkpoint
    args = dict(height=640, width=1408, num_images_per_prompt=2, output_type="pt")
    expected = generate(ref, **args)
    got = generate(our_t2i_pipeline, **args)
    assert got.shape == expected.shape == (2, 3, 640, 1408)
    assert_close(got, expected, PIPELINE)
    assert (got[0] - got[1]).abs().max() > 1e-3  # two different images


def test_t2i_latents_equal(our_t2i_pipeline, reference_t2i_checkpoint):
    _, ref = reference_t2i_checkpoint
    expected = generate(ref, output_type="latent")  # diffusers' defaults: 1024x1024, guidance 3.5
    got = generate(our_t2i_pipeline, output_type="latent")
    assert got.shape == expected.shape == (1, 1, 128, 128, 16)
    assert_close(got, expected, FORWARD_REORDER)  # the DiT does the reference's arithmetic; no VAE


def test_t2i_size_snaps_as_diffusers(our_t2i_pipeline, reference_t2i_checkpoint, caplog):
    _, ref = reference_t2i_checkpoint
    expected = generate(ref, height=700, width=1000, output_type="latent")
    with caplog.at_level("WARNING"):
        got = generate(our_t2i_pipeline, height=700, width=1000, output_type="latent")
    assert got.shape == expected.shape == (1, 1, 112, 144, 16)  # 896x1152, the nearest aspect ratio
    assert_close(got, expected, FORWARD_REORDER)
    assert "700x1000" in caplog.text and "896x1152" in caplog.text


def test_t2i_pil_output_is_the_np_output_rounded(our_t2i_pipeline):
    array = generate(our_t2i_pipeline, output_type="np")
    images = generate(our_t2i_pipeline, output_type="pil")
    assert isinstance(images, list) and len(images) == 1 and images[0].size == (1024, 1024)
    assert np.array_equal(np.asarray(images[0]), (array[0] * 255).round().astype(np.uint8))


def test_auto_pipeline_picks_the_image_classes(reference_t2i_checkpoint, reference_i2i_checkpoint):
    assert type(Kandinsky5Pipeline.from_pretrained(reference_t2i_checkpoint[0])) is Kandinsky5T2IPipeline
    assert type(Kandinsky5Pipeline.from_pretrained(reference_i2i_checkpoint[0])) is Kandinsky5I2IPipeline


# ------------------------------------------------------------------ editing


@pytest.mark.parametrize("guidance_scale", [3.5, 1.0])
def test_i2i_images_equal_batch_1(our_i2i_pipeline, reference_i2i_checkpoint, guidance_scale):
    _, ref = reference_i2i_checkpoint
    image = source_image()
    args = dict(prompt=EDIT_PROMPT, guidance_scale=guidance_scale, output_type="np")
    expected = generate(ref, image, **args)  # the size from the image: 640x400 snaps to 768x1280
    got = generate(our_i2i_pipeline, image, **args)
    assert got.shape == expected.shape == (1, 768, 1280, 3)
    assert_close(got, expected, PIPELINE)
    assert expected.std() > 0.01


def test_i2i_two_images_per_prompt_equal_diffusers_batch_of_repeats(our_i2i_pipeline, reference_i2i_checkpoint):
    """diffusers' editing pipeline fails with num_images_per_prompt > 1 (its image latents keep the image batch: a
    RuntimeError in torch.cat);
    ours gives each output its own draw of the image's posterior, which is diffusers' run of the prompt and image
    repeated."""
    _, ref = reference_i2i_checkpoint
    image = source_image()
    args = dict(height=1024, width=1024, output_type="pt")
    expected = generate(ref, [image, image], prompt=[EDIT_PROMPT] * 2, **args)
    got = generate(our_i2i_pipeline, image, prompt=EDIT_PROMPT, num_images_per_prompt=2, **args)
    assert got.shape == expected.shape == (2, 3, 1024, 1024)
    assert_close(got, expected, PIPELINE)


def test_i2i_latents_equal(our_i2i_pipeline, reference_i2i_checkpoint):
    _, ref = reference_i2i_checkpoint
    image = source_image()
    expected = generate(ref, image, prompt=EDIT_PROMPT, height=1024, width=1024, output_type="latent")
    got = generate(our_i2i_pipeline, image, prompt=EDIT_PROMPT, height=1024, width=1024, output_type="latent")
    assert got.shape == expected.shape == (1, 1, 128, 128, 16)
    assert_close(got, expected, FORWARD_REORDER)


def test_edit_prompt_encoding_sees_the_image_as_diffusers(our_i2i_pipeline, reference_i2i_checkpoint):
    """Qwen2.5-VL's input for the editing model: the template around the prompt, the source image at half size
    through the real image processor configuration into the vision tower; the same crop."""
    _, ref = reference_i2i_checkpoint
    image = source_image()
    assert our_i2i_pipeline.prompt_template_encode_start_idx == ref.prompt_template_encode_start_idx == 54
    expected = ref.encode_prompt([EDIT_PROMPT, "add a hat"], image=[image, image.rotate(90)], max_sequence_length=1024)
    got = our_i2i_pipeline.encode_prompt([EDIT_PROMPT, "add a hat"], [image, image.rotate(90)])
    for got_part, expected_part in zip(got, expected, strict=True):
        assert got_part.shape == expected_part.shape
        assert_close(got_part, expected_part, SAME_KERNEL)  # transformers' code on the same inputs
    # the vision tower's output is in there: another image changes the embeddings
    other = our_i2i_pipeline.encode_prompt(EDIT_PROMPT, image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT))
    assert (other[0] - got[0][:1, : other[0].shape[1]]).abs().max() > 1e-4


def test_t2i_prompt_crop_is_derived_from_the_tokenizer(our_t2i_pipeline, reference_t2i_checkpoint):
    assert (
        our_t2i_pipeline.prompt_template_encode_start_idx
        == reference_t2i_checkpoint[1].prompt_template_encode_start_idx
    )
    expected = reference_t2i_checkpoint[1].encode_prompt([PROMPT, "a fox"])
    got = our_t2i_pipeline.encode_prompt([PROMPT, "a fox"])
    for got_part, expected_part in zip(got, expected, strict=True):
        assert_close(got_part, expected_part, SAME_KERNEL)


# ------------------------------------------------------------------ the 2D VAE of a saved checkpoint


def test_vae_encode_and_decode_equal(reference_i2i_checkpoint):
    folder, ref = reference_i2i_checkpoint
    ours = load_component(AutoencoderKL2D, folder / "vae", None).eval()
    pixels = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected_posterior = ref.vae.encode(pixels).latent_dist
        got_posterior = ours.encode(pixels).latent_dist
        assert_close(got_posterior.mean, expected_posterior.mean, VAE)
        assert_close(got_posterior.std, expected_posterior.std, VAE)
        latents = expected_posterior.mean
        assert_close(ours.decode(latents).sample, ref.vae.decode(latents).sample, VAE)
