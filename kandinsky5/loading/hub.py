"""Finding a checkpoint: a local folder, or a Hugging Face Hub repository id downloaded to the local cache."""

from __future__ import annotations

import re
from pathlib import Path

# Only what the pipelines read: configs, tokenizers, safetensors weights.
HUB_ALLOW_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model", "*.tiktoken", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointNotFoundError(FileNotFoundError):
    """Neither a local checkpoint folder nor a reachable hub repository."""


def is_hub_id(text: str) -> bool:
    """Whether ``text`` names a hub repository (``owner/name``) rather than a local path."""
    path = Path(text).expanduser()
    return not (text.startswith((".", "/", "~")) or path.exists()) and bool(_REPO_ID.match(text))


def resolve_checkpoint(
    path_or_id: str | Path,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The local folder of a checkpoint, downloading a hub repository if needed."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if not is_hub_id(text):
        raise CheckpointNotFoundError(f"Model directory not found: {text}")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id=text,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=HUB_ALLOW_PATTERNS,
        )
    except Exception as err:  # the hub client raises many kinds: offline, DNS, auth, missing repo
        reason = " ".join(str(err).split())  # one line, whatever the hub client wrote
        raise CheckpointNotFoundError(
            f"Could not get {text!r} from the Hugging Face Hub ({type(err).__name__}: {reason}). "
            "If this machine is offline, download the checkpoint elsewhere "
            f"(e.g. `hf download {text} --local-dir DIR`, the huggingface_hub command) and pass the local directory "
            "instead."
        ) from err
    return Path(folder)
