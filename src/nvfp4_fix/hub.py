"""A checkpoint named by a local folder or a Hugging Face hub id, resolved to a local folder with
huggingface_hub (the cache first; ``HF_HUB_OFFLINE=1`` respected)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError
from .safetensors_header import TensorInfo

#: Files a tool needs besides the weights: configs, tokenizer, processor, generation settings.
CONFIG_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.py"]
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def local_folder(
    path_or_id: str | os.PathLike[str],
    revision: str | None = None,
    subfolder: str | None = None,
    weights: bool = True,
) -> Path:
    """The local folder holding the checkpoint: ``path_or_id`` itself if it is a folder, else the hub
    repository's snapshot (downloaded into the cache unless offline; only configs when ``weights`` is
    False). One-line :class:`CheckpointError` when it cannot be had."""
    local = Path(os.fspath(path_or_id))
    if local.is_dir():
        if revision is not None:
            raise CheckpointError(f"{local}: a local folder has no revisions (--revision {revision})")
        return local / subfolder if subfolder else local
    name = os.fspath(path_or_id)
    if not looks_like_repo_id(name):
        raise CheckpointError(f"{name}: not a directory, and not a hub id of the form org/model")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [prefix + p for p in CONFIG_PATTERNS + (WEIGHT_PATTERNS if weights else [])]
    try:
        snapshot = Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else " and the hub cannot be reached"
        rev = f" at revision {revision!r}" if revision else ""
        raise CheckpointError(
            f"{name}{rev}: not in the Hugging Face cache {constants.HF_HUB_CACHE}{offline}"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{name}: no such repository on the hub (or it is private: log in)") from None
    except (HfHubHTTPError, ValueError) as e:
        raise CheckpointError(f"{name}: cannot get it from the hub ({type(e).__name__}: {e})") from None
    folder = snapshot / subfolder if subfolder else snapshot
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{name}: the snapshot {folder} has no config.json")
    return folder


def has_weights(folder: Path) -> bool:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        from .checkpoint import read_json

        shards = set((read_json(index).get("weight_map") or {}).values())
        return bool(shards) and all((folder / s).is_file() for s in shards)
    return any(folder.glob("*.safetensors"))


def remote_tensor_index(
    repo_id: str, folder: Path, revision: str | None = None, subfolder: str | None = None
) -> dict[str, TensorInfo]:
    """The tensor table of a hub checkpoint whose weights are not downloaded, from the safetensors
    headers alone (a ranged read of each file's first bytes, as huggingface_hub does), validated as a
    local header is. ``folder`` holds its configs (and the shard index, if any)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .checkpoint import read_json
    from .safetensors_header import _tensor_info

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    out: dict[str, TensorInfo] = {}
    for fname in files:
        try:
            meta = HfApi().parse_safetensors_file_metadata(repo_id, prefix + fname, revision=revision)
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise CheckpointError(f"{repo_id}: cannot read the header of {prefix + fname} ({e})") from None
        end = max((t.data_offsets[1] for t in meta.tensors.values()), default=0)
        for name, t in meta.tensors.items():
            entry = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
            out[name] = _tensor_info(folder / fname, name, entry, end)
    return out
