"""Augmentation of calibration batches during optimisation (``quant.run --augment``).

The teacher runs on the fly, so an augmented batch is distilled like any other: augmentation widens the input
distribution the student is fitted on, which matters most for a small or synthetic (data-free) calibration set.
Each step's batch ``x [B, 3, H, W]`` (normalised model inputs) is transformed with a generator seeded by the run's
seed and the step, so a resumed run draws the same transforms. Operations, applied in this order:

- ``shift``: each image translated by ``(dy, dx)``, each uniform in ``[-H/8, H/8]`` / ``[-W/8, W/8]``, edges
  reflected (the pad-and-crop of CIFAR training, 4 pixels at 32);
- ``flip``: each image mirrored left-right with probability 1/2;
- ``mix``: mixup of half the images, picked at random: ``x_i <- lam_i x_i + (1 - lam_i) x_j``, ``j`` a random
  other image of the batch, ``lam_i ~ U[0, 1]``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

AUGMENTS = ("shift", "flip", "mix")


def parse_augment(spec: str) -> Tuple[str, ...]:
    """``"none"`` or a comma list of :data:`AUGMENTS` -> the operations in application order."""
    if spec is None or spec.strip() in ("", "none"):
        return ()
    ops = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in ops if s not in AUGMENTS]
    if bad:
        raise ValueError(f"unknown augmentation {bad[0]!r}; use 'none' or a comma list of {', '.join(AUGMENTS)}")
    return tuple(a for a in AUGMENTS if a in ops)


def augment_batch(x: Tensor, ops: Sequence[str], seed: int) -> Tensor:
    """``x [B, 3, H, W]`` with ``ops`` applied (module docstring); ``x`` itself is not modified."""
    if not ops:
        return x
    gen = torch.Generator().manual_seed(int(seed))
    b, _, h, w = x.shape
    if "shift" in ops:
        ph, pw = max(1, h // 8), max(1, w // 8)
        xp = F.pad(x, (pw, pw, ph, ph), mode="reflect")
        di = torch.randint(0, 2 * ph + 1, (b,), generator=gen).tolist()
        dj = torch.randint(0, 2 * pw + 1, (b,), generator=gen).tolist()
        x = torch.stack([xp[n, :, di[n]: di[n] + h, dj[n]: dj[n] + w] for n in range(b)])
    if "flip" in ops:
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    if "mix" in ops and b > 1:
        pick = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        other = (torch.arange(b) + torch.randint(1, b, (b,), generator=gen)) % b
        lam = torch.rand(b, generator=gen).to(x.device, x.dtype)
        lam = torch.where(pick, lam, torch.ones_like(lam)).view(b, 1, 1, 1)
        x = lam * x + (1 - lam) * x[other.to(x.device)]
    return x
