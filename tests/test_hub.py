"""Hub ids, revisions and subfolders through a real Hugging Face cache (built here as huggingface_hub
lays it out) with ``HF_HUB_OFFLINE=1``, in fresh processes: transformers' own entry points after
``apply_patch()``, the persistent start-up hook, ``nvfp4_fix.from_pretrained`` and the CLI. Each load
by id must keep the NVFP4 layers packed and give exactly the logits of the same load from the local
folder (same code path, so equality is exact)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bridge_venv import bridge_venv
from hub_cache import add_revision
from hub_worker import IDS

import nvfp4_fix
from nvfp4_fix.loading import from_pretrained

FIX = Path(__file__).parent / "fixtures"
CT = FIX / "demo" / "ct-nvfp4a16"
CT_W4A4 = FIX / "demo" / "ct-nvfp4"
MODELOPT = FIX / "demo" / "modelopt-w4a16_nvfp4"
BF16 = FIX / "demo" / "bf16"
LLAVA = FIX / "current" / "llava-nvfp4a16"
CURRENT = os.environ.get("NVFP4_FIX_TEST_ENV", "current") == "current"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf") / "hub"
    add_revision(root, "org/ct", CT, "main")
    add_revision(root, "org/ct", CT_W4A4, "w4a4")
    add_revision(root, "org/nested", CT, "main", subfolder="sub")
    add_revision(root, "org/modelopt", MODELOPT, "main")
    add_revision(root, "org/plain", BF16, "main")
    if LLAVA.exists():
        add_revision(root, "org/llava", LLAVA, "main")
    return root


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "NVFP4_FIX_DISABLE"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "home"))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _worker(cache: Path, out: Path, *cases: str, python: str = sys.executable) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    worker = Path(__file__).parent / "hub_worker.py"
    proc = subprocess.run(
        [python, str(worker), str(out), *cases], capture_output=True, text=True, env=_env(cache), timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in results.items():
        assert r["ok"], f"{name}: {r.get('trace') or r.get('error')}"
    return results


def _local_logits(path: Path, model_class: object = None, **kw: object) -> torch.Tensor:
    model = from_pretrained(path, model_class, **kw)
    with torch.no_grad():
        out = model(input_ids=IDS)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


@pytest.fixture(scope="module")
def by_id(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("out")
    cases = [
        "causal:org/ct",
        "causal:org/ct@w4a4",
        "causal:org/nested#sub",
        "causal:org/modelopt",
        "base:org/ct",
        "seqcls:org/ct",
        "pipeline:org/ct",
        "own:org/ct",
        "own:org/ct@w4a4",
        "cli:inspect org/ct",
        "cli:verify org/ct --revision w4a4",
        "cli:inspect org/missing",
    ]
    if LLAVA.exists() and CURRENT:
        cases += ["vlm:org/llava", "own:org/llava"]
    return _worker(cache, out, *cases), out


def _saved(out: Path, results: dict, name: str) -> torch.Tensor:
    return torch.load(out / f"{list(results).index(name)}.pt")


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        ("causal:org/ct", CT),
        ("causal:org/ct@w4a4", CT_W4A4),
        ("causal:org/nested#sub", CT),
        ("causal:org/modelopt", MODELOPT),
    ],
)
def test_causal_lm_by_id_revision_and_subfolder(by_id: tuple[dict, Path], name: str, folder: Path) -> None:
    results, out = by_id
    r = results[name]
    assert r["packed"] == 28 and r["is_quantized"] and r["quantizer"] == "NVFP4Quantizer", r
    assert r["missing"] == [] and r["unexpected"] == [], r
    assert torch.equal(_saved(out, results, name), _local_logits(folder))


def test_revision_selects_another_checkpoint(by_id: tuple[dict, Path]) -> None:
    results, out = by_id
    a, b = _saved(out, results, "causal:org/ct"), _saved(out, results, "causal:org/ct@w4a4")
    assert not torch.equal(a, b)  # W4A4 quantizes activations: a different model


def test_base_model_by_id(by_id: tuple[dict, Path]) -> None:
    from transformers import AutoModel

    results, out = by_id
    assert results["base:org/ct"]["packed"] == 28 and results["base:org/ct"]["class"] == "LlamaModel"
    assert torch.equal(_saved(out, results, "base:org/ct"), _local_logits(CT, AutoModel))


def test_new_sequence_classification_head_is_initialised(by_id: tuple[dict, Path]) -> None:
    r = by_id[0]["seqcls:org/ct"]
    assert r["packed"] == 28 and r["missing"] == ["score.weight"], r
    assert 0.0 < r["score_std"] < 1.0  # transformers' init (normal, std = initializer_range), not zeros
    logits = _saved(by_id[1], by_id[0], "seqcls:org/ct")
    assert logits.shape[-1] == 2 and torch.isfinite(logits).all()


def test_pipeline_by_id(by_id: tuple[dict, Path]) -> None:
    r = by_id[0]["pipeline:org/ct"]
    assert r["packed"] == 28 and r["text"].startswith("Return the") and len(r["text"]) > len("Return the")


def test_own_from_pretrained_by_id_uses_config_architectures(by_id: tuple[dict, Path]) -> None:
    results = by_id[0]
    assert results["own:org/ct"] == {"packed": 28, "class": "LlamaForCausalLM", "ok": True}
    assert results["own:org/ct@w4a4"]["packed"] == 28
    if "own:org/llava" in results:
        assert results["own:org/llava"]["class"] == "LlavaForConditionalGeneration"
        assert results["vlm:org/llava"]["packed"] > 0


def test_cli_by_id(by_id: tuple[dict, Path]) -> None:
    results = by_id[0]
    assert results["cli:inspect org/ct"]["exit"] == 0
    assert results["cli:verify org/ct --revision w4a4"]["exit"] == 0
    assert results["cli:inspect org/missing"]["exit"] == 2


def test_missing_id_offline_names_id_and_cache(cache: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nvfp4_fix.cli", "inspect", "org/missing"],
        capture_output=True, text=True, env=_env(cache), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert (
        len(line.splitlines()) == 1
        and "org/missing" in line
        and str(cache) in line
        and "HF_HUB_OFFLINE" in line
    )


def test_plain_model_by_id_is_untouched(cache: Path, tmp_path: Path) -> None:
    r = _worker(cache, tmp_path, "plain:org/plain")["plain:org/plain"]
    assert r["equal"]


def _hook_venv(tmp_path: Path, cache: Path) -> str:
    """A bridge venv (tests/bridge_venv.py) with the persistent start-up hook installed into it by
    `nvfp4-fix apply-patch`; returns its python."""
    python = str(bridge_venv(tmp_path / "venv") / "bin" / "python")
    cmd = [python, "-m", "nvfp4_fix.cli", "apply-patch"]
    done = subprocess.run(cmd, env=_env(cache), capture_output=True)
    assert done.returncode == 0, done.stderr
    return python


def test_persistent_hook_in_a_process_that_never_imports_the_package(cache: Path, tmp_path: Path) -> None:
    python = _hook_venv(tmp_path, cache)
    r = _worker(cache, tmp_path / "out", "hook:org/ct", python=python)["hook:org/ct"]
    assert r["packed"] == 28 and r["nvfp4_imported"]
    assert torch.equal(torch.load(tmp_path / "out" / "0.pt"), _local_logits(CT))


def test_registry_is_restored_after_own_from_pretrained() -> None:
    from transformers.quantizers import auto

    before = dict(auto.AUTO_QUANTIZER_MAPPING)
    if nvfp4_fix.is_patched():
        pytest.skip("the patch is active in this process")
    from_pretrained(CT)
    assert auto.AUTO_QUANTIZER_MAPPING == before and "modelopt" not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING


def test_compressed_tensors_checkpoint_without_the_compressed_tensors_package(tmp_path: Path) -> None:
    """transformers' own config class needs compressed-tensors; the packed layers do not. With the package
    unimportable the NVFP4 checkpoint still loads packed and saves its config as written."""
    code = (
        "import sys, json; sys.modules['compressed_tensors'] = None\n"
        "import nvfp4_fix\n"
        f"m = nvfp4_fix.from_pretrained({str(CT)!r})\n"
        "n = sum(type(x).__name__ == 'NVFP4Linear' for x in m.modules())\n"
        f"m.save_pretrained({str(tmp_path / 'out')!r})\n"
        f"saved = json.load(open({str(tmp_path / 'out' / 'config.json')!r}))['quantization_config']\n"
        f"orig = json.load(open({str(CT / 'config.json')!r}))['quantization_config']\n"
        "print(json.dumps({'packed': n, 'same_config': saved == orig}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"packed": 28, "same_config": True}


#: sitecustomize for the server's processes (transformers serve may load the model in a child process):
#: reports what the served model's layers are. Importing the quantizer module registers nothing.
REPORT = """
from nvfp4_fix.quantizer import NVFP4Quantizer

