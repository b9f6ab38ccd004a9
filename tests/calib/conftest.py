import pytest

from calib.sd_turbo import SDTurbo
from tests.calib.tiny_sd import tiny_pipeline, tiny_vit


@pytest.fixture(scope="session")
def tiny_pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def sd(tiny_pipe):
    return SDTurbo.from_pipeline(tiny_pipe)


@pytest.fixture(scope="session")
def vit():
    return tiny_vit().requires_grad_(False)
