"""A real Hugging Face hub cache layout, as huggingface_hub writes it, built from local folders:

models--ORG--NAME/blobs/<sha256 of the file>
models--ORG--NAME/snapshots/<commit>/<path>  -> relative symlink to ../../blobs/<sha256>
models--ORG--NAME/refs/<branch>              the commit hash
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_revision(cache: Path, repo_id: str, folder: Path, branch: str, subfolder: str = "") -> str:
    """Put every file of ``folder`` (under ``subfolder`` in the repo) into the cache as one commit that
    ``branch`` points at; returns the commit hash."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1(f"{repo_id}:{branch}:{subfolder}".encode()).hexdigest()
    for src in files:
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        rel = Path(subfolder) / src.relative_to(folder) if subfolder else src.relative_to(folder)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    refs = repo / "refs" / branch
    refs.parent.mkdir(parents=True, exist_ok=True)
    refs.write_text(commit)
    return commit
