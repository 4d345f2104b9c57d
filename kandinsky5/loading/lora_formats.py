"""Reading LoRA files: local files and folders or Hugging Face Hub repositories, in the formats LoRAs for
Kandinsky 5 come in, converted to one internal naming.

Internal naming: a :class:`LoraWeights` per linear layer, keyed by the layer's name in the reference layout of the
transformer (the Diffusers checkpoint's names, which are also the original repository's:
``visual_transformer_blocks.3.self_attention.to_query``; never ``fused_projection``), holding ``down`` (PEFT's
``lora_A``, ``(rank, in_features)``), ``up`` (``lora_B``, ``(out_features, rank)``) and what sets the branch's scale
(``alpha``, ``rank``, rsLoRA). The branch adds ``up @ down @ x * weight * alpha / rank`` (``/ sqrt(rank)`` with
rsLoRA), ``weight`` being the adapter's weight from ``set_adapters`` (1 by default).

Formats (:func:`detect_format` tells them apart by their keys' prefix):

- ``diffusers``: what diffusers' ``Kandinsky5T2VPipeline.save_lora_weights`` writes (``pytorch_lora_weights
  .safetensors``): ``transformer.<layer>.lora_A.weight`` / ``transformer.<layer>.lora_B.weight``; the PEFT config
  (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``) in the safetensors metadata under
  ``lora_adapter_metadata`` (a JSON object, keys prefixed ``transformer.``). Without it, alpha = rank (scale 1),
  as diffusers assumes.
- ``kandinsky5-peft``: the original Kandinsky-5 repository's adapters (``lora.safetensors`` with
  ``config_lora.json``; its trainer writes ``model.safetensors``) and PEFT's own ``save_pretrained``
  (``adapter_model.safetensors`` with ``adapter_config.json``): ``[base_model.model.]<layer>.lora_A[.<adapter>]
  .weight`` / ``lora_B``; ``r`` and ``lora_alpha`` from the JSON config beside the file (``CONFIG_NAMES``) or
  passed in; the trigger words in the safetensors metadata under ``trigger`` (the original prepends them to the
  prompt).
- ``kohya``: kohya's sd-scripts and musubi-tuner (``networks/lora_kandinsky.py``):
  ``lora_unet_<layer with dots as underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (a scalar
  tensor per layer; without it alpha = rank). Underscores are ambiguous, so the layer is found by flattening the
  model's own layer names the same way.
- ``comfyui``: ComfyUI-style files, as ai-toolkit writes them: ``diffusion_model.<layer>.lora_A.weight`` /
  ``lora_B`` (or ``lora_down`` / ``lora_up``), optionally ``.alpha``.

Where a file gives alpha in several ways, a per-layer ``alpha`` tensor wins over the diffusers metadata, which wins
over a JSON config; none means alpha = rank. Trigger words are read from the metadata keys ``TRIGGER_KEYS``.

Anything else is an error naming the key: a tensor that is no LoRA down/up/alpha (DoRA's magnitudes, LoRA biases,
full-weight ``diff`` tensors, LoKr/LoHa factors), a down without its up, ranks that disagree, text-encoder LoRAs.
A layer name that matches no linear layer of the transformer is refused when the adapter is attached
(:mod:`kandinsky5.runtime.lora`), naming the file's key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

FORMAT_DIFFUSERS = "diffusers"
FORMAT_ORIGINAL = "kandinsky5-peft"
FORMAT_KOHYA = "kohya"
FORMAT_COMFY = "comfyui"
FORMATS = (FORMAT_DIFFUSERS, FORMAT_ORIGINAL, FORMAT_KOHYA, FORMAT_COMFY)

# prefixes that mark a format (checked in this order)
KOHYA_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
PEFT_PREFIX = "base_model.model."
# diffusers' metadata key holding the PEFT config (diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY)
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# safetensors metadata keys holding trigger words: the original repository's, then the SAI model spec's
TRIGGER_KEYS = ("trigger", "modelspec.trigger_phrase")
# kohya's metadata: the network alpha, when no per-layer alpha tensors are stored
KOHYA_ALPHA_METADATA = "ss_network_alpha"
# JSON configs (PEFT LoraConfig fields) read beside a weights file: the original repository's, PEFT's
CONFIG_NAMES = ("config_lora.json", "adapter_config.json")
# weight file names looked for in a folder (or hub repository), in this order: diffusers', the original
# repository's, PEFT's, the original trainer's
WEIGHT_NAMES = (
    "pytorch_lora_weights.safetensors",
    "lora.safetensors",
    "adapter_model.safetensors",
    "model.safetensors",
)
HUB_ALLOW_PATTERNS = ["*.safetensors", "*.json"]
SAFETENSORS_SUFFIX = ".safetensors"

# What a LoRA key ends with, by role: down (A), up (B), alpha. PEFT state dicts may carry the adapter's name
# between ``lora_A`` and ``weight`` (``lora_A.default.weight``).
_DOWN_UP = re.compile(r"^(?P<layer>.+?)\.(?P<role>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?\.weight$")
_ALPHA = re.compile(r"^(?P<layer>.+?)\.alpha$")
_ROLE = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up"}
# keys of adapter kinds we do not run, with the reason given
_UNSUPPORTED = (
    ("dora_scale", "DoRA (weight-decomposed LoRA) is not supported"),
    ("lora_magnitude_vector", "DoRA (weight-decomposed LoRA) is not supported"),
    ("lora_mid", "LoRA with a middle factor (LoCon/Tucker) is not supported"),
    ("hada_", "LoHa is not supported"),
    ("lokr_", "LoKr is not supported"),
)


class LoraFormatError(ValueError):
    """A LoRA file that cannot be read or whose keys are not a LoRA for the Kandinsky 5 transformer."""


class LoraNotFoundError(FileNotFoundError):
    """Neither a local LoRA file or folder nor a reachable hub repository."""


@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """One layer's low-rank pair: ``down`` ``(rank, in_features)`` (lora_A), ``up`` ``(out_features, rank)``
    (lora_B); ``alpha`` (``None``: the rank); ``rslora``: scale by ``alpha / sqrt(rank)``; ``key``: the file's
    key of ``down``, for messages."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    rslora: bool
    key: str

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def scaling(self, weight: float = 1.0) -> float:
        """The factor of ``up @ down``: ``weight * alpha / rank`` in PEFT's order of operations
        (``peft.tuners.lora.LoraLayer.set_scale``), so that the scales are PEFT's to the last bit."""
        alpha = self.rank if self.alpha is None else self.alpha
        return weight * alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class LoraFile:
    """A LoRA read and converted: ``layers`` by reference layer name, the format it came in, its trigger words
    (``None`` when its metadata holds none) and where it came from."""

    layers: dict[str, LoraWeights]
    format: str
    trigger: str | None
    source: str
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- finding the file


