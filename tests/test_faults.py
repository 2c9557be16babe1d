"""Faults while writing: SIGKILL mid-write and a full disk (RLIMIT_FSIZE) during `dequantize`,
`convert` and `save_pretrained`. Afterwards OUT is absent or still the old output, never a half-written
checkpoint; what a killed writer leaves is one dot-prefixed folder beside OUT that no loader reads."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tools_helpers import CT, tiny_model, write_sparse_checkpoint

from nvfp4_fix.checkpoint import inspect_checkpoint
from nvfp4_fix.errors import NVFP4Error
from nvfp4_fix.writer import save_quantized

#: Big enough that writing its dense copy takes a while (~80 MB of bf16), cheap to make (sparse input).
BIG = {"layers": 1, "hidden": 1024, "intermediate": 1024, "heads": 8, "kv_heads": 8, "vocab": 32000}


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sparse_checkpoint(tmp_path_factory.mktemp("big") / "src", CT, **BIG)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_quantized(tiny_model(), tmp_path_factory.mktemp("small") / "src", CT)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def check_after_fault(parent: Path, out: Path, old: dict[str, bytes] | None) -> list[Path]:
    """OUT is the old output byte for byte (or absent); everything else new is dot-prefixed and not
    a checkpoint the loader reads. Returns the leftovers."""
    if old is None:
        assert not out.exists()
    else:
        assert snapshot(out) == old
    leftovers = [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert {p.name for p in parent.iterdir()} - {p.name for p in leftovers} <= {out.name, "src"}
    for p in leftovers:
        with pytest.raises(NVFP4Error):
            inspect_checkpoint(p)  # a partial folder: no config.json yet, or only dot-prefixed parts
    return leftovers


def cli(*args: str | Path, preexec: Callable[[], None] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "nvfp4_fix.cli", *map(str, args), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec,
    )  # fmt: skip


def kill_mid_write(proc: subprocess.Popen[str], parent: Path, out: Path, timeout: float = 120) -> bool:
    """SIGKILL ``proc`` as soon as a temporary folder beside OUT holds a non-empty file; True when it
    was caught mid-write, False when it finished first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for tmp in parent.glob(f".{out.name}.partial-*"):
            with contextlib.suppress(FileNotFoundError):  # it may be renamed away meanwhile
                if any(f.stat().st_size > 0 for f in tmp.iterdir()):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return True
        time.sleep(0.001)
    proc.kill()
    proc.communicate()
    return False


def fsize_limit(nbytes: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))

    return apply


def test_dequantize_killed_mid_write(big: Path, small: Path, tmp_path: Path) -> None:
    """Killed while writing its ~80 MB shard over an older output: the old output stays."""
    parent = shutil.copytree(big, tmp_path / "src").parent
    out = shutil.copytree(small, parent / "out")
    old = snapshot(out)
    proc = cli("dequantize", parent / "src", out, "--force")
    assert kill_mid_write(proc, parent, out), "finished before it could be killed mid-write"
    assert proc.returncode == -signal.SIGKILL
    leftovers = check_after_fault(parent, out, old)
    assert len(leftovers) == 1  # the killed writer's temporary folder, hidden
    inspect_checkpoint(out)  # the old output still loads


@pytest.mark.parametrize("command", ["dequantize", "convert"])
def test_full_disk_leaves_nothing(big: Path, small: Path, tmp_path: Path, command: str) -> None:
    """RLIMIT_FSIZE makes the first large write fail with EFBIG (Python ignores SIGXFSZ), as a full
    disk would: a one-line error, exit code 2, the old output intact, no temporary folder left."""
    parent = shutil.copytree(big, tmp_path / "src").parent
    out = parent / "out"
    shutil.copytree(small, out)
    old = snapshot(out)
    extra = ["--to", "modelopt"] if command == "convert" else []
    proc = cli(command, parent / "src", out, "--force", *extra, preexec=fsize_limit(20 * 2**20))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert err.startswith("nvfp4-fix: error: ") and err.count("\n") == 1, err
    assert "File too large" in err
    assert check_after_fault(parent, out, old) == []


SAVE_CHILD = """
import sys, torch
from nvfp4_fix.loading import from_pretrained
model = from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model.save_pretrained(sys.argv[2])
"""


def test_save_pretrained_killed_mid_write_keeps_the_old_folder(small: Path, tmp_path: Path) -> None:
    """Killed as soon as transformers has written a first file into the temporary folder."""
    out = shutil.copytree(small, tmp_path / "saved")
    (out / "tokenizer.json").write_text("{}")
    old = snapshot(out)
    proc = subprocess.Popen([sys.executable, "-c", SAVE_CHILD, str(small), str(out)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert kill_mid_write(proc, tmp_path, out), "finished before it could be killed mid-write"
    leftovers = check_after_fault(tmp_path, out, old)
    assert len(leftovers) == 1
    assert inspect_checkpoint(out).format == CT


def _tiny_loaded(small: Path):
    from nvfp4_fix.loading import from_pretrained

    return from_pretrained(small, dtype=torch.bfloat16)


def test_save_pretrained_full_disk_keeps_the_old_folder(small: Path, tmp_path: Path) -> None:
    model = _tiny_loaded(small)
    out = shutil.copytree(small, tmp_path / "saved")
    old = snapshot(out)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        with pytest.raises(Exception, match="File too large"):
            model.save_pretrained(out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert check_after_fault(tmp_path, out, old) == []


def test_save_pretrained_is_atomic_and_keeps_other_files(small: Path, tmp_path: Path) -> None:
    """Into an existing folder: weights and configs replaced in one rename, stale shards gone, the
    tokenizer, README and sub-folders (e.g. trainer checkpoints) kept, as transformers keeps them."""
    model = _tiny_loaded(small)
    out = tmp_path / "saved"
    out.mkdir()
    (out / "tokenizer.json").write_text('{"keep": 1}')
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "state.json").write_text("{}")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    index = {"weight_map": {"x": "model-00001-of-00002.safetensors"}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "hf_quant_config.json").write_text("{}")  # stale: this checkpoint is compressed-tensors
    before = os.stat(out).st_ino
    model.save_pretrained(out)
    names = {p.name for p in out.iterdir()} - {"generation_config.json"}
    assert names == {"checkpoint-5", "config.json", "model.safetensors", "tokenizer.json"}, names
    assert (out / "tokenizer.json").read_text() == '{"keep": 1}'
    assert (out / "checkpoint-5" / "state.json").exists()
    assert os.stat(out).st_ino != before  # a new folder, swapped in
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]
    assert inspect_checkpoint(out).format == CT
    model.save_pretrained(tmp_path / "new" / "deeper")  # a fresh target, parents made
    assert inspect_checkpoint(tmp_path / "new" / "deeper").format == CT


def test_save_pretrained_error_mid_write_changes_nothing(small: Path, tmp_path: Path, monkeypatch) -> None:
    import transformers.modeling_utils

    model = _tiny_loaded(small)
    out = shutil.copytree(small, tmp_path / "saved")
    old = snapshot(out)

    def broken(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"half a shard")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", broken)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(out)
    assert check_after_fault(tmp_path, out, old) == []
