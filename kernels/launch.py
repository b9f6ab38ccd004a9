"""A kernel launch as data: the kernel, its grid, runtime arguments, constexprs and compile options.

:mod:`kernels.library` builds one per call and runs it; :mod:`kernels.gpu_compile` builds the same launches on
``meta`` tensors and compiles them for real GPU targets, so what is checked is exactly what would run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

from triton.runtime.interpreter import InterpretedFunction

from .interpreter import exact_fma


@dataclass
class Launch:
    kernel: Any
    grid: Tuple[int, ...]
    args: Dict[str, Any]
    meta: Dict[str, Any]
    options: Dict[str, int] = field(default_factory=dict)

    def __call__(self) -> None:
        if isinstance(self.kernel, InterpretedFunction):
            exact_fma()
        elif any(getattr(v, "is_cuda", True) is False for v in self.args.values() if hasattr(v, "device")):
            raise RuntimeError(f"{self.kernel.__name__}: the Triton kernels run on CPU tensors only through Triton's "
                               f"interpreter; start Python with TRITON_INTERPRET=1 in the environment (or use the "
                               f"CPU backend: kernels.ops.set_backend('cpu'))")
        self.kernel[self.grid](**self.args, **self.meta, **self.options)

    def describe(self) -> str:
        """Constexprs, options and the dtypes / integer divisibility that specialise the compiled kernel."""
        meta = ", ".join(f"{k}={getattr(v, '__name__', v)}" for k, v in self.meta.items())
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        dts = ", ".join(f"{k}:{str(v.dtype).replace('torch.', '')}" for k, v in self.args.items()
                        if hasattr(v, "dtype") and v.dtype.is_floating_point and k.startswith(("x", "out", "g")))
        return "; ".join(s for s in (meta, opts, dts) if s)

    def key(self) -> tuple:
        """What the compiled binary depends on (dedupes launches that compile to the same kernel)."""
        sig = []
        for k, v in self.args.items():
            if hasattr(v, "dtype"):
                sig.append((k, str(v.dtype)))
            elif isinstance(v, bool):
                sig.append((k, "bool"))
            elif isinstance(v, int):
                sig.append((k, "one" if v == 1 else ("d16" if v % 16 == 0 else "int")))
            else:
                sig.append((k, type(v).__name__))
        meta = tuple((k, getattr(v, "__name__", v)) for k, v in self.meta.items())
        return (self.kernel.__name__, tuple(sig), meta, tuple(sorted(self.options.items())))