finish = NVFP4Quantizer._process_model_after_weight_loading

def reporting(self, model, **kwargs):
    model = finish(self, model, **kwargs)
    n = sum(type(m).__name__ == "NVFP4Linear" and m.weight_packed.dtype.itemsize == 1
            for m in model.modules())
    print(f"packed NVFP4 layers: {n}", flush=True)
    return model

NVFP4Quantizer._process_model_after_weight_loading = reporting
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_transformers_serve_by_id_answers_packed(cache: Path, tmp_path: Path) -> None:
    """`transformers serve org/ct` in a process where only the persistent hook knows about this package:
    the server loads the model packed (its log says so) and answers one completion."""
    import time
    import urllib.request

    pytest.importorskip("fastapi")
    if not CURRENT:
        pytest.skip("transformers serve is tested in the current environment (the serving extras)")
    python = _hook_venv(tmp_path, cache)
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(REPORT)
    env = _env(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), env["PYTHONPATH"]])
    cmd = [python, "-m", "transformers.cli.transformers", "serve", "org/ct", "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*cmd, "--port", str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    try:
        body = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and server.poll() is None:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/completions",
                    data=json.dumps({"model": "org/ct", "prompt": "Return the", "max_tokens": 5}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=60) as resp:
                    body = json.loads(resp.read())
                break
            except OSError:
                time.sleep(1)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert body is not None, text[-3000:]
    assert body["choices"][0]["text"], body
    assert "packed NVFP4 layers: 28" in text, text[-3000:]


def test_inspect_an_id_not_downloaded_reads_headers_only(tmp_path: Path) -> None:
    """`nvfp4-fix inspect org/model` against a hub endpoint (huggingface_hub's own client over HTTP to a
    local server holding the demo checkpoint): the report equals the local folder's, only configs are
    downloaded, and of the weight file only the header's byte range is read."""
    from hub_server import HubServer

    server = HubServer("org/remote", CT)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=server.url, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
        env["HF_HUB_DISABLE_TELEMETRY"] = "1"
        cmd = [sys.executable, "-m", "nvfp4_fix.cli", "inspect", "org/remote", "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        remote = json.loads(proc.stdout)
        size = (CT / "model.safetensors").stat().st_size
        assert 0 < server.bytes_read("model.safetensors") < 200_000 < size  # the header range only
    finally:
        server.close()
    assert not list((tmp_path / "hub").rglob("model.safetensors"))
    cmd = [sys.executable, "-m", "nvfp4_fix.cli", "inspect", str(CT), "--json"]
    local = json.loads(subprocess.run(cmd, capture_output=True, text=True).stdout)
    assert remote.keys() == local.keys()
    for key in local:
        if key == "memory":  # from headers alone the tensors' bytes are known, not each header's few KB
            disk = remote[key].pop("disk"), local[key].pop("disk")
            assert abs(disk[0] - disk[1]) < 0.01 * disk[1], disk
        if key not in ("path",):
            assert remote[key] == local[key], key
