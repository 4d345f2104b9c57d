"""Low-bit weights: a transform of the DiT and of the Qwen2.5-VL text encoder applied from outside the networks.

Modes:

- transformer ``"int8"``: int8 weights with one scale per output row (torchao's ``Int8WeightOnlyConfig``); the
  activations stay in the compute dtype. About half the memory of bfloat16 weights; runs anywhere.
- transformer ``"fp8"``: float8 (e4m3) weights and dynamically quantized float8 activations, both with one scale per
  row (torchao's ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``); the matrix multiplies run on
  FP8 matrix units, so on CUDA it needs compute capability 8.9 (Ada, Hopper) or later. The CPU runs it slowly
  (``torch._scaled_mm``), which the tests use. Needs a bfloat16 transformer.
- text encoder ``"int8"``: as the transformer's, on the language model's decoder layers.
- text encoder ``"nf4"``: bitsandbytes' 4-bit NormalFloat (``Linear4bit``, blocks of ``NF4_BLOCKSIZE`` weights
  sharing an absmax scale), computing in the encoder's dtype. About a quarter of the memory of bfloat16 weights.

Which layers: only the linear layers of the repeated blocks (:func:`transformer_layer_is_quantized`,
:func:`text_encoder_layers`); embeddings, the time embedding, every modulation (inside the blocks too: a float32
island) and the output head keep their precision, as the reference's FP8 work does. The compute dtype
(``model.dtype``) does not change.

Order: quantize after loading and after ``fuse_qkv_projections`` (fused projections are quantized as one layer),
before offloading is enabled (:func:`quantize_pipeline` refuses otherwise) and before compiling. Moves
(``module.to(device)``) keep the quantized weights. A network is quantized once: load a fresh one to change modes.

A quantized transformer is saved and loaded back with :func:`save_quantized_transformer` and
:func:`load_quantized_transformer` (safetensors; ``save_pretrained`` cannot write torchao's tensors).

torchao and bitsandbytes are optional (``pip install 'kandinsky5[quantization]'``) and imported only when a mode
needs them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch
from torch import nn

from kandinsky5.models.base import COMPUTE_DTYPES
from kandinsky5.models.dit import Attention, Kandinsky5Transformer3DModel

logger = logging.getLogger(__name__)

TRANSFORMER_MODES = ("fp8", "int8")
TEXT_ENCODER_MODES = ("int8", "nf4")
INSTALL_HINT = "pip install 'kandinsky5[quantization]'"
# The package each mode needs, by its import name.
TORCHAO = "torchao"
BITSANDBYTES = "bitsandbytes"
TRANSFORMER_PACKAGES = {"fp8": TORCHAO, "int8": TORCHAO}
TEXT_ENCODER_PACKAGES = {"int8": TORCHAO, "nf4": BITSANDBYTES}
# FP8 matrix units: compute capability 8.9 (Ada) and later.
FP8_MIN_CAPABILITY = (8, 9)
# torchao's per-row FP8 path takes bfloat16 weights only (it asserts so; CUDA's row-wise scaled matrix multiply
# writes bfloat16), and the activations it quantizes dynamically come in the same dtype.
FP8_WEIGHT_DTYPE = torch.bfloat16
# FP8 GEMMs need both sides of each weight to be multiples of this; torchao leaves other layers unquantized, so
# do we (with a warning). Every official Kandinsky 5 block width is.
FP8_DIM_MULTIPLE = 16
# bitsandbytes' NF4: 64 weights share one absmax scale (its default, as in QLoRA).
NF4_BLOCKSIZE = 64
# Set on a network this module quantized: the mode.
MODE_ATTRIBUTE = "_kandinsky5_quantization"
# A quantized transformer's folder (save_quantized_transformer): config.json and these weights, a name of their own
# so that no plain loader mistakes them for a checkpoint; the mode is in the file's metadata under MODE_METADATA.
QUANTIZED_WEIGHTS_NAME = "diffusion_pytorch_model.quantized.safetensors"
MODE_METADATA = "kandinsky5_quantization"


# ---------------------------------------------------------------------------------------------------- arguments


def check_quantize_arguments(
    transformer: str | None, text_encoder: str | None, device: torch.device | None = None
) -> None:
    """Refuse, before any work, modes that are unknown (``ValueError`` naming the parameter and the allowed values),
    ``transformer="fp8"`` on a CUDA device without FP8 matrix units (compute capability < 8.9; ``ValueError``
    suggesting ``"int8"``), and modes whose package is not installed (``ImportError`` with the install line).
    ``None`` means leave that network as it is."""
    _check_mode("transformer", transformer, TRANSFORMER_MODES)
    _check_mode("text_encoder", text_encoder, TEXT_ENCODER_MODES)
    if transformer == "fp8" and device is not None:
        _check_fp8_device(torch.device(device))
    if transformer is not None:
        _require(TRANSFORMER_PACKAGES[transformer], f"transformer={transformer!r}")
    if text_encoder is not None:
        _require(TEXT_ENCODER_PACKAGES[text_encoder], f"text_encoder={text_encoder!r}")


def _check_mode(parameter: str, mode: str | None, allowed: tuple[str, ...]) -> None:
    if mode is not None and mode not in allowed:
        choices = ", ".join(repr(m) for m in allowed)
        raise ValueError(f"{parameter} must be one of {choices} or None, got {mode!r}")


def _check_fp8_device(device: torch.device) -> None:
    if device.type != "cuda":
        return  # the CPU runs FP8 matrix multiplies in software (torch._scaled_mm)
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        need = ".".join(map(str, FP8_MIN_CAPABILITY))
        raise ValueError(
            f'transformer="fp8" needs FP8 matrix units (CUDA compute capability >= {need}), but {device} has '
            f'{capability[0]}.{capability[1]}; use transformer="int8" instead'
        )


def _require_mode(parameter: str, mode: str | None, allowed: tuple[str, ...]) -> None:
    if mode is None:
        raise ValueError(f"{parameter} must be one of {', '.join(repr(m) for m in allowed)}, got None")
    _check_mode(parameter, mode, allowed)


def _require(package: str, what: str) -> None:
    """``ImportError`` in one line when ``package`` is not installed (found without importing it)."""
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"{what} needs the {package} package, which is not installed: {INSTALL_HINT}")


# ---------------------------------------------------------------------------------------------------- state


def is_low_bit(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is stored otherwise than as a plain floating tensor: a torchao quantized tensor (whose
    ``dtype`` reports the dtype it computes in), a bitsandbytes ``Params4bit``, or a plain tensor in a non-compute
    dtype (FP8, integer)."""
    return type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.dtype not in COMPUTE_DTYPES


