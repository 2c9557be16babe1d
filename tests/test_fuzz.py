"""Hostile and broken input, fuzzed with hypothesis: the codec's algebra, and the checkpoint reader and
loader over mutated safetensors headers, JSON configs and index files.

Every outcome must be a correct result or the package's own error (an NVFP4Error subclass) with a
one-line message: never another exception, a hang or a crash. A header the reader accepts must load in
safetensors itself, tensor for tensor.

Profiles (env NVFP4_FUZZ): ``fast`` (default, CI, ~20 s) or ``long`` (a campaign: 20k+ examples,
minutes). NVFP4_FUZZ_REPORT=path writes the per-test example and outcome counts as JSON.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save as st_save

from nvfp4_fix.checkpoint import inspect_checkpoint, read_header
from nvfp4_fix.codec import BLOCK, FP4_MAX, dequantize, pack, quantize, unpack
from nvfp4_fix.errors import NVFP4Error

PROFILE = os.environ.get("NVFP4_FUZZ", "fast")
LONG = PROFILE == "long"
OUTCOMES: collections.Counter[str] = collections.Counter()
#: What the strategies drew for the example about to run (for the report's "inputs tried" counts).
DRAWN: list[str] = []


def budget(fast: int, long: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=long if LONG else fast,
        deadline=None,
        database=None,  # no .hypothesis/ folder in the repository
        derandomize=not LONG,  # CI sees the same examples every run; the campaign explores
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    if os.environ.get("NVFP4_FUZZ_REPORT"):
        path = Path(os.environ["NVFP4_FUZZ_REPORT"])
        old = json.loads(path.read_text()) if path.exists() else {}
        for k, v in OUTCOMES.items():
            old[k] = old.get(k, 0) + v
        path.write_text(json.dumps(dict(sorted(old.items())), indent=1))


@contextlib.contextmanager
def no_hang(seconds: float = 20.0) -> Iterator[None]:
    """A hang is a failure: SIGALRM turns it into an exception that names itself."""

    def alarm(*_: Any) -> None:
        raise TimeoutError(f"hung for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(test: str, run: Callable[[], Any]) -> Any:
    """Run ``run``: a result, or an NVFP4Error with a one-line message (returned); anything else fails."""
    OUTCOMES[f"{test}: examples"] += 1
    OUTCOMES[f"{test}: input {'/'.join(DRAWN)}"] += 1
    try:
        with no_hang():
            result = run()
    except NVFP4Error as e:
        msg = str(e)
        assert msg and len(msg.splitlines()) == 1 and msg == msg.strip(), repr(msg)
        OUTCOMES[f"{test}: {type(e).__name__}"] += 1
        return e
    OUTCOMES[f"{test}: ok"] += 1
    return result


# ----------------------------------------------------------------------------------------------- codec

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
magnitude = st.sampled_from([1e-6, 1e-3, 0.1, 1.0, 50.0, 1e4])


@st.composite
def weights(draw: st.DrawFn) -> torch.Tensor:
    n = draw(st.integers(1, 4))
    k = BLOCK * draw(st.integers(1, 4))
    flat = draw(st.lists(finite | st.just(0.0), min_size=n * k, max_size=n * k))
    w = torch.tensor(flat, dtype=torch.float32).reshape(n, k)
    return w / max(1.0, float(w.abs().max())) * draw(magnitude)


@given(st.binary(min_size=1, max_size=64), st.integers(1, 4))
@budget(200, 5000)
def test_pack_unpack_is_a_bijection_on_bytes(raw: bytes, rows: int) -> None:
    OUTCOMES["pack/unpack: examples"] += 1
    b = torch.frombuffer(bytearray(raw * rows), dtype=torch.uint8).reshape(rows, -1)
    codes = unpack(b)
    assert codes.shape == (rows, 2 * b.shape[1]) and int(codes.max()) <= 15
    assert torch.equal(codes[:, 0::2], b & 0xF) and torch.equal(codes[:, 1::2], b >> 4)
    assert torch.equal(pack(codes), b)
    assert torch.equal(unpack(pack(codes)), codes)


def e2m1_half_step(a: torch.Tensor) -> torch.Tensor:
    """Half the gap between the E2M1 neighbours of magnitude ``a`` (in units of the block scale)."""
    return torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0))


@given(weights(), st.sampled_from(["divisor", "multiplier"]))
@budget(200, 5000)
def test_quantize_dequantize_error_bound(w: torch.Tensor, convention: str) -> None:
    """Per element, with d = e4m3 block scale x per-tensor multiplier (the block's real step unit):
    |w - deq| <= d * half the E2M1 gap at |w|/d, plus, where |w|/d overshoots 6 because the e4m3
    scale rounded down, the overshoot; that is at most 6 * m * (t/16 for a normal e4m3 scale t,
    2^-10 for a subnormal one). fp32 arithmetic adds a few ulps."""
    OUTCOMES["quantize bound: examples"] += 1
    packed, scale, glob = quantize(w, convention)
    back = dequantize(packed, scale, glob, convention)
    m = float(1 / glob if convention == "divisor" else glob)
    s = scale.float().repeat_interleave(BLOCK, dim=1)
    d = s * m
    a = torch.where(d > 0, w.abs() / d, torch.full_like(w, float("inf")))
    overshoot = (w.abs() - FP4_MAX * d).clamp(min=0)
    t = w.abs().reshape(w.shape[0], -1, BLOCK).amax(-1).repeat_interleave(BLOCK, dim=1) / FP4_MAX / m
    e4m3_rounding = FP4_MAX * m * torch.maximum(t / 16, torch.full_like(t, 2.0**-10))
    assert (overshoot <= e4m3_rounding * (1 + 1e-5)).all()
    bound = torch.where(d > 0, d * e2m1_half_step(a.clamp(max=FP4_MAX)), 0.0) + overshoot
    err = (w - back).abs()
    tol = 1e-6 * (w.abs() + d) + 1e-30
    assert (err <= bound + tol).all(), float((err - bound).max())


@given(weights())
@budget(100, 3000)
def test_both_scale_conventions_agree_after_conversion(w: torch.Tensor) -> None:
    """compressed-tensors' divisor g and ModelOpt's multiplier 1/g describe the same weights."""
    OUTCOMES["conventions: examples"] += 1
    packed, scale, g = quantize(w, "divisor")
    as_ct = dequantize(packed, scale, g, "divisor")
    as_mo = dequantize(packed, scale, (1.0 / g).reshape(()), "multiplier")
    torch.testing.assert_close(as_ct, as_mo, rtol=1e-6, atol=0)
    p2, s2, m = quantize(w, "multiplier")
    back = dequantize(p2, s2, m, "multiplier")
    assert float((back - as_ct).abs().max()) <= 2 * float(s2.float().max() * m) + 1e-30


# ------------------------------------------------------------------------------- safetensors headers

DTYPES = {"U8": torch.uint8, "F8_E4M3": torch.float8_e4m3fn, "F32": torch.float32, "BF16": torch.bfloat16}
JUNK_NUMBERS = [-1, 0, 1, 2**31, 2**53 + 1, 2**63, 2**64 + 5, 10**30, 1.5, -0.0, 1e308]


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.sampled_from(["a", "b.weight", "c.weight_scale", "x.y.z", "é", "n\nl"]),
                          min_size=0, max_size=4, unique=True))  # fmt: skip
    out = {}
    for name in names:
        dt = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
        out[name] = torch.zeros(shape, dtype=torch.float32).to(DTYPES[dt])
    return out


def json_junk() -> st.SearchStrategy[Any]:
    """JSON values of every kind, NaN and huge numbers included; "<HUGE>"/"<DEEP>" become raw text."""
    specials = ["<HUGE>", "<DEEP>", "../../etc/passwd", "/dev/zero", "U8", "F4", "F6_E2M3"]
    leaves = (st.none() | st.booleans() | st.sampled_from(JUNK_NUMBERS) | st.integers() | st.text(max_size=8)
              | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(specials))  # fmt: skip
    nest = lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3)  # noqa: E731
    return st.recursive(leaves, nest, max_leaves=6)


def dump_junk(obj: Any) -> str:
    text = json.dumps(obj, allow_nan=True)
    return text.replace('"<HUGE>"', "9" * 5000).replace('"<DEEP>"', "[" * 3000 + "]" * 3000)


def paths_of(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths_of(v, (*prefix, i))
    return out


def set_path(obj: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


@st.composite
def json_mutation(draw: st.DrawFn, obj: Any) -> bytes:
    """A mutated serialisation of ``obj``: a field replaced or deleted, a duplicate key, NaN, huge and
    deeply nested values, truncation, stray or non-UTF-8 bytes."""
    obj = json.loads(json.dumps(obj))
    kind = draw(st.sampled_from(["replace", "delete", "duplicate", "truncate", "bytes", "nonutf8", "valid"]))
    DRAWN.append(kind)
    if kind in ("replace", "delete"):
        path = draw(st.sampled_from(paths_of(obj)))
        obj = set_path(obj, path, draw(json_junk()), delete=kind == "delete" and bool(path))
    text = dump_junk(obj).encode()
    if kind == "duplicate" and isinstance(obj, dict) and obj:
        key = draw(st.sampled_from(sorted(obj)))
        text = text[:-1] + b", " + json.dumps({key: obj[key]}).encode()[1:]
    if kind == "truncate":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if kind == "bytes" and text:
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + bytes([draw(st.integers(0, 255))]) + text[i + 1 :]
    if kind == "nonutf8":
        i = draw(st.integers(0, len(text)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00"]))
        text = text[:i] + junk + text[i:]
    return text


@st.composite
def mutated_safetensors(draw: st.DrawFn) -> bytes:
    """A valid safetensors file, then its header JSON, header length or data region mutated."""
    DRAWN.clear()
    blob = st_save(draw(tensor_dicts()), metadata=draw(st.none() | st.just({"format": "pt"})))
    (n,) = struct.unpack("<Q", blob[:8])
    header, data = json.loads(blob[8 : 8 + n]), blob[8 + n :]
    where = draw(st.sampled_from(["header", "header", "length", "data", "none"]))
    DRAWN.insert(0, where)
    if where == "header":
        raw = draw(json_mutation(header))
        return struct.pack("<Q", len(raw)) + raw + data
    if where == "length":
        new_n = draw(st.sampled_from([0, 1, n - 1, n + 1, len(blob), 2**63, 2**64 - 1]) | st.integers(0, n))
        return struct.pack("<Q", max(0, new_n)) + blob[8:]
    if where == "data":
        return blob[: draw(st.integers(0, len(blob)))] + draw(st.binary(max_size=8))
    return blob


def check_against_safetensors(path: Path, tensors: dict[str, Any]) -> None:
    """What read_header accepted, safetensors loads, with the same names, dtypes and shapes."""
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name, info in tensors.items():
            t = f.get_tensor(name)
            if info.dtype != "F4":  # torch packs float4 pairs: the last dimension halves
                assert tuple(t.shape) == info.shape, (name, t.shape, info.shape)
            assert t.numel() * t.element_size() == info.nbytes


@given(mutated_safetensors())
@budget(400, 12000)
def test_read_header_on_mutated_files(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        path.write_bytes(blob)
        result = outcome("read_header", lambda: read_header(path))
        if not isinstance(result, NVFP4Error):
            check_against_safetensors(path, result)


# ------------------------------------------------------------------------ whole checkpoints: inspect


def _tiny_model(moe: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, vocab_size=48,
                      architectures=["LlamaForCausalLM"])  # fmt: skip
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny valid checkpoints: compressed-tensors in one file, ModelOpt in three shards with an index."""
    from nvfp4_fix.writer import save_quantized

    root = tmp_path_factory.mktemp("fuzz-bases")
    model = _tiny_model()
    return {
        "ct": save_quantized(model, root / "ct", "compressed-tensors", input_amax=4.0),
        "mo": save_quantized(model, root / "mo", "modelopt", max_shard_bytes=6000),
    }


def _rewrite_shard(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path))


