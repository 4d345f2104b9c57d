"""The image pipelines through the engine's shared machinery, on the tiny diffusers-written checkpoints, on the CPU:
offload (model, sequential, block streaming with the editing model's vision tower on the device), MagCache with
the original's text-to-image ratios, LoRA against diffusers, low-bit weights, variants, and bad input.

Exact paths are compared bit for bit with the plain run (the same kernels on the same tensors); approximations
state their bound (MagCache: skipping changes the output; int8: test_quantization's bound)."""

from __future__ import annotations

import copy
import shutil

import PIL.Image
import pytest
import torch
from test_lora import TARGETS_A, make_peft_lora
from tolerances import FORWARD_REORDER, assert_close, relative_l2

from kandinsky5 import Kandinsky5I2IPipeline, Kandinsky5T2IPipeline
from kandinsky5.pipelines.request import RequestError
from kandinsky5.runtime.block_offload import TEXT_ENCODER_VISION
from kandinsky5.sampling.caches import official_ratios
from kandinsky5.variants import get_variant

EXECUTION = "cpu:0"  # a device distinct from the resting "cpu" (see test_offload.py)
STEPS = 2
LATENT_CALL = dict(prompt="A red fox in fresh snow", num_inference_steps=STEPS, output_type="latent")
# int8 weight-only quantization against full precision (tests/test_quantization.py derives it)
INT8_RELATIVE_L2 = 2e-2


def source_image() -> PIL.Image.Image:
    pixels = torch.linspace(0, 255, 96 * 64 * 3).reshape(64, 96, 3).to(torch.uint8).numpy()
    return PIL.Image.fromarray(pixels)


def run(pipe, *condition, **overrides):
    generator = torch.Generator().manual_seed(0)
    return pipe(*condition, **dict(LATENT_CALL, generator=generator, **overrides)).image


def fresh(pipe):
    """A copy of a shared pipeline with networks of its own (offloading and LoRA change them); the tokenizers and
    the image processor are shared (reading the real Qwen tokenizer takes seconds)."""
    networks = ("transformer", "vae", "text_encoder", "text_encoder_2")
    components = {name: copy.deepcopy(c) if name in networks else c for name, c in pipe.components.items()}
    if isinstance(pipe, Kandinsky5I2IPipeline):
        components["image_processor"] = pipe.qwen_image_processor
    copied = type(pipe)(**components)
    copied.set_progress_bar_config(disable=True)
    return copied


@pytest.fixture
def t2i(our_t2i_pipeline):
    """A text-to-image pipeline of our own."""
    return fresh(our_t2i_pipeline)


@pytest.fixture
def i2i(our_i2i_pipeline):
    return fresh(our_i2i_pipeline)


# ------------------------------------------------------------------ offload