def quantization_mode(module: nn.Module) -> str | None:
    """The mode :func:`quantize_transformer` or :func:`quantize_text_encoder` applied to ``module``, or ``None``."""
    return getattr(module, MODE_ATTRIBUTE, None)


def _check_not_quantized(module: nn.Module, what: str, layers: dict[str, nn.Linear]) -> None:
    mode = quantization_mode(module)
    if mode is None:
        low_bit = next((name for name, layer in layers.items() if is_low_bit(layer.weight)), None)
        if low_bit is None:
            return
        mode = f"{low_bit}.weight is a {type(layers[low_bit].weight).__name__} of {layers[low_bit].weight.dtype}"
    raise RuntimeError(f"the {what} is already quantized ({mode}); quantize a freshly loaded one to use another mode")


# ---------------------------------------------------------------------------------------------------- transformer


def transformer_layer_is_quantized(model: Kandinsky5Transformer3DModel, name: str, module: nn.Module) -> bool:
    """The rule of what :func:`quantize_transformer` quantizes: the ``nn.Linear`` layers (fused projections
    included) inside the repeated blocks (``model._repeated_blocks``: ``TextBlock``, ``VisualBlock``) outside the
    float32 islands (``model.keeps_fp32``). So the attention projections, the attention out layers and the
    feed-forward layers; not the blocks' modulations (float32 islands), nor the time embedding, the text and
    visual input embeddings or the output head, which keep their precision as in the reference's FP8 work:
    they are a small part of the weights and the ones whose error reaches every token (or, for the head, the
    velocity) directly.

    ``name`` is the module's qualified name in ``model``."""
    if not isinstance(module, nn.Linear) or model.keeps_fp32(name):
        return False
    return any(name.startswith(f"{block}.") for block in _block_names(model))