def resolve_lora_path(
    path_or_id: str | Path,
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local weights file of a LoRA: ``path_or_id`` a ``.safetensors`` file, a folder (``weight_name`` in it,
    else the first of ``WEIGHT_NAMES`` there, else its only ``.safetensors`` file) or a hub repository id (its
    ``.safetensors`` and ``.json`` files downloaded to the cache, then as a folder)."""
    from kandinsky5.loading.hub import is_hub_id

    text = str(path_or_id)
    path = Path(text).expanduser()
    if not path.exists() and is_hub_id(text):
        path = _download(text, weight_name, subfolder, revision, cache_dir, token, local_files_only)
    elif subfolder:
        path = path / subfolder
    if path.is_dir():
        return _weights_in_folder(path, weight_name)
    if not path.is_file():
        raise LoraNotFoundError(f"LoRA not found: {text} (neither a file, a folder nor a hub repository id)")
    if path.suffix != SAFETENSORS_SUFFIX:
        raise LoraFormatError(f"{path}: only safetensors LoRA files are read (pickled .bin/.pt/.ckpt files are not)")
    return path


def _weights_in_folder(folder: Path, weight_name: str | None) -> Path:
    if weight_name is not None:
        path = folder / weight_name
        if not path.is_file():
            raise LoraNotFoundError(f"{folder} has no {weight_name}")
        if path.suffix != SAFETENSORS_SUFFIX:
            raise LoraFormatError(f"{path}: only safetensors LoRA files are read")
        return path
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.glob(f"*{SAFETENSORS_SUFFIX}"))
    if len(found) == 1:
        return folder / found[0]
    if not found:
        raise LoraNotFoundError(f"{folder} holds no .safetensors LoRA file")
    raise LoraFormatError(
        f"{folder} holds several .safetensors files ({', '.join(found)}); pass weight_name= to pick one"
    )


def _download(repo_id, weight_name, subfolder, revision, cache_dir, token, local_files_only) -> Path:
    patterns = HUB_ALLOW_PATTERNS if weight_name is None else [weight_name, "*.json"]
    if subfolder:
        patterns = [f"{subfolder}/{p}" for p in patterns]
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=patterns,
        )
    except Exception as err:  # the hub client raises many kinds: offline, DNS, auth, missing repo
        reason = " ".join(str(err).split())
        raise LoraNotFoundError(
            f"Could not get the LoRA {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {reason}). "
            f"If this machine is offline, download it elsewhere (`hf download {repo_id} --local-dir DIR`) and pass "
            "the local file or folder instead."
        ) from err
    folder = Path(folder)
    return folder / subfolder if subfolder else folder


def config_beside(weights: Path) -> Path | None:
    """The JSON config (``CONFIG_NAMES``) in the weights file's folder, if any."""
    for name in CONFIG_NAMES:
        if (weights.parent / name).is_file():
            return weights.parent / name
    return None


# ---------------------------------------------------------------------------------------------- reading


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (copied into memory: nothing keeps the file mapped) and string metadata of a safetensors LoRA
    file. A truncated or corrupt file is a ``LoraFormatError`` naming it."""
    from safetensors import safe_open

    from kandinsky5.loading.diffusers_format import CheckpointError, map_safetensors

    path = Path(path)
    try:
        tensors = dict(map_safetensors(path, convert=lambda _name, view: view.clone()))
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except CheckpointError as err:
        raise LoraFormatError(str(err)) from err
    return tensors, metadata


def read_config(path: str | Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LoraFormatError(f"{path}: not a readable JSON LoRA config ({err})") from err
    if not isinstance(config, dict):
        raise LoraFormatError(f"{path}: a LoRA config must be a JSON object")
    return config


def load_lora(
    path_or_id: str | Path | Mapping[str, torch.Tensor],
    weight_name: str | None = None,
    adapter_config: str | Path | Mapping[str, Any] | None = None,
    layer_names: Iterable[str] | None = None,
    **hub_kwargs,
) -> LoraFile:
    """Find, read and convert a LoRA (a path, folder or hub id; or a state dict of tensors, as diffusers accepts).

    ``adapter_config``: a PEFT LoraConfig as a dict or a JSON file (default: the JSON config beside the weights,
    ``CONFIG_NAMES``). ``layer_names``: the transformer's linear layers in the reference naming, which the kohya
    format needs to undo its flattened names. ``hub_kwargs``: ``subfolder``, ``revision``, ``cache_dir``,
    ``token``, ``local_files_only``.
    """
    if isinstance(path_or_id, Mapping):
        tensors, metadata, source, beside = dict(path_or_id), {}, "the state dict", None
    else:
        path = resolve_lora_path(path_or_id, weight_name, **hub_kwargs)
        tensors, metadata = read_lora_file(path)
        source, beside = str(path), config_beside(path)
    if adapter_config is None:
        config = read_config(beside)
    elif isinstance(adapter_config, Mapping):
        config = dict(adapter_config)
    else:
        config = read_config(adapter_config)
    return convert_lora(tensors, metadata, config, layer_names, source)


# ---------------------------------------------------------------------------------------------- converting


def detect_format(keys: Iterable[str]) -> str:
    """The format of a LoRA state dict, from its keys' prefixes (see the module's doc)."""
    keys = list(keys)
    for prefix, name in (
        (KOHYA_PREFIX, FORMAT_KOHYA),
        (COMFY_PREFIX, FORMAT_COMFY),
        (DIFFUSERS_PREFIX, FORMAT_DIFFUSERS),
    ):
        if any(k.startswith(prefix) for k in keys):
            return name
    return FORMAT_ORIGINAL


def trigger_words(metadata: Mapping[str, str]) -> str | None:
    """The trigger words a LoRA file's metadata offers (``TRIGGER_KEYS``), stripped; ``None`` when none."""
    for key in TRIGGER_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def convert_lora(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
    layer_names: Iterable[str] | None = None,
    source: str = "the LoRA",
) -> LoraFile:
    """Convert a LoRA state dict of any supported format to :class:`LoraFile` (see the module's doc)."""
    metadata = dict(metadata or {})
    if not tensors:
        raise LoraFormatError(f"{source} holds no tensors")
    fmt = detect_format(tensors)
    flat_names = _kohya_table(layer_names) if fmt == FORMAT_KOHYA else {}
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        layer, role = _parse_key(key, fmt, flat_names, source)
        entry = parts.setdefault(layer, {})
        if role in entry:
            raise LoraFormatError(f"{source}: {key!r} and {entry[role][0]!r} are both the {role} of layer {layer!r}")
        entry[role] = (key, tensor)
    peft_config = _peft_config(metadata, config, source)
    default_alpha = _kohya_network_alpha(metadata) if fmt == FORMAT_KOHYA else None
    layers = {}
    for layer, entry in parts.items():
        layers[layer] = _layer_weights(layer, entry, peft_config, default_alpha, source)
    return LoraFile(layers=layers, format=fmt, trigger=trigger_words(metadata), source=source, metadata=metadata)


