"""Count the kernel launches of a piece of eager code without a GPU profiler: every aten op that runs a
kernel (views and uninitialized allocations do not) and every Triton launch (compiled or interpreted).

    with LaunchCounter() as c:
        f()
    c.total, c.names
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_ALLOCATIONS = {
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
    aten.new_empty_strided.default,
}  # fmt: skip


def _launches(func) -> bool:
    if func in _ALLOCATIONS:
        return False
    returns = func._schema.returns
    views = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
    return not views


class LaunchCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self._in_triton = 0
        self._saved: list[tuple[type, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._in_triton and _launches(func):
            self.names.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        from triton.runtime import interpreter, jit

        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            real = cls.run
            self._saved.append((cls, real))

            def run(fn_self, *a, _real=real, **kw):
                self.names.append(f"triton:{getattr(fn_self.fn, '__name__', fn_self)}")
                self._in_triton += 1  # the interpreter's own tensor copies are not launches
                try:
                    return _real(fn_self, *a, **kw)
                finally:
                    self._in_triton -= 1

            cls.run = run
        return super().__enter__()

    def __exit__(self, *exc):
        for cls, real in self._saved:
            cls.run = real
        self._saved.clear()
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return len(self.names)
