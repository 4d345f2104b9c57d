"""The variant registry: every official checkpoint, found by id, short name or folder, and its defaults reaching
the pipeline call (steps, guidance as transformer calls per step, size, frames, RoPE class)."""

import dataclasses
import json
import logging
import shutil

import PIL.Image
import pytest
from conftest import NABLA_ATTENTION, REFERENCE_DIR

from kandinsky5 import Kandinsky5I2VPipeline, Kandinsky5Pipeline, Kandinsky5T2VPipeline, resolutions
from kandinsky5.loading.diffusers_format import CheckpointError
from kandinsky5.pipelines import base
from kandinsky5.resolutions import rope_scale_factor
from kandinsky5.variants import (
    REFERENCE_DEFAULTS,
    VARIANTS,
    AttentionType,
    CheckpointFacts,
    Task,
    find_variant,
    generation_defaults,
    get_variant,
    variant_for_folder,
)

OFFICIAL_IDS = {
    *(
        f"kandinskylab/Kandinsky-5.0-T2V-Lite-{kind}-{seconds}-Diffusers"
        for kind in ("sft", "pretrain", "nocfg", "distilled16steps")
        for seconds in ("5s", "10s")
    ),
    "kandinskylab/Kandinsky-5.0-T2V-Pro-sft-5s-Diffusers",
    "kandinskylab/Kandinsky-5.0-T2V-Pro-sft-10s-Diffusers",
    "kandinskylab/Kandinsky-5.0-I2V-Pro-sft-5s-Diffusers",
    "kandinskylab/Kandinsky-5.0-I2V-Lite-5s-Diffusers",
    *(
        f"kandinskylab/Kandinsky-5.0-{task}-Lite-{kind}-Diffusers"
        for task in ("T2I", "I2I")
        for kind in ("sft", "pretrain")
    ),
}
VIDEO_VARIANTS = [v for v in VARIANTS if not v.makes_images]
# The pipeline's latents are made this small whatever size the call asks for (128 px: whole NABLA tiles).
SMALL_LATENT_CALL = dict(height=128, width=128, num_frames=1)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(resolutions, "_warned_untrained", set())


@pytest.fixture
def tokenizers(our_pipeline):
    """The real tokenizers, loaded once: loading them dominates a tiny pipeline's from_pretrained."""
    return dict(tokenizer=our_pipeline.tokenizer, tokenizer_2=our_pipeline.tokenizer_2)


def test_registry_holds_every_official_checkpoint():
    assert {v.repo_id for v in VARIANTS} == OFFICIAL_IDS
    assert len({v.short_name for v in VARIANTS}) == len(VARIANTS)


@pytest.mark.parametrize(
    "short_name,steps,guidance,size,frames,attention",
    [
        ("lite-sft-5s", 50, 5.0, (512, 768), 121, "dense"),
        ("lite-sft-10s", 50, 5.0, (512, 768), 241, "nabla"),
        ("lite-pretrain-5s", 50, 5.0, (512, 768), 121, "dense"),
        ("lite-pretrain-10s", 50, 5.0, (512, 768), 241, "nabla"),
        ("lite-nocfg-5s", 50, 1.0, (512, 768), 121, "dense"),
        ("lite-nocfg-10s", 50, 1.0, (512, 768), 241, "nabla"),
        ("lite-distilled-5s", 16, 1.0, (512, 768), 121, "dense"),
        ("lite-distilled-10s", 16, 1.0, (512, 768), 241, "nabla"),
        ("pro-sft-5s", 50, 5.0, (768, 1280), 121, "nabla"),
        ("pro-sft-10s", 50, 5.0, (768, 1280), 241, "nabla"),
        ("pro-i2v-5s", 50, 5.0, (768, 1280), 121, "nabla"),
        ("lite-i2v-5s", 50, 5.0, (512, 768), 121, "dense"),
    ],
)
def test_registry_defaults(short_name, steps, guidance, size, frames, attention):
    v = get_variant(short_name)
    d = v.defaults
    assert (d.num_inference_steps, d.guidance_scale, (d.height, d.width), d.num_frames) == (
        steps,
        guidance,
        size,
        frames,
    )
    assert v.attention == attention and v.fps == 24 and v.scheduler_shift == 5.0
    assert v.model_calls_per_step == (2 if guidance > 1 else 1)
    assert (d.height, d.width) in v.resolution_class.sizes
    assert v.resolution_class.name == ("1024" if short_name.startswith("pro") else "512")