def _parse_key(key: str, fmt: str, flat_names: dict[str, str], source: str) -> tuple[str, str]:
    """``(reference layer name, role)`` of one key; role ``down``, ``up`` or ``alpha``."""
    for marker, reason in _UNSUPPORTED:
        if marker in key:
            raise LoraFormatError(f"{source}: {key!r}: {reason}")
    if fmt == FORMAT_DIFFUSERS:
        if not key.startswith(DIFFUSERS_PREFIX):
            component = key.split(".", 1)[0]
            raise LoraFormatError(
                f"{source}: {key!r} is for the {component!r} component; only the transformer takes LoRAs here"
            )
        name = key.removeprefix(DIFFUSERS_PREFIX)
    elif fmt == FORMAT_COMFY:
        if not key.startswith(COMFY_PREFIX):
            raise LoraFormatError(f"{source}: {key!r} lacks the {COMFY_PREFIX!r} prefix of the file's other keys")
        name = key.removeprefix(COMFY_PREFIX)
    elif fmt == FORMAT_KOHYA:
        if not key.startswith(KOHYA_PREFIX):
            raise LoraFormatError(
                f"{source}: {key!r} is not a transformer LoRA key ({KOHYA_PREFIX}...; text-encoder LoRAs are "
                "not supported)"
            )
        name = key
    else:
        name = key.removeprefix(PEFT_PREFIX)
    match = _DOWN_UP.match(name)
    if match is not None:
        layer, role = match["layer"], _ROLE[match["role"]]
    else:
        match = _ALPHA.match(name)
        if match is None:
            raise LoraFormatError(
                f"{source}: {key!r} is not a LoRA tensor (expected <layer>.lora_A.weight / lora_B.weight, "
                "lora_down.weight / lora_up.weight or <layer>.alpha)"
            )
        layer, role = match["layer"], "alpha"
    if fmt == FORMAT_KOHYA:
        flat = layer.removeprefix(KOHYA_PREFIX)
        if flat not in flat_names:
            raise LoraFormatError(f"{source}: {key!r} matches no linear layer of the transformer")
        layer = flat_names[flat]
    return layer, role


