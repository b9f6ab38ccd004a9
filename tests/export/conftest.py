"""Fixtures shared by the export tests."""
import pytest


@pytest.fixture(scope="module")
def folder_images(imagenet_folder):
    """The 1,000 images of the generated ImageNet-shaped folder (one per class, varied sizes, some grayscale) at
    32x32, eval preprocessing (labels unused)."""
    from timm.data import create_transform

    from calib import data as D
    tf = create_transform(input_size=(3, 32, 32), is_training=False, interpolation="bicubic", crop_pct=0.875)
    x, _ = D.load_subset(D.scan(str(imagenet_folder)), tf, None)
    assert x.shape[0] == 1000
    return x