def test_lookup_by_id_short_name_and_alias():
    lite = get_variant("lite-sft-5s")
    assert find_variant("kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers") is lite
    assert find_variant("KANDINSKYLAB/kandinsky-5.0-t2v-lite-sft-5s-diffusers") is lite
    assert find_variant("ai-forever/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers") is lite  # the former owner
    assert find_variant("lite-t2v-sft-5s") is lite  # the MagCache table's key
    assert find_variant("lite-distilled16steps-5s") is find_variant("lite-distilled-5s")
    assert find_variant("pro-i2v-sft-5s").repo_id == "kandinskylab/Kandinsky-5.0-I2V-Pro-sft-5s-Diffusers"
    assert find_variant("someone/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers") is None
    assert find_variant("kandinskylab/lite-sft-5s") is None
    assert find_variant("lite-sft-7s") is None and find_variant(None) is None
    with pytest.raises(KeyError, match="lite-sft-5s"):
        get_variant("nope")


def test_generation_defaults_fall_back_to_the_reference():
    assert generation_defaults(None) == REFERENCE_DEFAULTS
    assert (REFERENCE_DEFAULTS.num_inference_steps, REFERENCE_DEFAULTS.guidance_scale) == (50, 5.0)
    assert (REFERENCE_DEFAULTS.height, REFERENCE_DEFAULTS.width, REFERENCE_DEFAULTS.num_frames) == (512, 768, 121)


def write_configs(folder, class_name="Kandinsky5T2VPipeline", model_dim=1792, attention_type="flash"):
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    config = {"model_dim": model_dim, "attention_type": attention_type}
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    return folder


def test_folder_named_after_a_variant(tmp_path):
    folder = write_configs(tmp_path / "Kandinsky-5.0-T2V-Lite-nocfg-5s-Diffusers", model_dim=64)
    assert variant_for_folder(folder) is get_variant("lite-nocfg-5s")  # sizes are not compared
    assert find_variant(str(folder)) is get_variant("lite-nocfg-5s")
    assert variant_for_folder(write_configs(tmp_path / "lite-distilled-5s")) is get_variant("lite-distilled-5s")


def test_hub_cache_snapshot_folder(tmp_path):
    cache_repo = tmp_path / "models--kandinskylab--Kandinsky-5.0-T2V-Pro-sft-10s-Diffusers"
    snapshot = write_configs(cache_repo / "snapshots" / "0123abcd", model_dim=4096, attention_type="nabla")
    assert variant_for_folder(snapshot) is get_variant("pro-sft-10s")


def test_folder_name_contradicted_by_configs_is_not_used(tmp_path, caplog):
    wrong_task = write_configs(tmp_path / "a" / "Kandinsky-5.0-I2V-Lite-5s-Diffusers")
    wrong_attention = write_configs(tmp_path / "b" / "Kandinsky-5.0-T2V-Lite-sft-10s-Diffusers")
    with caplog.at_level(logging.WARNING):
        assert variant_for_folder(wrong_task) is None
        assert variant_for_folder(wrong_attention) is None
    assert "Kandinsky5T2VPipeline" in caplog.text and "dense attention" in caplog.text


def test_folder_recognised_by_configs_only_when_unambiguous(tmp_path):
    lite_i2v = write_configs(tmp_path / "a", "Kandinsky5I2VPipeline", 1792, "flash")
    pro_i2v = write_configs(tmp_path / "b", "Kandinsky5I2VPipeline", 4096, "nabla")
    lite_t2v = write_configs(tmp_path / "c", "Kandinsky5T2VPipeline", 1792, "flash")  # sft, pretrain, nocfg, ...
    pro_t2v = write_configs(tmp_path / "d", "Kandinsky5T2VPipeline", 4096, "nabla")  # 5 s or 10 s
    assert variant_for_folder(lite_i2v) is get_variant("lite-i2v-5s")
    assert variant_for_folder(pro_i2v) is get_variant("pro-i2v-5s")
    assert variant_for_folder(lite_t2v) is None and variant_for_folder(pro_t2v) is None
    assert variant_for_folder(tmp_path / "missing") is None


