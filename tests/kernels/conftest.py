"""Fixtures of the kernel tests."""
import pytest

from kernels import configs as C


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