def _block_names(model: Kandinsky5Transformer3DModel) -> list[str]:
    """Qualified names of the repeated blocks of ``model``."""
    return [name for name, module in model.named_modules() if type(module).__name__ in model._repeated_blocks]


def transformer_layers(model: Kandinsky5Transformer3DModel) -> dict[str, nn.Linear]:
    """``{qualified name: layer}`` of the layers :func:`quantize_transformer` quantizes, in model order."""
    return {name: m for name, m in model.named_modules() if transformer_layer_is_quantized(model, name, m)}


def quantize_transformer(model: Kandinsky5Transformer3DModel, mode: str) -> Kandinsky5Transformer3DModel:
    """Quantize the block linear layers of ``model`` (:func:`transformer_layer_is_quantized`) in place; returns
    ``model``. ``mode``: one of ``TRANSFORMER_MODES`` (see the module's docstring). The compute dtype is kept."""
    layers = _transformer_plan(model, mode)
    compute_dtype = model.compute_dtype
    if mode == "int8":
        _int8_weight_only(model, layers)
    else:
        _fp8_dynamic(layers)
    setattr(model, MODE_ATTRIBUTE, mode)
    assert model.compute_dtype == compute_dtype  # low-bit storage never sets the compute dtype
    return model


def _transformer_plan(model: Kandinsky5Transformer3DModel, mode: str) -> dict[str, nn.Linear]:
    """Every check of :func:`quantize_transformer`, before any change: the layers to quantize."""
    _require_mode("transformer", mode, TRANSFORMER_MODES)
    if not isinstance(model, Kandinsky5Transformer3DModel):
        raise TypeError(f"quantize_transformer takes a Kandinsky5Transformer3DModel, got {type(model).__name__}")
    _require(TRANSFORMER_PACKAGES[mode], f"transformer={mode!r}")
    layers = transformer_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no linear layers in repeated blocks {model._repeated_blocks}")
    _check_not_quantized(model, "transformer", layers)
    if mode == "fp8":
        _check_fp8_device(model.device)
        wrong = {name: layer.weight.dtype for name, layer in layers.items() if layer.weight.dtype != FP8_WEIGHT_DTYPE}
        if wrong:
            name, dtype = next(iter(wrong.items()))
            raise ValueError(
                f'transformer="fp8" needs a {FP8_WEIGHT_DTYPE} transformer (load it with torch_dtype=torch.bfloat16 '
                f"or call model.to_dtype(torch.bfloat16) first), but {name}.weight is {dtype}"
            )
    return layers


def _int8_weight_only(root: nn.Module, layers: dict[str, nn.Linear]) -> None:
    """torchao's int8 weight-only quantization (one scale per output row) of ``layers``, submodules of ``root``.

    ``set_inductor_config=False``: torchao would otherwise change inductor's global settings, for every model of
    the process."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    chosen = {id(layer) for layer in layers.values()}
    quantize_(root, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda m, _fqn: id(m) in chosen)


def _fp8_dynamic(layers: dict[str, nn.Linear]) -> None:
    """Float8 e4m3 weights with per-row scales whose linear layers quantize their input per row on the fly: what
    torchao's ``quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))`` builds
    (``_float8_dynamic_activation_float8_weight_quantize_tensor``), made here with torchao's tensor API because
    ``quantize_`` asserts GPU support even on the CPU. The weights are ``FP8_WEIGHT_DTYPE`` (checked by
    :func:`_transformer_plan`)."""
    from torchao.quantization import Float8MMConfig, Float8Tensor, PerRow
    from torchao.quantization.quantize_.workflows import QuantizeTensorToFloat8Kwargs

    for name, layer in layers.items():
        out_features, in_features = layer.weight.shape
        if out_features % FP8_DIM_MULTIPLE or in_features % FP8_DIM_MULTIPLE:
            logger.warning(
                "fp8: %s kept in %s: its shape %s is not a multiple of %d (as torchao does)",
                name,
                layer.weight.dtype,
                (out_features, in_features),
                FP8_DIM_MULTIPLE,
            )
            continue
        weight = Float8Tensor.from_hp(
            layer.weight.detach(),
            float8_dtype=torch.float8_e4m3fn,
            granularity=PerRow(),
            mm_config=Float8MMConfig(use_fast_accum=True),
            act_quant_kwargs=QuantizeTensorToFloat8Kwargs(float8_dtype=torch.float8_e4m3fn, granularity=PerRow()),
        )
        layer.weight = nn.Parameter(weight, requires_grad=False)


# ---------------------------------------------------------------------------------------------------- text encoder


def _decoder_layers(text_encoder: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers of a transformers Qwen2.5-VL model."""
    for path in ("model.language_model.layers", "language_model.layers", "model.layers"):
        module: object = text_encoder
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList) and len(module):
            return module
    raise TypeError(
        f"quantize_text_encoder takes a Qwen2.5-VL model (Qwen2_5_VLForConditionalGeneration), got "
        f"{type(text_encoder).__name__} with no language model decoder layers"
    )