def test_the_real_pro_configs_fit_both_pro_t2v_variants():
    # the folder is named checkpoint-pro-5s, and its configs fit the 5 s and the 10 s checkpoint alike
    assert variant_for_folder(REFERENCE_DIR / "checkpoint-pro-5s") is None
    facts = CheckpointFacts.read(REFERENCE_DIR / "checkpoint-pro-5s")
    assert facts.task is Task.TEXT_TO_VIDEO and facts.attention is AttentionType.NABLA
    assert {v.short_name for v in VARIANTS if facts.fits(v)} == {"pro-sft-5s", "pro-sft-10s"}


def checkpoint_as(variant, tmp_path, t2v_folder, i2v_folder):
    """A copy of a tiny checkpoint in a folder named after ``variant``, its attention type made to agree."""
    source = i2v_folder if variant.task is Task.IMAGE_TO_VIDEO else t2v_folder
    folder = tmp_path / variant.repo_name
    shutil.copytree(source, folder)
    if variant.attention is AttentionType.NABLA:
        config_path = folder / "transformer" / "config.json"
        config_path.write_text(json.dumps(json.loads(config_path.read_text()) | NABLA_ATTENTION))
    return folder


class CallSpy:
    """Records what a pipeline call uses: steps, the size and frames asked of prepare_latents, transformer calls
    in the first step and their RoPE scale. The latents are made small and the call stops after one step."""

    def __init__(self, pipe, monkeypatch):
        self.steps = None
        self.latent_request = None
        self.scale_factors = []
        self.calls_in_first_step = None
        self.guidance_scale = None
        set_timesteps, prepare_latents = type(pipe.scheduler).set_timesteps, pipe._prepare_latents
        prepare_condition, forward = pipe.prepare_condition, pipe.transformer.forward

        def spy_set_timesteps(scheduler, num_inference_steps, device=None):
            self.steps = num_inference_steps
            return set_timesteps(scheduler, num_inference_steps, device=device)

        def spy_prepare_latents(batch, channels, height, width, num_frames, *args):
            self.latent_request = (height, width, num_frames)
            small = SMALL_LATENT_CALL
            return prepare_latents(batch, channels, small["height"], small["width"], small["num_frames"], *args)

        def spy_prepare_condition(latents, request, control):
            return prepare_condition(latents, dataclasses.replace(request, **SMALL_LATENT_CALL), control)

        def spy_forward(*args, **kwargs):
            self.scale_factors.append(kwargs["scale_factor"])
            return forward(*args, **kwargs)

        # on the class: each call steps a copy of the pipeline's scheduler
        monkeypatch.setattr(type(pipe.scheduler), "set_timesteps", spy_set_timesteps)
        monkeypatch.setattr(pipe, "_prepare_latents", spy_prepare_latents)
        monkeypatch.setattr(pipe, "prepare_condition", spy_prepare_condition)
        monkeypatch.setattr(pipe.transformer, "forward", spy_forward)

    def stop_after_first_step(self, pipe, step, timestep, tensors):
        self.calls_in_first_step = len(self.scale_factors)
        self.guidance_scale = pipe.guidance_scale  # the running call's (nothing of a call stays on the pipeline)
        pipe.interrupt = True  # the remaining steps are skipped
        return tensors


def call_with_defaults(pipe, spy, image=None):
    condition = () if image is None else (image,)
    pipe(*condition, prompt="a red fox", output_type="latent", callback_on_step_end=spy.stop_after_first_step)