@pytest.mark.parametrize("method", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_offload_keeps_the_edit(i2i, method):
    expected = run(i2i, source_image())
    getattr(i2i, method)(device=EXECUTION)
    assert torch.equal(run(i2i, source_image()), expected)


def test_block_offload_streams_and_keeps_the_vision_tower_on_the_device(i2i):
    expected = run(i2i, source_image())
    i2i.enable_block_offload(device=EXECUTION)
    plan = i2i._offload_plan
    vision = i2i.text_encoder.get_submodule(TEXT_ENCODER_VISION)
    resident = {id(m) for m in plan.streams["text_encoder"].resident}
    assert all(id(m) in resident for m in vision.modules())
    assert torch.equal(run(i2i, source_image()), expected)


def test_block_offload_of_text_to_image_leaves_the_vision_tower_home(t2i):
    expected = run(t2i)
    t2i.enable_block_offload(device=EXECUTION)
    vision = t2i.text_encoder.get_submodule(TEXT_ENCODER_VISION)
    resident = {id(m) for m in t2i._offload_plan.streams["text_encoder"].resident}
    assert not any(id(m) in resident for m in vision.modules())
    assert torch.equal(run(t2i), expected)


# ------------------------------------------------------------------ MagCache


def test_magcache_with_the_original_text_to_image_ratios(reference_t2i_checkpoint, our_t2i_pipeline, tmp_path):
    variant = get_variant("lite-t2i-sft")
    folder = shutil.copytree(reference_t2i_checkpoint[0], tmp_path / variant.repo_name)
    tokenizers = dict(tokenizer=our_t2i_pipeline.tokenizer, tokenizer_2=our_t2i_pipeline.tokenizer_2)
    pipe = Kandinsky5T2IPipeline.from_pretrained(folder, **tokenizers)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.model_variant is variant
    steps = dict(num_inference_steps=6)
    exact = run(pipe, **steps)
    cache = pipe.enable_magcache(threshold=0.0)  # never skips: the exact path
    assert torch.equal(run(pipe, **steps), exact) and cache.skipped_calls == 0
    cache = pipe.enable_magcache(threshold=10.0)  # skips wherever the rule allows
    approximate = run(pipe, **steps)
    assert 0 < cache.skipped_calls < cache.total_calls
    assert torch.isfinite(approximate).all() and not torch.equal(approximate, exact)
    with pytest.raises(ValueError, match="lite-edit-sft has no official MagCache ratios"):
        official_ratios(get_variant("lite-edit-sft"))


def test_calibration_measures_the_editing_model(i2i):
    from kandinsky5.sampling.caches import calibrate

    ratios = calibrate(i2i, ["make it red"], 3, image=source_image(), height=1024, width=1024)
    assert sorted(ratios) == ["condition", "negative"] and all(len(v) == 2 for v in ratios.values())
    assert all(0 < r < 10 for v in ratios.values() for r in v)


# ------------------------------------------------------------------ LoRA


def test_lora_equals_diffusers(t2i, reference_t2i_checkpoint, tmp_path):
    pytest.importorskip("peft", reason="PEFT makes the test LoRA (pip install -e '.[test]')")
    from diffusers import Kandinsky5T2IPipeline as DiffusersPipeline

    _, ref = reference_t2i_checkpoint
    tensors, config = make_peft_lora(ref.transformer, 4, 8, TARGETS_A, seed=13)
    DiffusersPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=tensors, transformer_lora_adapter_metadata=config.to_dict()
    )
    reference = DiffusersPipeline(**dict(ref.components, transformer=copy.deepcopy(ref.transformer)))
    reference.set_progress_bar_config(disable=True)
    base = run(t2i)
    for pipe in (reference, t2i):
        pipe.load_lora_weights(tmp_path / "pytorch_lora_weights.safetensors", adapter_name="a")
        pipe.set_adapters("a", 0.7)
    got = run(t2i)
    assert_close(got, run(reference), FORWARD_REORDER)
    assert (got - base).abs().max() > 1e3 * FORWARD_REORDER.bound(base)


# ------------------------------------------------------------------ low-bit weights


def test_int8_transformer_near_the_exact_image(t2i):
    pytest.importorskip("torchao")
    exact = run(t2i)
    t2i.quantize(transformer="int8")
    assert relative_l2(run(t2i), exact) < INT8_RELATIVE_L2


# ------------------------------------------------------------------ variants and defaults


def test_image_variants_and_their_defaults():
    t2i, edit = get_variant("lite-t2i-sft"), get_variant("kandinskylab/Kandinsky-5.0-I2I-Lite-sft-Diffusers")
    assert get_variant("lite-i2i-sft") is edit and edit.short_name == "lite-edit-sft"
    for variant in (t2i, edit, get_variant("lite-t2i-pretrain"), get_variant("lite-edit-pretrain")):
        d = variant.defaults
        assert (d.num_inference_steps, d.guidance_scale, d.height, d.width, d.num_frames) == (50, 3.5, 1024, 1024, 1)
        assert d.negative_prompt == "" and variant.makes_images and variant.model_dim == 2560
    assert t2i.defaults.max_sequence_length == 512 and edit.defaults.max_sequence_length == 1024


def test_unknown_image_checkpoint_takes_diffusers_defaults(t2i, monkeypatch):
    seen = {}

    def spy(request, control):
        seen.update(
            steps=request.num_inference_steps, size=(request.height, request.width), scale=request.guidance_scale
        )
        seen.update(negative=request.negative_prompt, length=request.max_sequence_length)
        raise RuntimeError("stop")

    monkeypatch.setattr(t2i, "_run", spy)
    with pytest.raises(RuntimeError, match="stop"):
        t2i(prompt="a fox")
    assert seen == dict(steps=50, size=(1024, 1024), scale=3.5, negative="", length=512)