def text_encoder_layers(text_encoder: nn.Module) -> dict[str, nn.Linear]:
    """``{qualified name: layer}`` of the layers :func:`quantize_text_encoder` quantizes: the ``nn.Linear`` layers
    of the language model's decoder layers (attention projections and MLP). Not the token embedding, the final
    norm, ``lm_head`` or the vision tower."""
    decoder = {id(m) for layer in _decoder_layers(text_encoder) for m in layer.modules()}
    return {name: m for name, m in text_encoder.named_modules() if id(m) in decoder and isinstance(m, nn.Linear)}


def quantize_text_encoder(text_encoder: nn.Module, mode: str) -> nn.Module:
    """Quantize the decoder linear layers of a Qwen2.5-VL encoder (:func:`text_encoder_layers`) in place; returns
    it. ``mode``: ``"int8"`` (torchao int8 weight-only) or ``"nf4"`` (bitsandbytes ``Linear4bit`` layers computing
    in the encoder's dtype)."""
    layers = _text_encoder_plan(text_encoder, mode)
    if mode == "int8":
        _int8_weight_only(text_encoder, layers)
    else:
        _nf4(text_encoder, layers)
    setattr(text_encoder, MODE_ATTRIBUTE, mode)
    return text_encoder


def _text_encoder_plan(text_encoder: nn.Module, mode: str) -> dict[str, nn.Linear]:
    """Every check of :func:`quantize_text_encoder`, before any change: the layers to quantize."""
    _require_mode("text_encoder", mode, TEXT_ENCODER_MODES)
    _require(TEXT_ENCODER_PACKAGES[mode], f"text_encoder={mode!r}")
    layers = text_encoder_layers(text_encoder)
    _check_not_quantized(text_encoder, "text encoder", layers)
    return layers


def _nf4(root: nn.Module, layers: dict[str, nn.Linear]) -> None:
    """Replace ``layers`` by bitsandbytes ``Linear4bit`` layers (NF4, blocks of ``NF4_BLOCKSIZE``) that compute in
    the weights' dtype; the weights are packed where they are (``Params4bit`` packs on its move to a device)."""
    import bitsandbytes as bnb

    for name, layer in layers.items():
        weight = layer.weight.detach()
        compute_dtype = weight.dtype
        packed = bnb.nn.Linear4bit(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        packed.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCKSIZE).to(
            weight.device
        )
        if layer.bias is not None:
            packed.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
        # bitsandbytes 0.50 on AVX512-BF16 CPUs repacks a layer's weights into a CPU layout at its first CPU forward,
        # in place. ``Params4bit.cuda()`` undoes it, but ``.to("cuda")`` (what Module.to, the pipeline and the
        # offload hooks call) does not: the layer would reach the GPU in the wrong layout and compute garbage. The
        # repacking also fails on layers narrower than its blocks. The generic path (dequantize, multiply) has
        # neither problem.
        packed.support_avx512bf16_for_cpu = False
        packed.train(layer.training)
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent), child, packed)