@pytest.mark.parametrize("variant", VIDEO_VARIANTS, ids=[v.short_name for v in VIDEO_VARIANTS])
def test_variant_defaults_reach_the_pipeline_call(
    variant, tmp_path, monkeypatch, reference_checkpoint, reference_i2v_checkpoint, tokenizers
):
    folder = checkpoint_as(variant, tmp_path, reference_checkpoint[0], reference_i2v_checkpoint[0])
    image_to_video = variant.task is Task.IMAGE_TO_VIDEO
    pipe = (Kandinsky5I2VPipeline if image_to_video else Kandinsky5T2VPipeline).from_pretrained(folder, **tokenizers)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.model_variant is variant
    spy = CallSpy(pipe, monkeypatch)
    call_with_defaults(pipe, spy, PIL.Image.new("RGB", (96, 64), "red") if image_to_video else None)
    d = variant.defaults
    assert spy.steps == d.num_inference_steps
    assert spy.latent_request == (d.height, d.width, d.num_frames)
    assert spy.calls_in_first_step == variant.model_calls_per_step  # guidance 1.0: no negative-prompt call
    assert spy.scale_factors[0] == rope_scale_factor(d.height, d.width)
    assert spy.guidance_scale == d.guidance_scale


def test_unknown_checkpoint_uses_the_reference_defaults(our_pipeline, monkeypatch):
    assert our_pipeline.model_variant is None
    spy = CallSpy(our_pipeline, monkeypatch)
    call_with_defaults(our_pipeline, spy)
    assert spy.steps == 50 and spy.latent_request == (512, 768, 121) and spy.calls_in_first_step == 2


def test_explicit_arguments_override_the_variant(our_pipeline, monkeypatch):
    monkeypatch.setattr(our_pipeline, "model_variant", get_variant("lite-distilled-10s"))
    spy = CallSpy(our_pipeline, monkeypatch)
    our_pipeline(
        prompt="a red fox",
        height=256,
        width=256,
        num_inference_steps=3,
        guidance_scale=4.0,
        output_type="latent",
        callback_on_step_end=spy.stop_after_first_step,
    )
    assert spy.steps == 3 and spy.latent_request == (256, 256, 241) and spy.calls_in_first_step == 2


def test_hub_id_sets_the_variant(reference_checkpoint, monkeypatch, tokenizers):
    monkeypatch.setattr(base, "resolve_checkpoint", lambda *args: reference_checkpoint[0])
    hub_id = "kandinskylab/Kandinsky-5.0-T2V-Lite-nocfg-5s-Diffusers"
    pipe = Kandinsky5T2VPipeline.from_pretrained(hub_id, **tokenizers)
    assert pipe.model_variant is get_variant("lite-nocfg-5s")


def test_auto_pipeline_sets_the_variant(reference_i2v_checkpoint, tmp_path, tokenizers):
    folder = shutil.copytree(reference_i2v_checkpoint[0], tmp_path / "Kandinsky-5.0-I2V-Lite-5s-Diffusers")
    pipe = Kandinsky5Pipeline.from_pretrained(folder, **tokenizers)
    assert isinstance(pipe, Kandinsky5I2VPipeline) and pipe.model_variant is get_variant("lite-i2v-5s")


def test_missing_scheduler_config_falls_back_to_the_variant_shift(reference_checkpoint, tmp_path, tokenizers):
    named = shutil.copytree(reference_checkpoint[0], tmp_path / "Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers")
    shutil.rmtree(named / "scheduler")
    pipe = Kandinsky5T2VPipeline.from_pretrained(named, **tokenizers)
    assert pipe.scheduler.shift == get_variant("lite-sft-5s").scheduler_shift == 5.0
    unnamed = shutil.copytree(named, tmp_path / "my-model")
    with pytest.raises(CheckpointError, match="scheduler_config.json"):
        Kandinsky5T2VPipeline.from_pretrained(unnamed, **tokenizers)


def test_call_signature_defaults_follow_the_variant():
    """``image`` comes first for image-to-video (then the shared parameters, positionally or by name); the shared
    size and schedule parameters default to ``None``, which the variant fills."""
    import inspect

    assert list(inspect.signature(Kandinsky5I2VPipeline.__call__).parameters)[1] == "image"
    parameters = inspect.signature(Kandinsky5T2VPipeline.__call__).parameters
    for name in ("height", "width", "num_frames", "num_inference_steps", "guidance_scale"):
        assert parameters[name].default is None
