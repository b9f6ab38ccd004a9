"""Test-suite setup: Triton kernels run through the interpreter on CPU unless TRITON_INTERPRET is set already; the
image folders the tests read are generated here (:mod:`tests.images`), so the suite needs no dataset.

Tests marked ``data`` check what only real images can show (the demo's accuracy on CIFAR-10): they run when a data
folder holding ``cifar10/`` and ``imagenet-sample/`` is given (``pytest --lowbit-data DIR`` or
``LOWBIT_TEST_DATA=DIR``) and are skipped with that reason otherwise.
"""
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.images import cifar_like, imagenet_like  # noqa: E402

DATA_ENV = "LOWBIT_TEST_DATA"


def pytest_addoption(parser):
    parser.addoption("--lowbit-data", default=None, metavar="DIR",
                     help=f"folder with cifar10/ and imagenet-sample/ for the tests marked 'data' (or ${DATA_ENV})")


def pytest_configure(config):
    config.addinivalue_line("markers", "data: needs the real CIFAR-10 / ImageNet-sample folders (--lowbit-data DIR)")


def _data_dir(config):
    d = config.getoption("--lowbit-data") or os.environ.get(DATA_ENV)
    return Path(d).resolve() if d else None


def pytest_collection_modifyitems(config, items):
    d = _data_dir(config)
    if d is not None:
        missing = [p for p in ("cifar10/train", "cifar10/test", "imagenet-sample") if not (d / p).is_dir()]
        if missing:
            raise pytest.UsageError(f"--lowbit-data / {DATA_ENV} folder {d} lacks {', '.join(missing)}")
        return
    skip = pytest.mark.skip(reason=f"needs real images: pass --lowbit-data DIR or set {DATA_ENV}=DIR "
                                   "(a folder holding cifar10/ and imagenet-sample/)")
    for item in items:
        if "data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def real_data(pytestconfig) -> Path:
    """The real data folder (only requested by tests marked ``data``, which are skipped without one)."""
    d = _data_dir(pytestconfig)
    assert d is not None, "tests that use real_data must be marked 'data'"
    return d


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A generated CIFAR-10-shaped root (``train/``, ``test/``; ten classes, 10 + 10 32x32 JPEGs per class)."""
    return cifar_like(tmp_path_factory.mktemp("data") / "cifar10")


@pytest.fixture(scope="session")
def imagenet_folder(tmp_path_factory) -> Path:
    """A generated ImageNet-shaped folder: 1,000 class folders of one JPEG each, varied sizes, some grayscale."""
    return imagenet_like(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture
def gen():
    """A seeded generator, so a failing case can be replayed."""
    return torch.Generator().manual_seed(1234)