@st.composite
def folder_mutation(draw: st.DrawFn, base: Path) -> Callable[[Path], None]:
    """One hostile change to a checkpoint folder: its config, hf_quant_config, index, a shard's header
    or tensors (deleted, duplicated, wrong dtype or shape), links and files out of place."""
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    jsons = sorted(p.name for p in base.glob("*.json") if p.name != "generation_config.json")
    DRAWN.clear()
    kind = draw(st.sampled_from(["json", "json", "json", "header", "tensor", "files"]))
    if kind == "json":
        name = draw(st.sampled_from(jsons))
        DRAWN.append(name)
        raw = draw(json_mutation(json.loads((base / name).read_text())))
        return lambda d: (d / name).write_bytes(raw)
    shard = draw(st.sampled_from(shards))
    DRAWN.append(kind)
    if kind == "header":
        blob = (base / shard).read_bytes()
        (n,) = struct.unpack("<Q", blob[:8])
        raw = draw(json_mutation(json.loads(blob[8 : 8 + n])))
        return lambda d: (d / shard).write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])
    if kind == "tensor":
        with safe_open(str(base / shard), "pt") as f:
            names = sorted(f.keys())
        victim = draw(st.sampled_from(names))
        how = draw(st.sampled_from(["delete", "dtype", "shape", "duplicate", "nan"]))
        DRAWN.append(how)
        dtype = draw(st.sampled_from([torch.uint8, torch.float8_e4m3fn, torch.float32, torch.bfloat16,
                                      torch.int64]))  # fmt: skip
        shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=3)))

        def edit(t: dict[str, torch.Tensor]) -> None:
            if how == "delete":
                del t[victim]
            elif how == "dtype":
                t[victim] = t[victim].float().to(dtype)
            elif how == "shape":
                t[victim] = torch.zeros(shape, dtype=t[victim].dtype)
            elif how == "nan" and t[victim].is_floating_point():
                t[victim] = torch.full_like(t[victim].float(), float("nan")).to(t[victim].dtype)

        def apply(d: Path) -> None:
            if how == "duplicate":  # the same tensor in a second shard
                with safe_open(str(d / shard), "pt") as f:
                    dup = f.get_tensor(victim)
                from safetensors.torch import save_file

                save_file({victim: dup}, str(d / "zz-extra.safetensors"))
                if (d / "model.safetensors.index.json").exists():
                    idx = json.loads((d / "model.safetensors.index.json").read_text())
                    idx["weight_map"]["zz"] = "zz-extra.safetensors"
                    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
            else:
                _rewrite_shard(d / shard, edit)

        return apply
    how = draw(st.sampled_from(["symlink-out", "index-escape", "pickle", "fifo", "dir", "dotfile", "empty"]))
    DRAWN.append(how)
    escape = draw(st.sampled_from(["../outside.safetensors", "/etc/passwd.safetensors", "a\x00.safetensors",
                                   "sub/../../x.safetensors", ".hidden.safetensors"]))  # fmt: skip

    def files(d: Path) -> None:
        target = d / shard
        if how == "symlink-out":
            outside = d.parent / "outside.safetensors"
            shutil.move(target, outside)
            target.symlink_to(outside)
        elif how == "index-escape":
            idx_path = d / "model.safetensors.index.json"
            idx = json.loads(idx_path.read_text()) if idx_path.exists() else {"weight_map": {}}
            idx["weight_map"]["evil"] = escape
            idx_path.write_text(json.dumps(idx))
        elif how == "pickle":
            for p in d.glob("*.safetensors"):
                p.rename(p.with_suffix(".bin"))
            (d / "model.safetensors.index.json").unlink(missing_ok=True)
        elif how == "fifo":
            target.unlink()
            os.mkfifo(target)
        elif how == "dir":
            target.unlink()
            target.mkdir()
        elif how == "dotfile":
            (d / "._model.safetensors").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
        elif how == "empty":
            target.write_bytes(b"")

    return files


