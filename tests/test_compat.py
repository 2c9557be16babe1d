"""The compressed-tensors fixes, the persistent start-up hook and the check / apply-patch CLI.

Legacy tests (compressed-tensors 0.13.x) show each failure really happens on the shipped fixtures
without the patch and is gone with ``apply_patch(packed_layers=False)``; every load runs in a fresh
subprocess (tests/ct_worker.py) so no patch leaks. Logits are compared with the independent float64
dequantizer of tests/reference.py turned into a plain float32 model: relative L2 error < 1e-4 in
float32 (both sides compute in float32 from the same e2m1 * e4m3 / global products), < 3e-2 at
transformers 4.57's float16 default.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from bridge_venv import bridge_venv
from reference import reference_model, rel_err

import _nvfp4_fix_startup
from nvfp4_fix.compat import compressed_tensors as ct
from nvfp4_fix.compat import startup

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures" / "legacy"
A16 = FIXTURES / "llama-nvfp4a16"
W4A4 = FIXTURES / "llama-nvfp4"
CT_VERSION = ct.installed_version(ct.PACKAGE)
LEGACY = CT_VERSION is not None and CT_VERSION.startswith("0.13.")
legacy = pytest.mark.skipif(not LEGACY, reason=f"needs compressed-tensors 0.13.x, not {CT_VERSION}")
TORCH_COMPILE_BUG = ct.in_range(importlib.metadata.version("torch"), "2.10", None)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHDYNAMO_DISABLE", "NVFP4_FIX_DISABLE")}
    env.update(extra)
    return env


def _worker(tmp: Path, cases: list[str], **env: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(HERE / "ct_worker.py"), str(tmp), *cases],
        capture_output=True, text=True, env=_env(**env), timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _case(fixture: Path, mode: str, dtype: str, patch: str, *flags: str) -> str:
    return ":".join([str(fixture), mode, dtype, patch, *flags])


# ---- legacy: the failures, before and after ------------------------------------------------------


@pytest.fixture(scope="module")
def unpatched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    if not LEGACY or not A16.exists():
        pytest.skip("needs compressed-tensors 0.13.x and tests/fixtures/legacy")
    tmp = tmp_path_factory.mktemp("unpatched")
    cases = [_case(f, m, "auto", "plain") for f in (A16, W4A4) for m in ("default", "dense")]
    out = {r["case"]: r for r in _worker(tmp, cases)}
    nodynamo = [_case(f, "dense", d, "plain") for f in (A16, W4A4) for d in ("auto", "float32")]
    out.update({r["case"] + ":nodynamo": r for r in _worker(tmp, nodynamo, TORCHDYNAMO_DISABLE="1")})
    return out


@pytest.fixture(scope="module")
def patched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    if not LEGACY or not A16.exists():
        pytest.skip("needs compressed-tensors 0.13.x and tests/fixtures/legacy")
    tmp = tmp_path_factory.mktemp("patched")
    cases = [
        _case(A16, "default", "float32", "patch", "lowmem"),
        _case(A16, "dense", "float32", "patch"),
        _case(A16, "default", "auto", "patch"),
        _case(A16, "dense", "auto", "patch"),
        _case(W4A4, "default", "float32", "patch"),
        _case(W4A4, "dense", "float32", "patch"),
    ]
    return {r["case"]: r for r in _worker(tmp, cases)}


@legacy
@pytest.mark.parametrize("fixture", [A16, W4A4], ids=lambda p: p.name)
def test_unpatched_default_load_fails_with_keyerror(unpatched: dict, fixture: Path) -> None:
    r = unpatched[_case(fixture, "default", "auto", "plain")]
    assert not r["ok"] and r["error_type"] == "KeyError" and "weight_scale" in r["error"], r


@legacy
@pytest.mark.skipif(not TORCH_COMPILE_BUG, reason="the compile failure needs torch >= 2.10")
@pytest.mark.parametrize("fixture", [A16, W4A4], ids=lambda p: p.name)
def test_unpatched_dense_load_fails_in_torch_compile(unpatched: dict, fixture: Path) -> None:
    r = unpatched[_case(fixture, "dense", "auto", "plain")]
    assert not r["ok"] and "pack_fp4_to_uint8" in r["error"] and "fake tensor" in r["error"], r


@legacy
@pytest.mark.parametrize("dtype,name", [("auto", "Half"), ("float32", "Float")])
@pytest.mark.parametrize("fixture", [A16, W4A4], ids=lambda p: p.name)
def test_unpatched_dense_load_fails_with_float8_promotion(
    unpatched: dict, fixture: Path, dtype: str, name: str
) -> None:
    r = unpatched[_case(fixture, "dense", dtype, "plain") + ":nodynamo"]
    assert not r["ok"] and r["error_type"] == "RuntimeError", r
    assert (
        f"Promotion for Float8 Types is not supported, attempted to promote Float8_e4m3fn and {name}"
        in r["error"]
    )


@legacy
@pytest.mark.parametrize("mode", ["default", "dense"])
def test_patched_float32_matches_reference(patched: dict, mode: str) -> None:
    flags = ":lowmem" if mode == "default" else ""
    r = patched[_case(A16, mode, "float32", "patch") + flags]
    assert r["ok"], r
    ref = reference_model(A16)
    ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits.float()
    assert rel_err(torch.load(r["logits"]), expected) < 1e-4


@legacy
@pytest.mark.parametrize("mode", ["default", "dense"])
def test_patched_float16_default_dtype_runs_close_to_reference(patched: dict, mode: str) -> None:
    r = patched[_case(A16, mode, "auto", "patch")]
    assert r["ok"] and r["dtype"] == "torch.float16", r
    ref = reference_model(A16)
    ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits.float()
    assert rel_err(torch.load(r["logits"]), expected) < 3e-2


@legacy
def test_patched_w4a4_both_modes_agree(patched: dict) -> None:
    """Both modes fake-quantize the activations the same way: same logits up to float32 rounding."""
    a = patched[_case(W4A4, "default", "float32", "patch")]
    b = patched[_case(W4A4, "dense", "float32", "patch")]
    assert a["ok"] and b["ok"], (a, b)
    assert rel_err(torch.load(a["logits"]), torch.load(b["logits"])) < 1e-4


@legacy
def test_low_memory_mode_keeps_no_dense_weight(patched: dict) -> None:
    r = patched[_case(A16, "default", "float32", "patch", "lowmem")]
    assert r["ok"], r
    assert r["dense_cached"] == 7 * 2 and r["lowmem_dropped"] == r["dense_cached"], r
    assert r["lowmem_dense_cached"] == 0, r
    # Normal mode also fake-quantizes the cached dense weight at each forward; low-memory mode uses the
    # decompressed weight directly. Both are the checkpoint's values: float32 rounding apart.
    assert r["lowmem_rel_diff"] < 1e-5, r


# ---- in-process apply / remove --------------------------------------------------------------------


def _snapshot() -> list[object]:
    import compressed_tensors  # noqa: F401

    owners = []
    for fix in ct.FIXES:
        target = fix.find()
        owners += list(target) if isinstance(target, tuple) else [target]
    return [
        (owner, name, vars(owner).get(name))
        for owner in owners
        if owner is not None
        for name in list(vars(owner))
        if not name.startswith("__")
    ]


def test_status_matches_the_version_table() -> None:
    records = {r.name: r for r in ct.status()}
    assert set(records) == {f.name for f in ct.FIXES}
    for r in records.values():
        assert r.version_has_bug == ct.BUGS_BY_FIX[r.name].affects(ct.versions())
        if not r.version_has_bug:
            assert r.reason.startswith("not needed"), r
    if LEGACY:
        assert records["keep_weight_scale"].version_has_bug and records["cast_fp8_scale"].version_has_bug
    elif CT_VERSION and ct.in_range(CT_VERSION, "0.15", None):
        assert not any(r.version_has_bug for r in records.values())
        assert "fixed upstream" in records["keep_weight_scale"].reason


def test_version_table_ranges() -> None:
    bug = {b.key: b for b in ct.KNOWN_BUGS}
    vers = {"torch": "2.13.0+cpu", "transformers": "4.57.3"}
    assert bug["ct-weight-scale-dropped"].affects({**vers, "compressed-tensors": "0.13.0"})
    assert not bug["ct-weight-scale-dropped"].affects({**vers, "compressed-tensors": "0.14.0.1"})
    assert not bug["ct-float8-promotion"].affects({**vers, "compressed-tensors": "0.12.2"})
    assert bug["ct-pack-fp4-compile"].affects({**vers, "compressed-tensors": "0.12.2"})
    assert not bug["ct-pack-fp4-compile"].affects({"torch": "2.9.1", "compressed-tensors": "0.13.0"})
    assert ct.parse_version("2.13.0+cpu") == (2, 13, 0) and ct.parse_version("nightly") is None


def test_apply_is_idempotent_and_remove_restores_originals() -> None:
    pytest.importorskip("compressed_tensors")
    import nvfp4_fix.patch as p

    before = _snapshot()
    try:
        p.apply_patch(packed_layers=False)
        once = _snapshot()
        p.apply_patch(packed_layers=False)
        assert _snapshot() == once
        assert p.is_patched()
        applied = {r.name for r in ct.status() if r.applied}
        assert applied == {r.name for r in ct.status() if r.needed}
        if LEGACY:
            assert once != before and len(applied) == len(ct.FIXES)
    finally:
        p.remove_patch()
    assert _snapshot() == before
    assert not p.is_patched()


def test_apply_before_import_waits_for_compressed_tensors() -> None:
    code = (
        "import sys, nvfp4_fix.patch as p\n"
        "from nvfp4_fix.compat import compressed_tensors as ct\n"
        "p.apply_patch(packed_layers=False)\n"
        "assert 'compressed_tensors' not in sys.modules and 'torch' not in sys.modules\n"
        "pending = [r.reason for r in ct.status() if r.version_has_bug]\n"
        "assert all(x.startswith('pending') for x in pending), pending\n"
        "import compressed_tensors\n"
        "assert p.is_patched()\n"
        "assert all(r.applied for r in ct.status() if r.needed)\n"
        "print(sum(r.applied for r in ct.status()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip()) == (len(ct.FIXES) if LEGACY else 0)


# ---- the persistent start-up hook -----------------------------------------------------------------


def test_pth_is_one_guarded_import_line() -> None:
    line = startup.pth_line(True)
    assert line.count("\n") == 1 and line.startswith("import ")
    assert "try:" in line and "except Exception" in line
    sys.modules.pop("_no_such_module_", None)
    before = list(sys.meta_path)
    try:
        exec(line.replace(startup.HOOK_MODULE, "_no_such_module_"), {})
        assert startup.lazy_hook_waiting()
        import compressed_tensors  # noqa: F401  (a trigger: the missing hook module stays silent)
    finally:
        sys.meta_path[:] = before


def test_install_is_atomic_and_remove_deletes(tmp_path: Path) -> None:
    path = startup.install(tmp_path, packed_layers=False)
    assert path == tmp_path / startup.PTH_NAME
    assert path.read_text() == startup.pth_line(False)
    assert [p.name for p in tmp_path.iterdir()] == [startup.PTH_NAME]  # no temp file left behind
    st = startup.status(tmp_path)
    assert st["present"] and st["valid"] and st["options"] == {"packed_layers": False}
    path.write_text("import os\n")
    assert not startup.status(tmp_path)["valid"]
    assert startup.remove(tmp_path) and not path.exists()
    assert not startup.remove(tmp_path)


def test_unwritable_site_packages_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(startup.tempfile, "mkstemp", denied)
    with pytest.raises(
        startup.StartupHookError, match=r"cannot write .*nvfp4_fix_startup.pth: Permission denied"
    ):
        startup.install(tmp_path)
    with pytest.raises(startup.StartupHookError, match="expected a directory"):
        startup.install(tmp_path / "missing")


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    return bridge_venv(tmp_path / "venv")


def _py(venv: Path, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=600,
    )


def _cli(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-m", "nvfp4_fix.cli", *args],
        capture_output=True, text=True, env=_env(), timeout=600,
    )  # fmt: skip


def test_persistent_hook_applies_on_import_and_costs_nothing_at_start(venv: Path) -> None:
    pytest.importorskip("compressed_tensors")
    assert _cli(venv, "apply-patch", "--no-packed-layers").returncode == 0
    site = Path(json.loads(_cli(venv, "check", "--json", "--no-import").stdout)["persistent"]["path"]).parent
    assert (site / startup.PTH_NAME).exists() and str(site).startswith(str(venv))
    idle = _py(venv, "import sys; print(sorted(m for m in sys.modules if m.startswith(('torch', 'nvfp4', "
               "'compressed', '_nvfp4'))))")  # fmt: skip
    assert idle.stdout.strip() == "[]" and idle.stderr == ""  # the .pth line imports nothing of ours
    ok = _py(
        venv, "import compressed_tensors; import nvfp4_fix.patch as p; assert p.is_patched(); print('ok')"
    )
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr[-2000:]
    off = _py(
        venv, "import compressed_tensors, nvfp4_fix.patch as p; print(p.is_patched())", NVFP4_FIX_DISABLE="1"
    )
    assert off.stdout.strip() == "False"
    assert _cli(venv, "remove-patch").returncode == 0 and not (site / startup.PTH_NAME).exists()
    gone = _py(venv, "import compressed_tensors; import nvfp4_fix.patch as p; print(p.is_patched())")
    assert gone.stdout.strip() == "False"


def test_persistent_hook_routes_the_very_first_from_pretrained(venv: Path) -> None:
    """transformers imports compressed_tensors inside from_pretrained: the hook must already route."""
    assert _cli(venv, "apply-patch").returncode == 0
    fixture = HERE / "fixtures" / "current" / "llama-nvfp4a16"
    code = (
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(fixture)!r})\n"
        "q = m.model.layers[0].self_attn.q_proj\n"
        "print(type(q).__name__, q.weight_packed.dtype)"
    )
    r = _py(venv, code)
    assert r.returncode == 0 and r.stdout.strip().endswith("NVFP4Linear torch.uint8"), r.stderr[-2000:]
    assert _cli(venv, "remove-patch").returncode == 0


def test_missing_or_broken_package_keeps_start_up_silent(venv: Path, tmp_path: Path) -> None:
    site = Path(_py(venv, "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    startup.install(site)
    bridge = site / "00_bridge.pth"
    this_site = sysconfig.get_paths()["purelib"]
    # uninstalled: the hook module is nowhere on the path
    bridge.write_text(f"{this_site}\n")
    for code in ("pass", "import compressed_tensors"):
        r = _py(venv, code)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), (code, r.stderr)
    # broken: a hook module that raises on import
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "_nvfp4_fix_startup.py").write_text("raise RuntimeError('broken on purpose')\n")
    bridge.write_text(f"{this_site}\n{broken}\n")
    r = _py(venv, "pass")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    # stale: the hook module survived but nvfp4_fix is gone: importing compressed_tensors stays silent
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "_nvfp4_fix_startup.py").write_text(Path(_nvfp4_fix_startup.__file__).read_text())
    bridge.write_text(f"{stale}\n{this_site}\n")
    r = _py(venv, "import compressed_tensors, _nvfp4_fix_startup as h; assert h.ARMED; print('ok')")
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok\n", ""), r.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="needs compressed-tensors")
def test_check_exit_codes_before_and_after_apply_patch(venv: Path) -> None:
    before = _cli(venv, "check", "--json")
    rep = json.loads(before.stdout)
    assert rep["versions"]["compressed-tensors"] == CT_VERSION
    assert before.returncode == (1 if LEGACY else 0), before.stderr
    assert not rep["persistent"]["present"]
    if LEGACY:
        assert set(rep["missing"]) == {f.name for f in ct.FIXES}
        assert {"ct-weight-scale-dropped", "ct-float8-promotion"} <= {b["key"] for b in rep["known_bugs"]}
    applied = _cli(venv, "apply-patch", "--json")
    assert applied.returncode == 0 and json.loads(applied.stdout)["valid"], applied.stderr
    after = _cli(venv, "check", "--json")
    rep = json.loads(after.stdout)
    assert after.returncode == 0, after.stdout[-3000:]
    assert rep["persistent"]["valid"] and rep["persistent"]["armed_in_this_process"] and rep["missing"] == []
    assert _cli(venv, "remove-patch", "--json").returncode == 0
    assert _cli(venv, "check", "--json").returncode == (1 if LEGACY else 0)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "nvfp4_fix.cli", "apply-patch", "--site-packages", str(tmp_path / "nope")],
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "expected a directory" in r.stderr