def _kohya_table(layer_names: Iterable[str] | None) -> dict[str, str]:
    if layer_names is None:
        raise LoraFormatError("reading a kohya-format LoRA needs the transformer's layer names (layer_names=)")
    return {name.replace(".", "_"): name for name in layer_names}


def _layer_weights(layer, entry, peft_config, default_alpha, source) -> LoraWeights:
    if "down" not in entry or "up" not in entry:
        have, missing = ("down", "up") if "down" in entry else ("up", "down")
        if have not in entry:
            raise LoraFormatError(f"{source}: {entry['alpha'][0]!r} has no LoRA weights for layer {layer!r}")
        raise LoraFormatError(f"{source}: {entry[have][0]!r} has no {missing} partner for layer {layer!r}")
    down_key, down = entry["down"]
    up_key, up = entry["up"]
    if down.dim() != 2 or up.dim() != 2:
        raise LoraFormatError(
            f"{source}: {down_key!r} {tuple(down.shape)} / {up_key!r} {tuple(up.shape)}: only linear-layer LoRAs "
            "(2-D factors) are supported"
        )
    if down.shape[0] != up.shape[1]:
        raise LoraFormatError(
            f"{source}: ranks disagree for layer {layer!r}: {down_key!r} {tuple(down.shape)} and {up_key!r} "
            f"{tuple(up.shape)}"
        )
    rank = down.shape[0]
    alpha, rslora = default_alpha, False
    if peft_config is not None:
        config_rank = _pattern_value(peft_config.get("rank_pattern"), layer, peft_config.get("r"))
        if config_rank is not None and int(config_rank) != rank:
            raise LoraFormatError(
                f"{source}: {down_key!r} has rank {rank} but the LoRA's config says r={config_rank} for {layer!r}"
            )
        config_alpha = _pattern_value(peft_config.get("alpha_pattern"), layer, peft_config.get("lora_alpha"))
        alpha = None if config_alpha is None else float(config_alpha)
        rslora = bool(peft_config.get("use_rslora", False))
    if "alpha" in entry:
        alpha_key, alpha_tensor = entry["alpha"]
        if alpha_tensor.numel() != 1:
            raise LoraFormatError(f"{source}: {alpha_key!r} must be a scalar, got shape {tuple(alpha_tensor.shape)}")
        alpha = float(alpha_tensor.reshape(()).item())
    return LoraWeights(down=down, up=up, alpha=alpha, rslora=rslora, key=down_key)