@contextlib.contextmanager
def _mutated_copy(base: Path, mutate: Callable[[Path], None]) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as root:
        d = Path(root) / "ckpt"
        shutil.copytree(base, d, ignore=shutil.ignore_patterns("reference"))
        mutate(d)
        yield d


@given(st.data(), st.sampled_from(["ct", "mo"]))
@budget(250, 8000)
def test_inspect_on_mutated_checkpoints(bases: dict[str, Path], data: st.DataObject, which: str) -> None:
    mutate = data.draw(folder_mutation(bases[which]))
    with _mutated_copy(bases[which], mutate) as d:
        info = outcome("inspect_checkpoint", lambda d=d: inspect_checkpoint(d))
        if not isinstance(info, NVFP4Error):
            for f in {t.file for t in info.tensors.values()}:
                check_against_safetensors(f, {k: t for k, t in info.tensors.items() if t.file == f})
        code, out, err = cli("inspect", "--scan", "--json", "--quiet", str(d))
        OUTCOMES[f"nvfp4-fix inspect --scan: exit {code}"] += 1
        if code == 2:  # bad input: one line on stderr, nothing on stdout
            assert err.startswith("nvfp4-fix: error: ") and err.count("\n") == 1 and not out, err
        else:
            assert code in (0, 1) and not isinstance(info, NVFP4Error), (code, err)
            assert json.loads(out)["format"] == info.format


