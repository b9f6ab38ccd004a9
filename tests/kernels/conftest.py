"""Fixtures of the kernel tests; the background start of the GPU compile checks' run (:mod:`._compile_run`)."""
import importlib.util

import pytest
import torch

from kernels import configs as C

from . import _compile_run


def pytest_collection_finish(session):
    if importlib.util.find_spec("triton.backends.nvidia.compiler") is not None and any(
            item.nodeid.split("::")[0].endswith("test_compile_gpu.py") for item in session.items):
        _compile_run.start()


def pytest_sessionfinish(session):
    _compile_run.stop()


@pytest.fixture(params=["one pass", "two passes"])
def passes(request, monkeypatch):
    """Each test runs the one-pass kernels (every ``L <= 256`` here) and the two-pass ones (forced: no one-pass
    length); returns the variant and the list of the configs the dispatcher asked for, ``("one" | "two", l)``."""
    if request.param == "two passes":
        monkeypatch.setattr(C, "ONE_PASS_MAX_L", 0)
    else:
        monkeypatch.setattr(C, "ONE_PASS_SULQ", True)  # (the dispatcher's default runs SULQ in two passes)
    asked = []
    for name, tag in (("one_pass_config", "one"), ("attention_config", "two")):
        real = getattr(C, name)
        monkeypatch.setattr(C, name, lambda l, *a, _r=real, _t=tag, **k: asked.append((_t, l)) or _r(l, *a, **k))
    return request.param, asked


@pytest.fixture
def ieee_sqrt(monkeypatch):
    """``torch.sqrt`` of CPU float32 tensors correctly rounded (through float64), as torch's CUDA sqrt and the
    kernels' ``sqrt_rn`` are, so the LayerNorm reference's std rounds as on a GPU: torch's vectorised CPU float32
    sqrt is an ulp off on about 14% of inputs."""
    real = torch.sqrt

    def sqrt(t, *args, **kwargs):
        if not args and not kwargs and t.dtype == torch.float32 and not t.is_cuda:
            return t.double().sqrt().float()
        return real(t, *args, **kwargs)
    monkeypatch.setattr(torch, "sqrt", sqrt)
