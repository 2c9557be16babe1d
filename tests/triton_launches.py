"""Record the Triton launches eager code makes under Triton's interpreter, then compile them for a GPU
target in a process without the interpreter (the interpreter accepts code real compilation rejects).

    with recorded() as launches:  # the kernels do not run
        f()
    failures = compile_for_gpu(launches)

A launch is recorded as the real JIT would specialize it (``triton.runtime.jit``): params annotated
``tl.constexpr`` and None or 1 arguments are constexprs, other arguments get the JIT's type string
(``*bf16``, ``i32``, ``i64``, ``fp32``, ...); divisibility hints are left out. ``python triton_launches.py``
compiles the launches (JSON on stdin) for sm_90 and prints the failures (JSON on stdout).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.runtime.jit import native_specialize_impl

TARGET = ("cuda", 90, 32)
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _value(v: object) -> object:
    """A constexpr's value as JSON (tl dtypes as {"dtype": name})."""
    if isinstance(v, tl.constexpr):
        v = v.value
    if isinstance(v, tl.dtype):
        return {"dtype": str(v)}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"constexpr value {v!r} has no JSON form")


def describe(fn, args: tuple, kwargs: dict) -> dict:
    """The launch ``fn[grid](*args, **kwargs)`` of the Python kernel function fn, as JSON."""
    params = inspect.signature(fn).parameters
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in params}
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise TypeError(f"{fn.__name__}: launch options {sorted(unknown)} are not recorded")
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs = {}, {}
    for name, arg in bound.arguments.items():
        if "constexpr" in str(params[name].annotation):
            ty = "constexpr"
        else:
            ty = native_specialize_impl(BaseBackend, arg, False, True, True)[0]
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = _value(arg)
    return {
        "module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
        "options": options,
    }  # fmt: skip


@contextlib.contextmanager
def recorded() -> Iterator[list[dict]]:
    """Record (and skip) every interpreted launch in the block, each distinct one once, in order."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[dict] = []
    seen: set[str] = set()

    def run(self, *args, grid, warmup, **kwargs):
        launch = describe(self.fn, args, kwargs)
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen.add(key)
            launches.append(launch)

    real = InterpretedFunction.run
    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = real


def compile_for_gpu(launches: list[dict], timeout: float = 600) -> dict:
    """{"skip": reason} where this machine cannot compile for the target, else {"failures": [launch with
    its "error"], "compiled": count}: the compiles run in a fresh process, without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run(
        [sys.executable, __file__], input=json.dumps(launches), capture_output=True, text=True, env=env,
        timeout=timeout,
    )  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"the compile process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


@triton.jit
def _probe_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)


def _compile(launch: dict):
    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    constexprs = {
        k: tl.dtype(v["dtype"]) if isinstance(v, dict) else v for k, v in launch["constexprs"].items()
    }
    src = triton.compiler.ASTSource(fn=fn, signature=launch["signature"], constexprs=constexprs)
    return triton.compile(src, target=GPUTarget(*TARGET), options=launch["options"])


def _main() -> dict:
    launches = json.loads(sys.stdin.read())
    probe = {
        "module": __name__, "kernel": "_probe_kernel", "signature": {"x_ptr": "*fp32", "BLOCK": "constexpr"},
        "constexprs": {"BLOCK": 128}, "options": {"num_warps": 4},
    }  # fmt: skip
    try:
        if "cubin" not in _compile(probe).asm:
            return {"skip": f"triton {triton.__version__} compiles no cubin for {TARGET}"}
    except Exception as e:  # no CUDA backend, no ptxas, ...
        return {"skip": f"triton {triton.__version__} cannot compile for {TARGET}: {type(e).__name__}: {e}"}
    failures = []
    for launch in launches:
        try:
            _compile(launch)
        except Exception as e:
            failures.append({**launch, "error": f"{type(e).__name__}: {e}"})
    return {"failures": failures, "compiled": len(launches)}


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET")
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(_main()))