# ---------------------------------------------------------------------------------------------------- pipeline


def quantize_pipeline(pipe, transformer: str | None = None, text_encoder: str | None = None) -> None:
    """Quantize a pipeline's transformer (``TRANSFORMER_MODES``) and/or Qwen2.5-VL text encoder
    (``TEXT_ENCODER_MODES``) in place; ``None`` leaves that network alone. The arguments are checked first
    (:func:`check_quantize_arguments`, on the pipeline's execution device). Call it before
    ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``: offload hooks hold the layers they move."""
    check_quantize_arguments(transformer, text_encoder, pipe._execution_device)
    if pipe._offload_plan is not None:
        raise RuntimeError(
            "quantize the pipeline before enabling offloading: call quantize before enable_model_cpu_offload / "
            "enable_sequential_cpu_offload (or pipe.remove_all_hooks() first, then enable offloading again)"
        )
    # every check of both networks before either changes
    if transformer is not None:
        _transformer_plan(pipe.transformer, transformer)
    if text_encoder is not None:
        _text_encoder_plan(pipe.text_encoder, text_encoder)
    if transformer is not None:
        quantize_transformer(pipe.transformer, transformer)
    if text_encoder is not None:
        quantize_text_encoder(pipe.text_encoder, text_encoder)


# ---------------------------------------------------------------------------------------------------- saving


def save_quantized_transformer(model: Kandinsky5Transformer3DModel, folder: str | Path) -> Path:
    """Write a transformer quantized by :func:`quantize_transformer` to ``folder``: ``config.json`` and
    ``QUANTIZED_WEIGHTS_NAME``, safetensors holding torchao's quantized tensors flattened into their plain tensors
    (codes, scales) with their attributes in the file's metadata (torchao's ``flatten_tensor_state_dict``). Written
    atomically, as ``save_pretrained``. :func:`load_quantized_transformer` reads it back."""
    from safetensors.torch import save_file

    from kandinsky5.io.atomic import atomic_folder

    mode = quantization_mode(model)
    if mode is None:
        raise ValueError("the transformer is not quantized: save it with save_pretrained")
    _require(TRANSFORMER_PACKAGES[mode], f"transformer={mode!r}")
    if mode == "int8" and any(isinstance(m, Attention) and m.fused for m in model.modules()):
        # state_dict() splits fused projections back into the checkpoint's (runtime/fusion.py, with chunk), an
        # operation torchao 0.18's Int8Tensor does not implement
        raise ValueError(
            "cannot save an int8 transformer with fused projections (torchao's Int8Tensor cannot be split into the "
            "checkpoint's query/key/value); quantize it unfused to save it"
        )
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    tensors, metadata = flatten_tensor_state_dict(state)
    metadata[MODE_METADATA] = mode
    config = {"_class_name": type(model).__name__, **model.config.to_dict()}
    folder = Path(folder)
    with atomic_folder(folder) as temporary:
        (temporary / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary / QUANTIZED_WEIGHTS_NAME), metadata)
    return folder


def load_quantized_transformer(folder: str | Path) -> Kandinsky5Transformer3DModel:
    """The transformer :func:`save_quantized_transformer` wrote to ``folder``, on the CPU, in eval mode, quantized
    as it was (same tensors, same mode; its compute dtype is that of its stored weights)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / QUANTIZED_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {QUANTIZED_WEIGHTS_NAME} (written by save_quantized_transformer)")
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    mode = metadata.get(MODE_METADATA)
    if mode not in TRANSFORMER_MODES:
        raise ValueError(f"{path} has no quantization mode in its metadata (found {mode!r})")
    _require(TRANSFORMER_PACKAGES[mode], f"transformer={mode!r}")
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    tensors = load_file(str(path))
    state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    if leftover:
        raise ValueError(f"{path}: tensors that belong to no weight: {sorted(leftover)[:5]}")
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        model = Kandinsky5Transformer3DModel.from_config(config)
    model.load_state_dict(state, strict=True, assign=True)
    for layer in transformer_layers(model).values():
        layer.weight.requires_grad_(False)
    setattr(model, MODE_ATTRIBUTE, mode)
    return model.eval()
