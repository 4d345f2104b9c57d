"""One request object: the pipeline and the command line reject the same bad values with the same message, before
any work (the pipeline's encoders and transformer, the command line's loading, are made to fail if reached)."""

import pytest
import torch

from kandinsky5.cli.main import main
from kandinsky5.pipelines import base
from kandinsky5.pipelines.request import GenerationRequest, ModelFacts, RequestError
from kandinsky5.variants import REFERENCE_DEFAULTS, Task, get_variant

GOOD = dict(prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=2, output_type="latent")
GOOD_FLAGS = ["--height", "32", "--width", "48", "--frames", "5", "--steps", "2", "--no-progress"]

# (parameter, its bad value, the command-line option that sets it)
BAD_VALUES = [
    ("height", 30, "--height"),
    ("width", 50, "--width"),
    ("height", 2064, "--height"),  # beyond the reference's RoPE table
    ("num_frames", 0, "--frames"),
    ("num_frames", 601, "--frames"),
    ("num_inference_steps", 0, "--steps"),
    ("max_sequence_length", 0, "--max-sequence-length"),
    ("max_sequence_length", 1025, "--max-sequence-length"),
    ("guidance_scale", float("nan"), "--guidance"),
    ("guidance_scale", float("inf"), "--guidance"),
    ("num_inference_steps", -3, "--steps"),
]


def forbidden(*args, **kwargs):
    raise AssertionError("expensive work started before the input was validated")


@pytest.mark.parametrize("parameter,value,option", BAD_VALUES, ids=[f"{p}={v}" for p, v, _ in BAD_VALUES])
def test_pipeline_and_cli_reject_the_same_values(
    our_pipeline, reference_checkpoint, monkeypatch, tmp_path, capsys, parameter, value, option
):
    monkeypatch.setattr(our_pipeline, "encode_prompt", forbidden)
    monkeypatch.setattr(our_pipeline.transformer, "forward", forbidden)
    with pytest.raises(RequestError, match=parameter) as raised:
        our_pipeline(**dict(GOOD, **{parameter: value}))
    assert raised.value.parameter == parameter

    monkeypatch.setattr(base.Kandinsky5PipelineBase, "from_pretrained", classmethod(forbidden))
    flags = dict(zip(GOOD_FLAGS[:-1:2], GOOD_FLAGS[1::2], strict=True)) | {option: str(value)}
    argv = ["generate", "a cat", "--model", str(reference_checkpoint[0]), "--out", str(tmp_path / "v.mp4")]
    argv += [item for pair in flags.items() for item in pair] + ["--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kandinsky5: error: {option}: {raised.value}"


def test_build_fills_the_variant_defaults_and_rounds_frames(caplog):
    distilled = get_variant("lite-distilled-5s")
    request = GenerationRequest.build(ModelFacts(variant=distilled), prompt="a cat")
    assert (request.num_inference_steps, request.guidance_scale) == (16, 1.0)
    assert (request.height, request.width, request.num_frames) == (512, 768, 121)
    assert request.prompt == ["a cat"] and not request.uses_guidance
    reference = GenerationRequest.build(ModelFacts(), prompt=["a", "b"], num_frames=7, num_videos_per_prompt=2)
    assert reference.num_inference_steps == REFERENCE_DEFAULTS.num_inference_steps
    assert reference.num_frames == 5 and "num_frames" in caplog.text  # 7 -> 5, as the reference rounds
    assert (reference.batch_size, reference.num_videos) == (2, 4)
    assert reference.negative_prompts() == [reference.negative_prompts()[0]] * 2


def test_build_checks_the_model_facts():
    nabla = ModelFacts(nabla=True)
    with pytest.raises(RequestError, match="multiple of 128") as raised:
        GenerationRequest.build(nabla, prompt="a", height=512, width=720)
    assert raised.value.parameter == "width"
    with pytest.raises(RequestError, match="image"):
        GenerationRequest.build(ModelFacts(task=Task.IMAGE_TO_VIDEO), prompt="a")
    with pytest.raises(TypeError, match="image"):
        GenerationRequest.build(ModelFacts(), prompt="a", image=torch.zeros(3, 32, 32))
    with pytest.raises(TypeError, match="unexpected"):
        GenerationRequest.build(ModelFacts(), prompt="a", strength=0.5)
    with pytest.raises(RequestError, match="latents"):
        GenerationRequest.build(ModelFacts(), prompt="a", height=32, width=48, num_frames=5, latents=torch.zeros(1))