def _pattern_value(patterns: Mapping[str, Any] | None, layer: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``): the first
    pattern that matches the end of the layer's name, else ``default``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            return value
    return default


def _peft_config(metadata: Mapping[str, str], config: Mapping[str, Any] | None, source: str) -> dict | None:
    """The PEFT LoraConfig fields that set the scales: the diffusers metadata's (its ``transformer.`` keys), else
    ``config``; DoRA and LoRA biases are refused."""
    found = None
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if raw:
        try:
            packed = json.loads(raw)
        except json.JSONDecodeError as err:
            raise LoraFormatError(f"{source}: its {DIFFUSERS_METADATA_KEY!r} metadata is not JSON ({err})") from err
        transformer = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in packed.items() if k.startswith(DIFFUSERS_PREFIX)}
        found = transformer or None
    if found is None and config is not None:
        found = dict(config)
    if found is not None:
        if found.get("use_dora"):
            raise LoraFormatError(f"{source}: its config says use_dora=True; DoRA is not supported")
        if found.get("lora_bias"):
            raise LoraFormatError(f"{source}: its config says lora_bias=True; LoRA biases are not supported")
    return found


def _kohya_network_alpha(metadata: Mapping[str, str]) -> float | None:
    try:
        return float(metadata[KOHYA_ALPHA_METADATA])
    except (KeyError, ValueError):
        return None
