"""The kernel shapes of the seven literature models (ViT-S/B, DeiT-T/S/B, Swin-T/S/B at 224 px) and of the demo:
every quantized linear's ``(K, N)``, token counts per image, attention ``(L, head dim)``, LayerNorm widths.
Used to build the GEMM table (:mod:`kernels.gemm_table`) and the compile checks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple


@dataclass(frozen=True)
class ModelShapes:
    name: str
    linears: Tuple[Tuple[int, int], ...]  # (K, N)
    tokens: Tuple[int, ...]  # rows per image of the linears' inputs
    attention: Tuple[Tuple[int, int], ...]  # (L, head dim)
    norms: Tuple[int, ...]  # LayerNorm widths
    mlp: Tuple[Tuple[int, int], ...] = ()  # (K, N) of the MLPs' fc1 (GELU, output requantized for fc2)


def _vit(name: str, dim: int, heads: int, mlp: int, patch_k: int = 768, classes: int = 1000, tokens: int = 197):
    return ModelShapes(name, ((patch_k, dim), (dim, 3 * dim), (dim, dim), (dim, mlp), (mlp, dim), (dim, classes)),
                       (1, tokens - 1, tokens), ((tokens, dim // heads),), (dim,), ((dim, mlp),))


def _swin(name: str, dim: int, heads: Tuple[int, ...], classes: int = 1000):
    linears, tokens, norms, attn = [(48, dim)], [1], [dim], set()
    for i, h in enumerate(heads):
        c = dim * 2 ** i
        linears += [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)]
        tokens.append((56 // 2 ** i) ** 2)
        norms.append(c)
        attn.add((49, c // h))
        if i + 1 < len(heads):
            linears.append((4 * c, 2 * c))
            norms.append(4 * c)
    linears.append((dim * 2 ** (len(heads) - 1), classes))
    mlp = tuple((dim * 2 ** i, 4 * dim * 2 ** i) for i in range(len(heads)))
    return ModelShapes(name, tuple(dict.fromkeys(linears)), tuple(tokens), tuple(sorted(attn)), tuple(norms), mlp)


MODELS: Dict[str, ModelShapes] = {m.name: m for m in (
    _vit("vit_s", 384, 6, 1536), _vit("vit_b", 768, 12, 3072), _vit("deit_t", 192, 3, 768),
    _vit("deit_s", 384, 6, 1536), _vit("deit_b", 768, 12, 3072),
    _swin("swin_t", 96, (3, 6, 12, 24)), _swin("swin_s", 96, (3, 6, 12, 24)), _swin("swin_b", 128, (4, 8, 16, 32)),
    _vit("demo", 128, 4, 256, patch_k=48, classes=10, tokens=65),
)}

#: batch sizes the tables and checks cover
BATCHES = (1, 8, 64)
#: extra attention shapes: ViT at 112 px (50 tokens) and 384 px (577 tokens); head dim 128 (accepted by kernels.ops)
EXTRA_ATTENTION = ((50, 64), (577, 64), (50, 32), (577, 32), (197, 128), (49, 128))


def linear_shapes() -> List[Tuple[int, int]]:
    """Every distinct ``(K, N)`` of the models."""
    return sorted({kn for m in MODELS.values() for kn in m.linears})


def gemm_problems() -> List[Tuple[int, int, int]]:
    """Every ``(M, N, K)`` the models run at the covered batches (each linear at each token count of its model)."""
    out = set()
    for m in MODELS.values():
        for k, n in m.linears:
            for t in m.tokens:
                for b in BATCHES:
                    out.add((t * b, n, k))
    return sorted(out)


def mlp_shapes() -> set:
    """``(K, N)`` of every fc1 (the only linears whose GELU output the runtime requantizes in the GEMM)."""
    return {s for m in MODELS.values() for s in m.mlp}


def qkv_shapes() -> set:
    """``(K, N = 3K)`` of every qkv projection (the linears whose output the runtime requantizes per column into the
    Q, K and V codes)."""
    return {(k, n) for m in MODELS.values() for k, n in m.linears if n == 3 * k}


def attention_shapes() -> List[Tuple[int, int]]:
    return sorted({a for m in MODELS.values() for a in m.attention} | set(EXTRA_ATTENTION))


def norm_widths() -> List[int]:
    return sorted({c for m in MODELS.values() for c in m.norms})
