"""nvfp4_fix.settings: environment parsing, clear errors naming the variable, override() restoring."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from nvfp4_fix import settings
from nvfp4_fix.settings import ENV_NAMES, KERNEL_NAMES, Settings, from_environ


def test_every_field_has_one_variable():
    fields = [f.name for f in dataclasses.fields(Settings)]
    assert sorted(fields) == sorted(ENV_NAMES)
    assert len(set(ENV_NAMES.values())) == len(ENV_NAMES)
    assert all(v.startswith("NVFP4_FIX_") for v in ENV_NAMES.values())


def test_defaults_when_unset_or_empty():
    assert from_environ({}) == Settings()
    assert from_environ({v: "" for v in ENV_NAMES.values()}) == Settings()
    d = Settings()
    assert (d.kernel, d.fuse, d.dequant_mm_min_m, d.scratch_mb, d.cpu_chunk_mb) == (
        "auto",
        True,
        256,
        256,
        16,
    )
    assert (d.cpu_compile, d.cuda_mma, d.nvrtc_library, d.decode_attention, d.kv_append) == (
        True,
        True,
        None,
        True,
        True,
    )
    assert d.humming is False  # opt-in: it keeps a second copy of the weights it runs
    assert d.cuda_moe is True and d.moe_router is True
    assert d.moe_route_kernel is True  # measured faster on an H100 (session 16)


@pytest.mark.parametrize(
    "text, value",
    [
        ("0", False),
        ("1", True),
        ("false", False),
        ("True", True),
        (" off ", False),
        ("YES", True),
        ("no", False),
    ],
)
def test_bool_variables(text, value):
    for name in (
        "fuse",
        "cpu_compile",
        "cuda_mma",
        "cuda_moe",
        "decode_attention",
        "kv_append",
        "moe_router",
        "moe_route_kernel",
        "humming",
    ):
        got = getattr(from_environ({ENV_NAMES[name]: text}), name)
        assert got is value, f"{ENV_NAMES[name]}={text!r} gave {got!r}"


def test_int_kernel_and_path_variables():
    s = from_environ(
        {
            "NVFP4_FIX_DEQUANT_MM_MIN_M": "512",
            "NVFP4_FIX_SCRATCH_MB": " 64",
            "NVFP4_FIX_CPU_CHUNK_MB": "3",
            "NVFP4_FIX_KERNEL": "reference",
            "NVFP4_FIX_NVRTC": "/opt/cuda/lib64/libnvrtc.so.12",
        }
    )
    assert (s.dequant_mm_min_m, s.scratch_mb, s.cpu_chunk_mb) == (512, 64, 3)
    assert s.kernel == "reference" and s.nvrtc_library == "/opt/cuda/lib64/libnvrtc.so.12"
    for name in KERNEL_NAMES:
        assert from_environ({"NVFP4_FIX_KERNEL": name}).kernel == name


@pytest.mark.parametrize(
    "var, text, expected",
    [
        ("NVFP4_FIX_KERNEL", "fastest", "choose one of auto, reference"),
        ("NVFP4_FIX_FUSE", "2", "expected one of 1, true"),
        ("NVFP4_FIX_KV_APPEND", "disabled", "expected one of 1, true"),
        ("NVFP4_FIX_SCRATCH_MB", "256MB", "expected a positive integer"),
        ("NVFP4_FIX_CPU_CHUNK_MB", "0", "expected a positive integer"),
        ("NVFP4_FIX_DEQUANT_MM_MIN_M", "-1", "expected a positive integer"),
    ],
)
def test_invalid_values_name_the_variable(var, text, expected):
    with pytest.raises(ValueError) as info:
        from_environ({var: text})
    msg = str(info.value)
    assert f"environment variable {var}" in msg and expected in msg and text in msg, msg


def test_override_replaces_and_restores():
    before = settings.current()
    with settings.override(kernel="reference", fuse=False) as inside:
        assert settings.current() is inside
        assert (inside.kernel, inside.fuse) == ("reference", False)
        assert inside.scratch_mb == before.scratch_mb  # untouched fields carry over
        with settings.override(scratch_mb=8):
            assert (settings.current().kernel, settings.current().scratch_mb) == ("reference", 8)
        assert settings.current() is inside
    assert settings.current() is before


def test_override_restores_after_an_exception():
    before = settings.current()
    with pytest.raises(RuntimeError, match="boom"):
        with settings.override(cuda_mma=False):
            raise RuntimeError("boom")
    assert settings.current() is before


def test_override_rejects_bad_fields_and_values():
    before = settings.current()
    with pytest.raises(TypeError, match="unknown nvfp4-fix setting.*'kernal'"):
        with settings.override(kernal="reference"):
            pass
    with pytest.raises(ValueError, match="field 'kernel': unknown NVFP4 kernel 'fast'"):
        with settings.override(kernel="fast"):
            pass
    with pytest.raises(TypeError, match="field 'fuse': expected a bool, got '0'"):
        with settings.override(fuse="0"):
            pass
    with pytest.raises(ValueError, match="field 'scratch_mb': expected a positive integer"):
        with settings.override(scratch_mb=0):
            pass
    assert settings.current() is before


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.current().kernel = "reference"  # type: ignore[misc]


def test_environment_is_read_once(monkeypatch):
    first = settings.current()
    monkeypatch.setenv("NVFP4_FIX_KERNEL", "reference")
    assert settings.current() is first  # a later change of the environment does not reach the hot path


def _fresh_process(env_extra: dict[str, str], code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVFP4_FIX_") or k == "NVFP4_FIX_TEST_ENV"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_environment_sets_a_fresh_process():
    code = "from nvfp4_fix import settings; s = settings.current(); print(s.kernel, s.fuse, s.scratch_mb)"
    res = _fresh_process(
        {"NVFP4_FIX_KERNEL": "chunked", "NVFP4_FIX_FUSE": "0", "NVFP4_FIX_SCRATCH_MB": "32"}, code
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["chunked", "False", "32"]


def test_bad_environment_fails_on_first_use_naming_the_variable():
    code = (
        "import nvfp4_fix.kernels as K, torch\n"
        "K.nvfp4_linear(torch.zeros(1, 16), torch.zeros(1, 8, dtype=torch.uint8),"
        " torch.ones(1, 1).to(torch.float8_e4m3fn), torch.ones(()))\n"
    )
    res = _fresh_process({"NVFP4_FIX_CUDA_MMA": "maybe"}, code)
    assert res.returncode != 0
    assert "ValueError: environment variable NVFP4_FIX_CUDA_MMA='maybe'" in res.stderr, res.stderr