def cli(*argv: str) -> tuple[int, str, str]:
    """The command line in-process, its output captured (an unexpected exception propagates)."""
    from nvfp4_fix.commands import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), no_hang():
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@given(st.data(), st.sampled_from(["ct", "mo"]))
@budget(12, 600)
def test_from_pretrained_on_mutated_checkpoints(
    bases: dict[str, Path], data: st.DataObject, which: str
) -> None:
    """The whole loader: a model that runs, or an NVFP4Error."""
    from nvfp4_fix.loading import from_pretrained

    mutate = data.draw(folder_mutation(bases[which]))
    with _mutated_copy(bases[which], mutate) as d:
        model = outcome("from_pretrained", lambda d=d: from_pretrained(d, dtype=torch.float32))
        if not isinstance(model, NVFP4Error):
            with torch.no_grad():
                out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
            assert out.shape == (1, 3, model.config.vocab_size)


# ------------------------------------------------------------------------------ targeted regressions


def _header_file(d: Path, header: str, data: bytes = b"") -> Path:
    p = d / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(header.encode())) + header.encode() + data)
    return p


@pytest.mark.parametrize(
    "header,data,word",
    [
        (
            '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}',
            b"abcd",
            "duplicate key",
        ),
        (
            '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}',
            b"ab",
            "without gaps or overlaps",
        ),
        ('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"abcd", "cover 2 of the 4"),
        ('{"a":{"dtype":"U8","shape":[1000000,1000000],"data_offsets":[0,2]}}', b"ab", "do not hold"),
        ('{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', b"ab", "whole number of bytes"),
        ('{"__metadata__":{"x":1}}', b"", "__metadata__"),
        ('{"a":{"dtype":[],"shape":[],"data_offsets":[0,0]}}', b"", "unknown dtype"),
        ('{"a":NaN}', b"", "NaN"),
        ("[" * 5000 + "]" * 5000, b"", "not valid UTF-8 JSON"),
        ('{"a":' + "9" * 5000 + "}", b"", "not valid UTF-8 JSON"),
        ('{"a\\nb":{"dtype":"U8","shape":[3],"data_offsets":[0,2]}}', b"ab", "a\\nb"),
    ],
)
def test_bad_headers_are_one_line_errors(tmp_path: Path, header: str, data: bytes, word: str) -> None:
    with pytest.raises(NVFP4Error) as e:
        read_header(_header_file(tmp_path, header, data))
    assert word in str(e.value) and len(str(e.value).splitlines()) == 1


def test_absurd_config_sizes_fail_before_building(bases: dict[str, Path], tmp_path: Path) -> None:
    import time

    from nvfp4_fix.loading import from_pretrained

    for key, value in [("num_hidden_layers", 10**7), ("hidden_size", 10**9), ("vocab_size", 10**12),
                       ("head_dim", 10**8), ("intermediate_size", 10**12), ("hidden_size", -1),
                       ("num_hidden_layers", 2.5), ("hidden_size", "256")]:  # fmt: skip
        d = shutil.copytree(bases["ct"], tmp_path / f"{key}-{value}")
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
        start = time.perf_counter()
        word = key if not isinstance(value, int) or value < 0 else "imply at least"
        with pytest.raises(NVFP4Error, match=word):
            from_pretrained(d)
        assert time.perf_counter() - start < 5


def test_pickles_and_escapes_are_refused(bases: dict[str, Path], tmp_path: Path) -> None:
    d = shutil.copytree(bases["mo"], tmp_path / "mo")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    for bad, word in [("../x.safetensors", "plain file name"), ("/abs/x.safetensors", "plain file name"),
                      ("x.bin", "not a .safetensors")]:  # fmt: skip
        index = {"weight_map": {**idx["weight_map"], "k": bad}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(NVFP4Error, match=word):
            inspect_checkpoint(d)
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    shard = d / idx["weight_map"]["lm_head.weight"]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(NVFP4Error, match="links outside"):
        inspect_checkpoint(d)
    p = shutil.copytree(bases["ct"], tmp_path / "pickled")
    (p / "model.safetensors").rename(p / "pytorch_model.bin")
    with pytest.raises(NVFP4Error, match=r"pickle files \(pytorch_model.bin\).*safetensors"):
        inspect_checkpoint(p)


def test_hugging_face_cache_snapshot_links_are_accepted(bases: dict[str, Path], tmp_path: Path) -> None:
    """snapshot_download's layout: snapshots/<rev>/* are links into the repository's blobs/."""
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in bases["mo"].iterdir():
        if f.is_file():
            shutil.copy(f, blobs / f"sha-{f.name}")
            (snap / f.name).symlink_to(Path("../../blobs") / f"sha-{f.name}")
    assert inspect_checkpoint(snap).format == "modelopt"


def test_special_files_do_not_hang(bases: dict[str, Path], tmp_path: Path) -> None:
    d = shutil.copytree(bases["ct"], tmp_path / "ct")
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")
    with no_hang(10), pytest.raises(NVFP4Error, match="not a regular file"):
        inspect_checkpoint(d)
    (d / "config.json").unlink()
    (d / "config.json").symlink_to("/dev/zero")
    with no_hang(10), pytest.raises(NVFP4Error, match="not a regular file"):
        inspect_checkpoint(d)
    from nvfp4_fix.loading import from_pretrained

    with no_hang(10), pytest.raises(NVFP4Error, match="not a regular file"):
        from_pretrained(d)


def test_no_pickle_anywhere_in_the_package() -> None:
    src = Path(__file__).parents[1] / "src"
    for f in src.rglob("*.py"):
        text = f.read_text()
        for word in ("torch.load(", "import pickle", "pickle.load", "weights_only", "import dill", "joblib"):
            assert word not in text, f"{f}: {word}"


def test_codec_overflow_inputs_do_not_crash() -> None:
    """Extreme but finite weights: scales saturate, nothing raises or becomes NaN."""
    w = torch.tensor([[3e38, -3e38] + [0.0] * 14, [1e-45] * 16])
    for convention in ("divisor", "multiplier"):
        packed, scale, g = quantize(w, convention)
        back = dequantize(packed, scale, g, convention)
        assert torch.isfinite(back).all() and torch.isfinite(scale.float()).all()
