"""Fixtures shared by the export tests."""
import pytest

from .export_utils import IMAGENET_SAMPLE


@pytest.fixture(scope="module")
def real_images():
    """The 1,000 ImageNet-sample images (one per class) at 32x32, eval preprocessing (labels unused)."""
    from calib import data as D
    from timm.data import create_transform
    tf = create_transform(input_size=(3, 32, 32), is_training=False, interpolation="bicubic", crop_pct=0.875)
    x, _ = D.load_subset(D.scan(str(IMAGENET_SAMPLE)), tf, None)
    assert x.shape[0] == 1000
    return x
