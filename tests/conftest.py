"""Test-suite setup: Triton kernels run through the interpreter on CPU unless TRITON_INTERPRET is set already."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def gen():
    """A seeded generator, so a failing case can be replayed."""
    return torch.Generator().manual_seed(1234)
