"""What every network of the package shares: a typed config and a dtype policy.

The networks hold no buffers and compute nothing at construction, so they can be built on the ``meta`` device and
receive their weights by ``load_state_dict(..., assign=True)`` without a second copy (see ``kandinsky5.loading``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ComponentConfig:
    """A component's ``config.json`` as a dataclass; field names are the Diffusers ones."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in known and not k.startswith("_"))
        if unknown:
            logger.warning("%s: ignoring unknown config keys %s", cls.__name__, unknown)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data and data[f.name] is not None:
                value = data[f.name]
                values[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class ModelBase(nn.Module):
    """Base of the package's networks.

    ``_keep_in_fp32_modules`` names submodules (by any component of their dotted path) whose weights stay float32
    when the rest of the model is cast to half precision, as the reference does.
    """

    config_class: ClassVar[type[ComponentConfig]]
    _keep_in_fp32_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ComponentConfig):
        super().__init__()
        self.config = config

    @classmethod
    def from_config(cls, config: dict[str, Any] | ComponentConfig) -> Self:
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        return cls(config)

    @classmethod
    def keeps_fp32(cls, name: str) -> bool:
        """Whether the parameter or module ``name`` belongs to a float32 island."""
        parts = name.split(".")
        return any(part in cls._keep_in_fp32_modules for part in parts)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the first floating parameter outside the float32 islands."""
        fallback = None
        for name, param in self.named_parameters():
            if not param.is_floating_point():
                continue
            fallback = fallback or param.dtype
            if not self.keeps_fp32(name):
                return param.dtype
        return fallback or torch.float32

    @property
    def device(self) -> torch.device:
        for param in self.parameters():
            return param.device
        return torch.device("cpu")

    def to_dtype(self, dtype: torch.dtype) -> Self:
        """Cast to ``dtype``, keeping the float32 islands in float32."""
        for name, param in self.named_parameters():
            if param.is_floating_point():
                target = torch.float32 if self.keeps_fp32(name) else dtype
                param.data = param.data.to(target)
        return self

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` in the Diffusers layout."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(self).__name__, **self.config.to_dict()}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
        return folder
