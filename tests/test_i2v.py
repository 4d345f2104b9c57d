"""Image-to-video against diffusers 0.42.1's Kandinsky5I2VPipeline on a tiny random checkpoint (float32, CPU),
image input formats and validation, and choosing the pipeline class from model_index.json."""

import numpy as np
import PIL.Image
import pytest
import torch
from tolerances import PIPELINE_BF16_FLIP, assert_close

from kandinsky5 import Kandinsky5I2VPipeline, Kandinsky5Pipeline, Kandinsky5T2VPipeline
from kandinsky5.loading.diffusers_format import CheckpointError

PROMPT = "An astronaut floating in space with Earth in the background, cinematic shot"
# 17 frames = 5 latent frames: the first four are re-normalised to the fifth's statistics before decoding
SMALL = dict(height=32, width=48, num_frames=17, num_inference_steps=3)
LATENT_CHANNELS = 16


def random_image(height: int, width: int, seed: int) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


SQUARE_IMAGE = random_image(40, 40, seed=1)
WIDE_IMAGE = random_image(30, 70, seed=2)
# already at the video size: no resizing, so every input format gives the same pixels
VIDEO_SIZED_IMAGE = random_image(SMALL["height"], SMALL["width"], seed=3)


def run(pipe, image, seed=0, **kwargs):
    args = dict(SMALL, prompt=PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np")
    args.update(kwargs)
    return pipe(image=image, **args).frames


def max_difference(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# ---------------------------------------------------------------- parity with the reference
# The DiT is conditioned on the image's VAE encode, which sums in another order than the reference's (tolerances.VAE);
# that can round rotated queries and keys to bfloat16 differently, so outputs agree within PIPELINE_BF16_FLIP.


@pytest.mark.parametrize("num_videos_per_prompt", [1, 2])
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
@pytest.mark.parametrize("image", [SQUARE_IMAGE, WIDE_IMAGE], ids=["square", "wide"])
def test_frames_equal(our_i2v_pipeline, reference_i2v_checkpoint, image, guidance_scale, num_videos_per_prompt):
    _, ref = reference_i2v_checkpoint
    kwargs = dict(guidance_scale=guidance_scale, num_videos_per_prompt=num_videos_per_prompt)
    expected = run(ref, image, **kwargs)
    got = run(our_i2v_pipeline, image, **kwargs)
    assert got.shape == expected.shape == (num_videos_per_prompt, 17, 32, 48, 3)
    assert_close(got, expected, PIPELINE_BF16_FLIP)
    assert expected.std() > 0.01  # a real picture, not a constant
    if num_videos_per_prompt == 2:
        assert max_difference(got[0], got[1]) > 1e-3  # two different videos


def test_latents_equal_including_renormalised_leading_frames(our_i2v_pipeline, reference_i2v_checkpoint):
    _, ref = reference_i2v_checkpoint
    expected = run(ref, WIDE_IMAGE, output_type="latent")
    got = run(our_i2v_pipeline, WIDE_IMAGE, output_type="latent")
    assert got.shape == expected.shape == (1, 5, 4, 6, LATENT_CHANNELS)
    assert_close(got, expected, PIPELINE_BF16_FLIP)


def test_frames_equal_one_image_per_prompt(our_i2v_pipeline, reference_i2v_checkpoint):
    _, ref = reference_i2v_checkpoint
    # prompts of equal token length: the reference lets tokens attend to padding (see README)
    kwargs = dict(prompt=["A red fox in snow", "A blue car on ice"], guidance_scale=1.0)
    expected = run(ref, [SQUARE_IMAGE, WIDE_IMAGE], **kwargs)
    got = run(our_i2v_pipeline, [SQUARE_IMAGE, WIDE_IMAGE], **kwargs)
    assert got.shape == (2, 17, 32, 48, 3)
    assert_close(got, expected, PIPELINE_BF16_FLIP)


def test_frames_equal_with_a_generator_per_video(our_i2v_pipeline, reference_i2v_checkpoint):
    _, ref = reference_i2v_checkpoint

    def generators():
        return [torch.Generator().manual_seed(seed) for seed in (3, 4)]

    kwargs = dict(num_videos_per_prompt=2, guidance_scale=1.0)
    expected = run(ref, SQUARE_IMAGE, generator=generators(), **kwargs)
    got = run(our_i2v_pipeline, SQUARE_IMAGE, generator=generators(), **kwargs)
    assert_close(got, expected, PIPELINE_BF16_FLIP)


def test_full_width_latents_are_used_as_given(our_i2v_pipeline, reference_i2v_checkpoint):
    """As the reference: caller latents with every channel are not conditioned again (the image is not encoded)."""
    _, ref = reference_i2v_checkpoint
    full_width = 2 * LATENT_CHANNELS + 1
    latents = torch.randn((1, 5, 4, 6, full_width), generator=torch.Generator().manual_seed(5))
    expected = run(ref, SQUARE_IMAGE, latents=latents.clone(), guidance_scale=1.0)  # the reference writes into it
    before = latents.clone()
    got = run(our_i2v_pipeline, SQUARE_IMAGE, latents=latents, guidance_scale=1.0)
    assert_close(got, expected, PIPELINE_BF16_FLIP)
    assert torch.equal(latents, before)


# ---------------------------------------------------------------- conditioning


def test_noise_only_latents_get_the_image(our_i2v_pipeline):
    """Noise channels given: the image still fills frame 0, sampled after the noise as without ``latents``."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((1, 5, 4, 6, LATENT_CHANNELS), generator=generator)
    expected = run(our_i2v_pipeline, SQUARE_IMAGE, guidance_scale=1.0)
    got = run(our_i2v_pipeline, SQUARE_IMAGE, latents=noise, generator=generator, guidance_scale=1.0)
    assert max_difference(got, expected) == 0


def test_first_latent_frame_fixed_and_masked(our_i2v_pipeline):
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append(tensors["latents"].clone())
        return {}

    run(our_i2v_pipeline, SQUARE_IMAGE, guidance_scale=1.0, callback_on_step_end=callback, output_type="latent")
    first, last = seen[0], seen[-1]
    assert torch.equal(first[:, 0], last[:, 0])  # the image's frame: never stepped
    assert not torch.allclose(first[:, 1:, ..., :LATENT_CHANNELS], last[:, 1:, ..., :LATENT_CHANNELS])
    mask = last[..., -1]
    assert torch.all(mask[:, 0] == 1) and torch.all(mask[:, 1:] == 0)
    assert torch.all(last[..., LATENT_CHANNELS:-1] == 0)  # visual_cond channels stay zero


def test_video_depends_on_the_image(our_i2v_pipeline):
    assert max_difference(run(our_i2v_pipeline, SQUARE_IMAGE), run(our_i2v_pipeline, WIDE_IMAGE)) > 1e-3


def test_short_videos_skip_the_renormalisation(our_i2v_pipeline):
    """At most 4 latent frames leave no frames to normalise to: the reference returns NaN (or fails); we skip."""
    for num_frames in (1, 5):
        frames = run(our_i2v_pipeline, SQUARE_IMAGE, num_frames=num_frames, guidance_scale=1.0)
        assert frames.shape[1] == num_frames and np.isfinite(frames).all()


# ---------------------------------------------------------------- image formats


def test_pil_numpy_and_tensor_images_give_the_same_video(our_i2v_pipeline):
    pixels = np.asarray(VIDEO_SIZED_IMAGE)
    unit = pixels.astype(np.float32) / 255.0
    tensor = torch.from_numpy(unit).permute(2, 0, 1)
    expected = run(our_i2v_pipeline, VIDEO_SIZED_IMAGE, guidance_scale=1.0)
    for image in (unit, pixels, tensor, tensor[None], [tensor], 2 * tensor - 1):
        assert max_difference(run(our_i2v_pipeline, image, guidance_scale=1.0), expected) == 0


def test_non_rgb_pil_image_is_converted(our_i2v_pipeline):
    rgba = VIDEO_SIZED_IMAGE.convert("RGBA")
    expected = run(our_i2v_pipeline, VIDEO_SIZED_IMAGE, guidance_scale=1.0)
    assert max_difference(run(our_i2v_pipeline, rgba, guidance_scale=1.0), expected) == 0


# ---------------------------------------------------------------- validation before any work


@pytest.fixture
def no_model_runs(our_i2v_pipeline, monkeypatch):
    """The pipeline with its text encoders, transformer and VAE encoder made to fail if used."""

    def fail(*args, **kwargs):
        raise AssertionError("a model ran before the image was validated")

    for module in (our_i2v_pipeline.text_encoder, our_i2v_pipeline.text_encoder_2, our_i2v_pipeline.transformer):
        monkeypatch.setattr(module, "forward", fail)
    monkeypatch.setattr(our_i2v_pipeline.vae, "encode", fail)
    return our_i2v_pipeline


INVALID_IMAGES = {
    "none": None,
    "path string": "cat.png",
    "empty list": [],
    "mixed list": [VIDEO_SIZED_IMAGE, np.zeros((32, 48, 3), dtype=np.float32)],
    "grayscale array": np.zeros((32, 48), dtype=np.float32),
    "four channels": np.zeros((32, 48, 4), dtype=np.float32),
    "channels-last tensor": torch.zeros(32, 48, 3),
    "0..255 floats": torch.full((3, 32, 48), 255.0),
    "nan": torch.full((3, 32, 48), float("nan")),
    "int64 array": np.zeros((32, 48, 3), dtype=np.int64),
    "too many images": [VIDEO_SIZED_IMAGE] * 3,
    # 100 million pixels (a broadcast view: no memory), beyond PIL's decompression-bomb threshold
    "too large": np.broadcast_to(np.zeros(3, dtype=np.uint8), (10_000, 10_000, 3)),
}


@pytest.mark.parametrize("image", INVALID_IMAGES.values(), ids=INVALID_IMAGES.keys())
def test_invalid_image_raises_before_any_model_runs(no_model_runs, image):
    with pytest.raises(ValueError, match="`image`"):
        no_model_runs(image, prompt=["A red fox in snow", "A blue car on ice"], **SMALL)


def test_missing_image_raises(no_model_runs):
    with pytest.raises(ValueError, match="`image`"):
        no_model_runs(prompt=PROMPT, **SMALL)


def test_unknown_argument_still_a_type_error(no_model_runs):
    with pytest.raises(TypeError, match="mask_image"):
        no_model_runs(VIDEO_SIZED_IMAGE, prompt=PROMPT, mask_image=VIDEO_SIZED_IMAGE, **SMALL)


# ---------------------------------------------------------------- choosing the class


def test_auto_pipeline_picks_the_class(reference_i2v_checkpoint, reference_checkpoint):
    assert type(Kandinsky5Pipeline.from_pretrained(reference_i2v_checkpoint[0])) is Kandinsky5I2VPipeline
    assert type(Kandinsky5Pipeline.from_pretrained(reference_checkpoint[0])) is Kandinsky5T2VPipeline


def test_auto_pipeline_passes_components_and_checks_arguments(reference_i2v_checkpoint, our_i2v_pipeline):
    pipe = Kandinsky5Pipeline.from_pretrained(reference_i2v_checkpoint[0], vae=our_i2v_pipeline.vae)
    assert pipe.vae is our_i2v_pipeline.vae
    with pytest.raises(TypeError, match="vea"):
        Kandinsky5Pipeline.from_pretrained("no/such-repo", vea=None)
    with pytest.raises(TypeError, match="from_pretrained"):
        Kandinsky5Pipeline()


def test_text_to_video_class_refuses_image_to_video_checkpoint(reference_i2v_checkpoint):
    with pytest.raises(CheckpointError, match="Kandinsky5I2VPipeline") as error:
        Kandinsky5T2VPipeline.from_pretrained(reference_i2v_checkpoint[0])
    assert "Kandinsky5Pipeline" in str(error.value)


def test_image_to_video_class_refuses_text_to_video_checkpoint(reference_checkpoint):
    with pytest.raises(CheckpointError, match="Kandinsky5T2VPipeline") as error:
        Kandinsky5I2VPipeline.from_pretrained(reference_checkpoint[0])
    assert "Kandinsky5Pipeline" in str(error.value)


def test_auto_pipeline_names_unsupported_class(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "Kandinsky5V2VPipeline"}')
    with pytest.raises(CheckpointError, match="Kandinsky5V2VPipeline"):
        Kandinsky5Pipeline.from_pretrained(tmp_path)
