"""Small random-init timm configs and helpers shared by the PTQ tests."""
import pytest
import timm
import torch

CONFIGS = {
    "vit": ("vit_tiny_patch16_224",
            dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)),
    "deit": ("deit_tiny_distilled_patch16_224",
             dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=24,
                                                  depths=(2, 2), num_heads=(2, 4), num_classes=10)),
}

def make_model(kind: str, seed: int = 0, **over) -> torch.nn.Module:
    name, kw = CONFIGS[kind]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **{**kw, **over}).eval()


def images(n: int, seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run far faster on one intra-op thread (and do not fight parallel test runs for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