# ------------------------------------------------------------------ bad input: one line naming the parameter


@pytest.mark.parametrize(
    ("arguments", "parameter"),
    [
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(height=-8), "height"),
        (dict(width=1.5), "width"),
        (dict(max_sequence_length=2000), "max_sequence_length"),
        (dict(output_type="gif"), "output_type"),
        (dict(prompt=" "), "prompt"),
        (dict(generator=[torch.Generator()] * 3), "generator"),
    ],
)
def test_bad_input_names_the_parameter_before_any_work(t2i, monkeypatch, arguments, parameter):
    monkeypatch.setattr(t2i, "_run", lambda *a: pytest.fail("work started"))
    with pytest.raises(RequestError) as raised:
        t2i(**{"prompt": "a fox", **arguments})
    assert raised.value.parameter == parameter and "\n" not in str(raised.value)
    assert parameter in str(raised.value)


def test_image_models_take_no_video_arguments_and_no_image_for_text_to_image(t2i):
    with pytest.raises(TypeError):
        t2i(prompt="a fox", num_frames=5)
    with pytest.raises(TypeError, match="text-to-image"):
        t2i(prompt="a fox", image=source_image())
    with pytest.raises(RequestError, match="expand_prompt"):
        t2i(prompt="a fox", expand_prompt=True)


def test_editing_needs_a_valid_image(i2i, monkeypatch):
    monkeypatch.setattr(i2i, "_run", lambda *a: pytest.fail("work started"))
    for image, message in ((None, "required"), ([], "empty"), ("photo.png", "expected a PIL image")):
        with pytest.raises(RequestError, match=message) as raised:
            i2i(image, prompt="make it red")
        assert raised.value.parameter == "image"
    with pytest.raises(RequestError, match="2 prompts"):
        i2i([source_image()] * 3, prompt=["a", "b"])


def test_editing_takes_the_size_of_the_image_snapped(i2i, monkeypatch, caplog):
    seen = {}
    monkeypatch.setattr(i2i, "_run", lambda request, control: seen.update(size=(request.height, request.width)))
    with caplog.at_level("WARNING"):
        i2i(source_image(), prompt="make it red")  # 64x96: width / height 1.5, nearest 1280 / 768
    assert seen["size"] == (768, 1280)
    assert "not one of the image model's resolutions" in caplog.text


def test_an_image_too_large_for_the_sequence_is_refused_in_one_line(i2i):
    with pytest.raises(ValueError, match="max_sequence_length") as raised:
        i2i.encode_prompt("make it red", PIL.Image.new("RGB", (2048, 2048)), max_sequence_length=256)
    assert "\n" not in str(raised.value)


# ------------------------------------------------------------------ run control


def test_previews_events_and_cancel(t2i):
    from kandinsky5 import GenerationCancelled, RunControl
    from kandinsky5.sampling.control import Phase

    previews, phases = [], []
    control = RunControl(on_preview=lambda step, frames: previews.append(frames), preview_every=1)
    control.add_listener(lambda event: phases.append(event.phase))
    run(t2i, control=control)
    # one preview per step: uint8 RGB of the latent grid (the 2D VAE linearised), one frame
    assert len(previews) == STEPS and previews[0].shape == (1, 1, 128, 128, 3) and previews[0].dtype.name == "uint8"
    assert {Phase.ENCODE_TEXT, Phase.DENOISE} <= set(phases)
    control = RunControl()
    control.add_listener(lambda event: control.cancel() if event.phase is Phase.DENOISE else None)
    with pytest.raises(GenerationCancelled):
        run(t2i, control=control)


def test_a_long_edit_prompt_is_cut_to_fit_with_its_image(i2i, caplog):
    length = 64
    with caplog.at_level("WARNING"):
        embeds, _, cu_seqlens = i2i.encode_prompt("red " * 200, source_image(), max_sequence_length=length)
    assert "characters were cut" in caplog.text
    # the prompt was cut, not the image's tokens (transformers would refuse a partial image)
    assert embeds.shape[1] <= length and int(cu_seqlens[-1]) == embeds.shape[1]
