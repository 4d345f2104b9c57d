"""What every network of the package shares: a typed config and a dtype policy.

The networks hold no buffers and compute nothing at construction, so they can be built on the ``meta`` device and
receive their weights by ``load_state_dict(..., assign=True)`` without a second copy (see ``kandinsky5.loading``).

The dtype policy: a network has an explicit compute dtype (``compute_dtype``, what ``model.dtype`` reports, the
dtype callers give its inputs), independent of how each weight is stored. Its floating weights are stored in it,
except the float32 islands (``_keep_in_fp32_modules``), which stay float32 as in the reference, and whatever a
transform applied from outside chose (FP8 weights of a quantized linear layer, say), which never changes the compute
dtype.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import nn

logger = logging.getLogger(__name__)

# The dtypes a network can compute in; tensors stored in others (FP8, integer) never set the compute dtype.
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_COMPUTE_DTYPE = torch.float32
FP32_ISLAND_DTYPE = torch.float32


def check_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"compute dtype must be one of {[str(d) for d in COMPUTE_DTYPES]}, got {dtype} (store weights in other "
            "dtypes with a transform, e.g. a quantization, not by casting the model)"
        )
    return dtype


def stored_compute_dtype(
    tensors: Iterable[tuple[str, torch.Tensor]], keeps_fp32, default: torch.dtype = DEFAULT_COMPUTE_DTYPE
) -> torch.dtype:
    """The compute dtype a set of stored ``(name, tensor)`` pairs implies: the dtype of the first tensor outside the
    float32 islands (``keeps_fp32(name)``) stored in a compute dtype, else that of the first island tensor, else
    ``default``."""
    island = None
    for name, tensor in tensors:
        if tensor.dtype not in COMPUTE_DTYPES:
            continue
        if not keeps_fp32(name):
            return tensor.dtype
        island = island or tensor.dtype
    return island or default


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


def transform_owned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a tensor subclass a transform made: torchao's low-bit weights report their
    high-precision dtype, but casting them would not change how they are stored, so they keep it."""
    return type(tensor) not in (torch.Tensor, nn.Parameter)


class ModelBase(nn.Module):
    """Base of the package's networks.

    ``_keep_in_fp32_modules`` names submodules (by any component of their dotted path) whose weights stay float32
    when the rest of the model is cast to half precision, as the reference does.
    """

    config_class: ClassVar[type[ComponentConfig]]
    # the class name a checkpoint's config.json gives (diffusers'), when it is not this class's own
    checkpoint_class_name: ClassVar[str | None] = None
    _keep_in_fp32_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ComponentConfig):
        super().__init__()
        self.config = config
        # parameters are created in the default dtype
        self.compute_dtype: torch.dtype = torch.get_default_dtype()

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
        """The compute dtype (``compute_dtype``): set at construction (the default dtype), by loading (see
        :meth:`load_state_dict`, ``kandinsky5.loading``) and by casts (:meth:`to_dtype`, ``.to(dtype)``,
        ``.half()`` ...), never read off a weight."""
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        for param in self.parameters():
            return param.device
        return torch.device("cpu")

    def storage_dtype(self, name: str, dtype: torch.dtype, tensor: torch.Tensor) -> torch.dtype:
        """The dtype the tensor ``name`` takes when the model computes in ``dtype``: float32 in the float32
        islands, its own when that is no compute dtype or the tensor is a transform's (FP8 storage, a torchao
        low-bit tensor: see :func:`transform_owned`), else ``dtype``."""
        if tensor.dtype not in COMPUTE_DTYPES or transform_owned(tensor):
            return tensor.dtype
        return FP32_ISLAND_DTYPE if self.keeps_fp32(name) else dtype

    def to_dtype(self, dtype: torch.dtype) -> Self:
        """Compute in ``dtype``: cast the parameters stored in compute dtypes to it, the float32 islands excepted
        (see :meth:`storage_dtype`)."""
        self.compute_dtype = check_compute_dtype(dtype)
        for name, param in self.named_parameters():
            if param.is_floating_point():
                param.data = param.data.to(self.storage_dtype(name, dtype, param))
        return self

    def to(self, *args, **kwargs) -> Self:
        """``nn.Module.to``, except that a dtype becomes the compute dtype and each tensor is cast as by
        :meth:`to_dtype` (float32 islands kept) in the same pass as the move. ``.to(device)`` alone keeps the
        compute dtype."""
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None:
            return super().to(*args, **kwargs)
        check_compute_dtype(dtype)
        targets = {id(t): self.storage_dtype(name, dtype, t) for name, t in self._named_tensors()}

        def convert(t: torch.Tensor) -> torch.Tensor:
            target = targets.get(id(t), dtype) if t.is_floating_point() else None
            if memory_format is not None and t.dim() in (4, 5):
                return t.to(device, target, non_blocking, memory_format=memory_format)
            return t.to(device, target, non_blocking)

        self._apply(convert)
        self.compute_dtype = dtype
        return self

    def half(self) -> Self:
        return self.to(torch.float16)

    def bfloat16(self) -> Self:
        return self.to(torch.bfloat16)

    def float(self) -> Self:
        return self.to(torch.float32)

    def double(self) -> Self:
        return self.to(torch.float64)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``. With ``assign=True`` the model adopts the given tensors, so their stored
        dtype becomes the compute dtype (see :func:`stored_compute_dtype`); a copying load keeps it."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:
            self.compute_dtype = stored_compute_dtype(self._named_tensors(), self.keeps_fp32, self.compute_dtype)
        return result

    def _named_tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        yield from self.named_parameters()
        yield from self.named_buffers()

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` in the Diffusers layout.

        Both are written in a temporary folder beside ``folder`` that is renamed into place when complete
        (:func:`kandinsky5.io.atomic.atomic_folder`): an error or an interrupt leaves no partial checkpoint."""
        from safetensors.torch import save_file

        from kandinsky5.io.atomic import atomic_folder

        folder = Path(folder)
        config = {"_class_name": self.checkpoint_class_name or type(self).__name__, **self.config.to_dict()}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_folder(folder) as temporary:
            (temporary / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_file(state, str(temporary / "diffusion_pytorch_model.safetensors"))
        return folder
