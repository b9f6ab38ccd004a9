"""The CPU backend of :mod:`kernels.ops`: the integer arithmetic of :mod:`lowbit.primitives`, bit for bit, in few ops.

Everything that depends only on the weights and the quantizers (unpacked weight codes, scales, column terms, clamp
bounds, SULQ tables) is computed once per layer and cached on it, keyed on the identity and version of its tensors
(:func:`linear_plan`, :func:`attention_plan`): an in-place change of a weight or a quantizer rebuilds it. Per call
only the activation work remains. The functions are plain torch (they also run on CUDA tensors when
:func:`kernels.ops.set_backend` forces this backend there, with the float GEMM).

Linear ``[N, K]``, unsigned activation codes ``a`` (zero point ``za``, step ``sa``), weight codes ``w`` (``zw[n]``,
``sw[n]``)::

    acc[m, n] = sum_k (a[m,k] - za)(w[n,k] - zw[n])          lowbit.primitives.int_gemm, exactly
    y         = acc * (sa * sw[n]) + bias[n]                 lowbit.primitives.int_linear's epilogue, same op order

GEMMs (:func:`gemm`, chosen per machine, :func:`set_gemm` overrides):

* ``"int8"`` (where the CPU has an int8 dot product, VNNI or AMX, and ``torch._int_mm`` is exact, probed once):
  int8 codes ``a_t = a - c`` (``c = za`` when ``qmax(a) <= 127``, else the storage offset 128) and weights
  ``w_t = w - zw[n]`` (``<= 7`` bits; 8-bit: the signed storage ``w - 128``, ``cw[n] = 128 - zw[n]``), so
  ``acc = _int_mm(a_t, w_t^T) + cw[n] * rowsum(a_t)[m] + col[n]`` with ``col[n] = ca * colsum(w_t)[n] + K * ca *
  cw[n]``, ``ca = c - za`` (terms that are 0 are skipped).
* ``"float"`` (elsewhere: without VNNI, int8 GEMMs are several times slower than float ones): centred codes
  ``a - za`` and ``w - zw[n]`` in a float GEMM that is exact (``lowbit.primitives.exact_dtype``: float32 where
  ``K * max|a - za| * max|w - zw|`` < 2^24, else float64).

Attention: Q, K, V centred codes ``clamp(round(x / s), -z, qmax - z)`` from one pass over the qkv output, written
head-major; ``S = (Qc Kc^T) * (scale sq sk)`` and ``O = (Pc Vc) * (sp sv)`` with exact float GEMMs; SULQ
probabilities dequantized through the precomputed ``lowbit.primitives.sulq_table``. Swin's relative position bias
is gathered once. The float GEMMs assume IEEE float32 matmul (PyTorch's default
``float32_matmul_precision("highest")``).

:func:`vit_block` runs a whole timm ViT block (fused LayerNorms) as one function: at batch 1 the activations are
small and the per-op and per-module Python cost is most of the time, so constants are 0-d tensors and plans
(NamedTuples holding their tensors) replace module attribute reads.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import operator
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from lowbit import packing
from lowbit import primitives as P

from .keep import kept

GEMMS = ("int8", "float")


class Codes(NamedTuple):
    """How one activation quantizer emits codes here: ``clamp(round(x / s) + add, lo, hi)``, cast to
    int8 when ``int8`` (``lo = -c``, ``hi = qmax - c``, ``add = round(z) - c``); ``span = max|code - (z - c)|``;
    ``add_t``: ``add`` as a 0-d float32 tensor, None when 0 (a tensor operand costs less per call than a float)."""

    add: float
    lo: float
    hi: float
    int8: bool
    span: int
    add_t: Optional[Tensor] = None


def scalar(v: float) -> Tensor:
    """0-d float32 tensor of ``v``: the value a Python float operand of a float32 op is rounded to."""
    return torch.tensor(float(v), dtype=torch.float32)


def make_codes(add: float, lo: float, hi: float, int8: bool, span: int) -> Codes:
    return Codes(float(add), float(lo), float(hi), int8, span, scalar(add) if add else None)


@functools.lru_cache(maxsize=None)
def int_mm_exact() -> bool:
    """Whether ``torch._int_mm`` on this CPU returns the exact int32 product of full-range int8 matrices (some
    int8 GEMMs saturate 16-bit partial sums without VNNI). Probed once per process."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (32, 256), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (48, 256), dtype=torch.int8, generator=g)
    a[0], w[0], a[1], w[1] = -128, -128, 127, 127  # the extremes: 2 * 128 * 128 overflows int16
    try:
        got = torch._int_mm(a, w.t())
    except (RuntimeError, AttributeError):
        return False
    return torch.equal(got.long(), a.long() @ w.long().t())


@functools.lru_cache(maxsize=None)
def int8_dot() -> bool:
    """Whether this CPU has an int8 dot-product instruction for ``torch._int_mm`` (x86 VNNI or AMX; Arm's
    dot-product extension): without one, int8 GEMMs run several times slower than float GEMMs."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(" ".join(ln.split(":", 1)[1] for ln in f if ln.startswith(("flags", "Features"))).split())
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})


_GEMM: list = [None]


def set_gemm(name: Optional[str]) -> None:
    """Force the linear GEMM (``"int8"`` or ``"float"``; both exact, same outputs) or, with None, let
    :func:`gemm` choose. The cached plans are rebuilt for the new choice on their next call."""
    if name is not None and name not in GEMMS:
        raise ValueError(f"the CPU GEMM must be one of {GEMMS} (or None: automatic), got {name!r}")
    if name == "int8" and not int_mm_exact():
        raise ValueError("GEMM 'int8': torch._int_mm is not exact on this CPU; use 'float'")
    _GEMM[0] = name


def gemm() -> str:
    """The linear GEMM in use: :func:`set_gemm`'s choice, else ``"int8"`` where the CPU has an int8 dot product
    (:func:`int8_dot`) and ``torch._int_mm`` is exact (:func:`int_mm_exact`), else ``"float"``."""
    if _GEMM[0] is not None:
        return _GEMM[0]
    return "int8" if int8_dot() and int_mm_exact() else "float"


def check_qparams(name: str, s: Tensor, z: Tensor) -> None:
    """The per-call checks of :func:`lowbit.primitives.quantize` on the quantizer, done once (ValueError naming it)."""
    try:
        P.check_step(torch.as_tensor(s, dtype=torch.float32))
        P._check_finite("zero point z", torch.as_tensor(z, dtype=torch.float32))
    except ValueError as e:
        raise ValueError(f"{name} input quantizer: {str(e).split(';')[0]}") from None


def act_codes(s: Tensor, z: Tensor, bits, int8: bool, name: str) -> Codes:
    """:class:`Codes` of a per-tensor quantizer: int8 codes ``a - c`` (``int8``), else float centred ``a - z``."""
    check_qparams(name, s, z)
    zr, qmax = int(P.round_zero_point(torch.as_tensor(z, dtype=torch.float32), bits)), P.qmax(bits)
    c = (zr if qmax <= 127 else P.code_offset(bits)) if int8 else zr
    return make_codes(zr - c, -c, qmax - c, int8, max(zr, qmax - zr))


def codes_(t: Tensor, s: Tensor, c: Codes, inplace: bool = True, clamp: bool = True) -> Tensor:
    """Codes of float32 ``t`` (overwritten when ``inplace``): ``clamp(round(t / s) + add, lo, hi)`` as in
    ``primitives.quantize`` (the integer sum is exact below 2^24 and saturates the same way above); ``clamp=False``
    where the caller knows the codes are in bounds."""
    t = (t.div_(s) if inplace else t / s).round_()
    if c.add_t is not None:
        t.add_(c.add_t)
    if clamp:
        t.clamp_(c.lo, c.hi)
    return t.to(torch.int8) if c.int8 else t


def f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


class LayerNormPlan(NamedTuple):
    """A fused LayerNorm: ``k`` (its width) and ``eps`` as 0-d float32 tensors, the affine ``weight``, ``bias``."""

    k: Tensor
    eps: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]


def layernorm_plan(k: int, eps: float, weight: Optional[Tensor], bias: Optional[Tensor]) -> LayerNormPlan:
    return LayerNormPlan(scalar(k), scalar(eps), weight, bias)


def layernorm(x: Tensor, ln: LayerNormPlan) -> Tensor:
    """:func:`kernels.reference.layernorm` with the same float ops, in place on its own temporaries (``x.mean(-1)``
    is ATen's CPU mean: the sum divided by the width)."""
    x = f32(x)
    xc = x - x.sum(dim=-1, keepdim=True).div_(ln.k)
    y = xc.div_((xc * xc).sum(dim=-1, keepdim=True).div_(ln.k).add_(ln.eps).sqrt_())
    if ln.weight is not None:
        y.mul_(ln.weight)
    if ln.bias is not None:
        y.add_(ln.bias)
    return y


def gemm_dtype(k: int, span_a: int, span_b: int) -> torch.dtype:
    """float32 when every partial sum of ``k`` products of integers of magnitude ``<= span_a``, ``<= span_b`` is
    exact in it, else float64 (:func:`lowbit.primitives.exact_dtype` on the centred codes)."""
    return P.exact_dtype(k, span_a * span_b)


def exact_matmul(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 ``a @ b`` of integer-valued float32 tensors, computed in ``dtype`` (exact by :func:`gemm_dtype`)."""
    mm = torch.bmm if a.dim() == 3 else torch.matmul
    if dtype == torch.float32:
        return mm(a, b)
    return mm(a.to(dtype), b.to(dtype)).float()


class LinearPlan(NamedTuple):
    """One linear's cached constants: ``gemm`` (``"int8"`` / ``"float"``), the input's :class:`Codes`, the float
    GEMM's ``dtype``, whether the int8 GEMM adds ``cw[n] * rowsum(a_t)`` (``rowsum``, 8-bit weights) and ``col[n]``
    (``col``); the tensors ``w [K, N]`` (int8, the transposed view of a contiguous ``[N, K]``, or float),
    ``scale [1, N] = float(sa) * sw``, ``cw``, ``col_t`` (int32 ``[1, N]``), and the layer's own ``bias``, input step
    ``in_s``, fused LayerNorm ``ln`` or rescale ``r`` / ``shift``."""

    gemm: str
    codes: Codes
    dtype: torch.dtype
    rowsum: bool
    col: bool
    w: Tensor
    scale: Tensor
    cw: Optional[Tensor]
    col_t: Optional[Tensor]
    bias: Optional[Tensor]
    in_s: Tensor
    ln: Optional[LayerNormPlan]
    r: Optional[Tensor]
    shift: Optional[Tensor]


_VERSION = operator.attrgetter("_version")


def _dicts(*modules) -> tuple:
    return tuple(d for m in modules for d in (m._parameters, m._buffers))


def _slots(dicts):
    return itertools.chain.from_iterable(map(dict.values, dicts))


def _fresh(hit, dicts) -> bool:
    """Whether a cache entry ``hit = (key, dicts, slots, tensors, version sum, value)`` still describes ``dicts``:
    the same slots hold the same tensors (kept alive by the entry) and no version counter moved (counters only
    grow, so their sum is exact once the tensors are the same). C-level loops: at batch 1 this runs per block."""
    if hit[1] != dicts or not all(map(operator.is_, _slots(dicts), hit[2])) or len(hit[2]) != sum(map(len, dicts)):
        return False
    try:
        return hit[4] == sum(map(_VERSION, hit[3]))
    except RuntimeError:  # an inference tensor has no version counter: identity only
        return hit[4] is None


def _entry(key, dicts, value) -> tuple:
    slots = tuple(_slots(dicts))
    tensors = [t for t in slots if t is not None]
    try:
        versions = sum(map(_VERSION, tensors))
    except RuntimeError:
        versions = None
    return (key, dicts, slots, tensors, versions, value)


_TRUSTED: list = [frozenset()]  # ids of the modules checked at the start of the running model forward


@contextlib.contextmanager
def checked_once(owner, layers, blocks=()) -> Iterator[None]:
    """One forward of ``owner`` (e.g. a whole model) whose packed layers are ``layers`` and ViT blocks ``blocks``
    (``(attn, mlp)`` pairs): one pass over all their tensors stands for the per-layer and per-block checks of
    :func:`cached` and :func:`block_plan` inside the block (at batch 1 those cost several percent of the time). When
    something changed since the last such pass, every layer's and block's constants are checked (and rebuilt where
    stale) first, then the new state is kept."""
    hit = owner.__dict__.get("_lowbit_check")
    if hit is None or hit[0] != gemm() or not _fresh(hit, hit[1]):
        for m in layers:
            plan_of(m)
        for attn, mlp in blocks:
            block_plan(attn, mlp)
        hit = owner.__dict__["_lowbit_check"] = _entry(gemm(), _dicts(*layers), frozenset(map(id, layers)))
    before = _TRUSTED[0]
    _TRUSTED[0] = hit[5]
    try:
        yield
    finally:
        _TRUSTED[0] = before


def cached(module, build: Callable, key=()):
    """``build()``, kept on ``module`` while its own tensors (parameters and buffers) are the same objects at the
    same versions and ``key`` is equal: a layer's constants are computed once, and again after any change."""
    hit = module.__dict__.get("_lowbit_cpu")
    if hit is not None:
        if torch.compiler.is_compiling():
            return hit[5]  # (traced code takes the constants built before; guards watch the module)
        if hit[0] == key and (id(module) in _TRUSTED[0] or _fresh(hit, _dicts(module))):
            return hit[5]
    with torch.no_grad():
        out = build()
    module.__dict__["_lowbit_cpu"] = _entry(key, _dicts(module), out)
    return out


def cached_tensors(module) -> list:
    """The tensors of ``module``'s cached constants (for memory accounting; its own tensors among them)."""
    hit = module.__dict__.get("_lowbit_cpu")
    out, todo = [], [hit[5]] if hit is not None else []
    while todo:
        v = todo.pop()
        if torch.is_tensor(v):
            out.append(v)
        elif isinstance(v, tuple):
            todo.extend(v)
    return out


def linear_plan(layer) -> LinearPlan:
    """The :class:`LinearPlan` of a packed linear ``layer`` (:class:`export.runtime.PackedLinear`: ``packed()``,
    ``w_scale``, ``w_zero``, ``bias``, ``in_s``, ``in_z``, ``a_bits``, ``ln_eps`` / ``ln_weight`` / ``ln_bias``,
    ``r``, ``shift``), cached on it (:func:`cached`). Quantizers no model can use raise ValueError naming them."""
    hit = layer.__dict__.get("_lowbit_cpu")
    if hit is not None and torch.compiler.is_compiling():
        return hit[5]  # (traced code takes the constants built before; guards watch the module)
    choice = gemm()
    return cached(layer, lambda: _linear_plan(layer, choice if layer.w_scale.device.type == "cpu" else "float"),
                  choice)


def _linear_plan(layer, choice: str) -> LinearPlan:
    name = type(layer).__name__
    pw, w_scale, in_s, in_z, a_bits = layer.packed(), layer.w_scale, layer.in_s, layer.in_z, layer.a_bits
    dev = w_scale.device
    P._check_finite(f"{name} weight scale", w_scale.float())
    codes = act_codes(in_s, in_z, a_bits, choice == "int8", name)
    n, k = pw.n, pw.k
    qw = packing.unpack(pw).to(torch.int32)
    zw = P.round_zero_point(torch.as_tensor(layer.w_zero, dtype=torch.float32), pw.bits).reshape(-1).to(torch.int32)
    centred = qw - zw[:, None]
    # the reference's epilogue constant: acc.float() * (float(sa) * sw.reshape(1, -1))
    scale = float(in_s) * torch.as_tensor(w_scale, dtype=torch.float32).reshape(1, -1)
    ln = None if layer.ln_eps is None else layernorm_plan(k, layer.ln_eps, layer.ln_weight, layer.ln_bias)
    own = dict(bias=layer.bias, in_s=in_s, ln=ln, r=layer.r, shift=layer.shift)
    if choice == "float":
        span_w = int(centred.abs().max()) if centred.numel() else 0
        dtype = gemm_dtype(k, codes.span, span_w)
        return LinearPlan(choice, codes, dtype, False, False, centred.t().to(dtype).contiguous().to(dev),
                          scale.to(dev), None, None, **own)
    if P.qmax(pw.bits) <= 127:
        w_t, cw = centred, torch.zeros(n, dtype=torch.int32)
    else:
        off = P.code_offset(pw.bits)
        w_t, cw = qw - off, off - zw
    ca = int(-codes.lo) - int(P.round_zero_point(torch.as_tensor(in_z, dtype=torch.float32), a_bits))  # c - za
    col = ca * w_t.sum(dim=1, dtype=torch.int32) + k * ca * cw
    rowsum, has_col = bool(cw.any()), bool(col.any())
    return LinearPlan(choice, codes, torch.int32, rowsum, has_col, w_t.to(torch.int8).contiguous().t(), scale,
                      cw.reshape(1, -1).contiguous() if rowsum else None,
                      col.to(torch.int32).reshape(1, -1).contiguous() if has_col else None, **own)


def input_codes(x: Tensor, p: LinearPlan, fresh: bool = False) -> Tensor:
    """Codes ``[M, K]`` of ``LN'(x)``, ``(x - shift) / r`` or ``x`` (``x [M, K]``; overwritten when ``fresh``)."""
    if p.ln is not None:
        return codes_(layernorm(x, p.ln), p.in_s, p.codes)
    if p.r is None and p.shift is None:
        return codes_(f32(x), p.in_s, p.codes, inplace=fresh and x.dtype == torch.float32)
    return codes_(P.apply_rescale(f32(x), p.r, p.shift), p.in_s, p.codes)


def linear(a: Tensor, p: LinearPlan, gelu: bool = False) -> Tensor:
    """float32 ``y [M, N]`` of codes ``a [M, K]`` (int8 or float as ``p`` says); exact-erf GELU when ``gelu``."""
    if p.gemm == "int8":
        acc = torch._int_mm(a, p.w)
        if p.rowsum:
            acc.add_(a.sum(dim=-1, keepdim=True, dtype=torch.int32) * p.cw)
        if p.col:
            acc.add_(p.col_t)
        y = torch.mul(acc, p.scale, out=acc.view(torch.float32))  # acc.float() * scale, in place: one pass
    else:
        y = exact_matmul(a, p.w, p.dtype).mul_(p.scale)
    if p.bias is not None:
        y.add_(p.bias)
    return torch._C._nn.gelu_(y) if gelu else y  # F.gelu (exact erf) in place on the fresh y


class AttentionPlan(NamedTuple):
    """One attention's cached constants: ``qk = scale * sq * sk`` and ``pv = sp * sv`` (the reference's Python-float
    products; ``qk_t``, ``pv_t`` as 0-d tensors), ``spans`` of q, k, v, p codes, ``p_codes``, ``sulq``,
    ``bounds``: the Q, K, V clamp bounds when they are one pair, ``p_clamp``: whether the probability codes need
    their clamp (not when every ``P`` in ``[0, 1]`` already rounds into the bounds), then the tensors
    (:func:`attention_plan`): ``s3``, ``lo3``, ``hi3 [3, 1, 1, 1, 1]``, the layer's own ``p_s``, ``p_eta``,
    ``p_x0``, ``p_table``, ``rel_bias``."""

    qk: float
    pv: float
    spans: tuple
    p_codes: Optional[Codes]
    sulq: bool
    bounds: Optional[tuple] = None
    p_clamp: bool = True
    qk_t: Optional[Tensor] = None
    pv_t: Optional[Tensor] = None
    s3: Optional[Tensor] = None
    lo3: Optional[Tensor] = None
    hi3: Optional[Tensor] = None
    p_s: Optional[Tensor] = None
    p_eta: Optional[Tensor] = None
    p_x0: Optional[Tensor] = None
    p_table: Optional[Tensor] = None
    rel_bias: Optional[Tensor] = None


def attention(qkv: Tensor, b: int, n: int, heads: int, plan: AttentionPlan, mask: Optional[Tensor] = None) -> Tensor:
    """float32 ``[b, n, C]`` attention output from the float qkv output ``[b * n, 3C]`` (overwritten).

    Same float ops as :func:`kernels.reference.quant_attention` on the codes of ``ops.quantize`` of Q, K, V."""
    d = qkv.shape[-1] // (3 * heads)
    bh = b * heads
    # one pass reads the [b, n, 3, H, D] layout and writes head-major [3, b, H, n, D] codes (contiguous GEMM operands)
    t = qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    if torch.compiler.is_compiling():  # (out= into a permuted layout trips the compiler's reshape; it fuses anyway)
        t = (t / plan.s3).contiguous()
    else:
        t = torch.div(t, plan.s3, out=qkv.new_empty(3, b, heads, n, d))
    t.round_()
    if plan.bounds is not None:
        t.clamp_(*plan.bounds)
    else:  # clamp_min_/clamp_max_: clamp_ with tensor bounds is several times slower on the CPU (same values)
        t.clamp_min_(plan.lo3).clamp_max_(plan.hi3)
    q, k, v = t.view(3, bh, n, d).unbind(0)
    sq, sk, sv, sp = plan.spans
    s = exact_matmul(q, k.transpose(1, 2), gemm_dtype(d, sq, sk)).mul_(plan.qk_t)
    if plan.rel_bias is not None:
        s.view(b, heads, n, n).add_(plan.rel_bias)
    if mask is not None:
        nw = mask.shape[0]
        s.view(b // nw, nw, heads, n, n).add_(mask.float()[None, :, None])
    p = torch.softmax(s, dim=-1)
    if plan.sulq:
        u = codes_(p.add_(plan.p_eta).log2_().neg_().sub_(plan.p_x0), plan.p_s, plan.p_codes).long()
        o = torch.matmul(plan.p_table[u], v)
    else:
        o = exact_matmul(codes_(p, plan.p_s, plan.p_codes, clamp=plan.p_clamp), v, gemm_dtype(n, sp, sv))
    return attention_output(o.view(b, heads, n, d), plan.pv_t)


def attention_output(o: Tensor, pv: Tensor) -> Tensor:
    """``(o * pv)`` of ``o [b, H, n, D]`` written token-major ``[b, n, H * D]`` in the same pass."""
    b, h, n, d = o.shape
    if torch.compiler.is_compiling():
        return (o * pv).transpose(1, 2).reshape(b, n, h * d)
    return torch.mul(o.transpose(1, 2), pv, out=o.new_empty(b, n, h, d)).view(b, n, h * d)


def probabilities_in_bounds(s: Tensor, c: Codes) -> bool:
    """Whether ``round(p / s) + add`` lies in ``[lo, hi]`` for every float32 ``p`` in ``[0, 1 + 2^-20]`` (softmax
    outputs, with a margin for its rounding), so the clamp of the probability codes changes nothing."""
    top = torch.tensor(1.0 + 2.0 ** -20, dtype=torch.float32) / torch.as_tensor(s, dtype=torch.float32)
    return c.lo <= c.add and float(top.round()) + c.add <= c.hi


def attention_plan(attn) -> AttentionPlan:
    """The :class:`AttentionPlan` of a packed attention ``attn`` (:class:`export.runtime.PackedViTAttention` /
    ``PackedWindowAttention``: ``qp(name)`` for ``q, k, v, p``, ``scale``, ``p_s``, optional ``p_eta`` / ``p_x0``
    and ``rel_pos_bias()``), cached on it (:func:`cached`)."""
    return cached(attn, lambda: _attention_plan(attn))


def _attention_plan(attn) -> AttentionPlan:
    name = type(attn).__name__
    qps = {n: attn.qp(n) for n in "qkvp"}
    dev = attn.p_s.device
    codes = {k: act_codes(qps[k].s, qps[k].z, qps[k].bits, False, f"{name} {k}") for k in "qkv"}
    s3 = torch.stack([torch.as_tensor(qps[k].s, dtype=torch.float32).reshape(()) for k in "qkv"])
    lo3, hi3 = (torch.tensor([getattr(codes[k], f) for k in "qkv"]) for f in ("lo", "hi"))
    p = qps["p"]
    sulq = isinstance(p, P.SULQParams)
    table = None
    if sulq:
        eta = torch.as_tensor(p.eta, dtype=torch.float32)
        if eta.numel() != 1 or not float(eta) > 0:
            raise ValueError(f"{name}: SULQ shift eta must be one value > 0, got {eta.tolist()}")
        check_qparams(f"{name} p", p.s, p.z)
        zr = float(P.round_zero_point(torch.as_tensor(p.z, dtype=torch.float32), p.bits))
        p_codes = make_codes(zr, 0, P.qmax(p.bits), False, P.qmax(p.bits))  # unsigned codes, table index
        table = P.sulq_table(p.eta, p.s, p.z, p.bits, p.x0, bool(p.pow2)).to(dev)
    else:
        p_codes = act_codes(p.s, p.z, p.bits, False, f"{name} p")
    qk = float(attn.scale) * float(qps["q"].s) * float(qps["k"].s)
    pv = float(p.s) * float(qps["v"].s) if not sulq else float(qps["v"].s)
    pairs = {(codes[k].lo, codes[k].hi) for k in "qkv"}
    rel_bias = attn.rel_pos_bias().detach() if hasattr(attn, "rel_pos_bias") else None
    return AttentionPlan(qk, pv, (codes["q"].span, codes["k"].span, codes["v"].span, p_codes.span), p_codes, sulq,
                         pairs.pop() if len(pairs) == 1 else None, sulq or not probabilities_in_bounds(p.s, p_codes),
                         scalar(qk).to(dev), scalar(pv).to(dev), *(t.reshape(3, 1, 1, 1, 1).to(dev)
                                                                   for t in (s3, lo3, hi3)),
                         attn.p_s, getattr(attn, "p_eta", None), getattr(attn, "p_x0", None), table, rel_bias)


class BlockPlan(NamedTuple):
    """A timm ViT ``Block`` whose LayerNorms are fused into ``qkv`` and ``fc1`` and whose other parts are identities."""

    qkv: LinearPlan
    attn: AttentionPlan
    heads: int
    proj: LinearPlan
    fc1: LinearPlan
    fc2: LinearPlan


def vit_block(x: Tensor, p: BlockPlan) -> Tensor:
    """``x + attn(x)``, then ``+ mlp(.)``, for ``x [b, n, C]``: the block's module calls flattened into one function
    (the same ops as :func:`attention_layer` and :func:`mlp_layer`; the residual sums are added in place, ``a + b == b + a``)."""
    b, n, c = x.shape
    x = f32(x).reshape(-1, c)
    o = attention(linear(input_codes(x, p.qkv), p.qkv), b, n, p.heads, p.attn)
    x = linear(input_codes(o.view(b * n, -1), p.proj, fresh=True), p.proj).add_(x)
    h = linear(input_codes(x, p.fc1), p.fc1, gelu=True)
    return linear(codes_(h, p.fc2.in_s, p.fc2.codes), p.fc2).add_(x).view(b, n, -1)


def plan_of(layer):
    """:func:`linear_plan` or :func:`attention_plan` of a packed layer."""
    return linear_plan(layer) if hasattr(layer, "w_scale") else attention_plan(layer)


def block_plan(attn, mlp) -> BlockPlan:
    """The :class:`BlockPlan` of a ViT block's packed ``attn`` and ``mlp`` (each layer's plan cached on it), kept on
    ``attn`` and checked in one pass over the five modules' tensors (at batch 1 the per-layer checks cost more)."""
    hit = attn.__dict__.get("_lowbit_block")
    mods = (attn._modules["qkv"], attn, attn._modules["proj"], mlp._modules["fc1"], mlp._modules["fc2"])
    if torch.compiler.is_compiling():  # (traced code takes the constants built before)
        return hit[5] if hit is not None else BlockPlan(linear_plan(mods[0]), attention_plan(attn), attn.num_heads,
                                                        linear_plan(mods[2]), linear_plan(mods[3]),
                                                        linear_plan(mods[4]))
    if hit is not None and hit[6] == mods and hit[0] == gemm() and (
            _TRUSTED[0].issuperset(map(id, mods)) or _fresh(hit, _dicts(*mods))):
        return hit[5]
    plan = BlockPlan(linear_plan(mods[0]), attention_plan(attn), attn.num_heads, linear_plan(mods[2]),
                     linear_plan(mods[3]), linear_plan(mods[4]))
    attn.__dict__["_lowbit_block"] = _entry(gemm(), _dicts(*mods), plan) + (mods,)
    return plan


# ---------------------------------------------------------------------------------------------- layers


def linear_layer(x: Tensor, layer, gelu: bool = False) -> Tensor:
    """float32 ``y [..., N]`` of a packed linear ``layer`` on float ``x [..., K]`` (see :func:`linear_plan`)."""
    p = linear_plan(layer)
    return linear(input_codes(x.reshape(-1, x.shape[-1]), p), p, gelu).view(*x.shape[:-1], -1)


def mlp_layer(x: Tensor, fc1, fc2) -> Tensor:
    """``fc2(GELU(fc1(x)))`` of packed linears; fc1's output goes to fc2's codes in place."""
    p1, p2 = linear_plan(fc1), linear_plan(fc2)
    h = linear(input_codes(x.reshape(-1, x.shape[-1]), p1), p1, gelu=True)
    return linear(codes_(h, p2.in_s, p2.codes), p2).view(*x.shape[:-1], -1)


def attention_layer(x: Tensor, attn, mask: Optional[Tensor] = None) -> Tensor:
    """``proj(attention(qkv(x)))`` of a packed attention for ``x [B, L, C]`` (``mask [nW, L, L]``: Swin's)."""
    b, n, c = x.shape
    p, pp = linear_plan(attn.qkv), linear_plan(attn.proj)
    o = attention(linear(input_codes(x.reshape(-1, c), p), p), b, n, attn.num_heads, attention_plan(attn), mask)
    return linear(input_codes(o.view(b * n, -1), pp, fresh=True), pp).view(b, n, -1)


# ---------------------------------------------------------------------------------------------- single ops


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.float()


def quantize(x: Tensor, qp: P.QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """int8 codes of ``(x - shift) / r``: :func:`lowbit.primitives.quantize` (signed storage)."""
    return P.quantize(P.apply_rescale(x.float(), _f32(r), _f32(shift)), qp.s, qp.z, qp.bits, signed=True)


def layernorm_quantize(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float,
                       qp: P.QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """int8 codes of ``(LayerNorm(x) - shift) / r`` (:func:`lowbit.primitives.layernorm`, then :func:`quantize`)."""
    return quantize(P.layernorm(x, ln_weight, ln_bias, eps), qp, r, shift)


def add_layernorm_quantize(x: Tensor, delta: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                           eps: float, qp: P.QParams, r: Optional[Tensor] = None,
                           shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(x_new, codes)``: ``x_new = (x + delta).to(x.dtype)``, then :func:`layernorm_quantize` of it."""
    x_new = x + delta
    x_new = x_new if x_new.dtype == x.dtype else x_new.to(x.dtype)
    return x_new, layernorm_quantize(x_new, ln_weight, ln_bias, eps, qp, r, shift)


def fake_quantize(x: Tensor, qp: P.QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """Differentiable float32 ``fake_quantize((x - shift) / r)`` (autograd through the primitives)."""
    return P.fake_quantize(P.apply_rescale(x.float(), r, shift), qp.s, qp.z, qp.bits)


def linear_codes(a: Tensor, a_qp: P.QParams, qw: Tensor, w_bits, w_scale: Tensor, w_zero: Tensor,
                 bias: Optional[Tensor] = None, gelu: bool = False, out_dtype: torch.dtype = torch.float32,
                 requant: Optional[P.QParams] = None) -> Tensor:
    """:func:`lowbit.primitives.int_linear_codes` (its exact float GEMM): the optimiser's integer linear."""
    return P.int_linear_codes(a, a_qp, qw, w_bits, w_scale, w_zero, bias, gelu, out_dtype, requant)


def unpacked(w: packing.PackedWeight) -> Tensor:
    """The unsigned codes of ``w``, unpacked once and kept on it while its planes are unchanged (:func:`kept`)."""
    return kept(w, "_lowbit_codes", tuple(w.planes.values()), lambda: packing.unpack(w))


def quant_attention(q: Tensor, k: Tensor, v: Tensor, q_qp, k_qp, v_qp, scale: float, p_qp=None,
                    rel_bias: Optional[Tensor] = None, mask: Optional[Tensor] = None, heads_last: bool = False,
                    requant: Optional[P.QParams] = None, requant_r: Optional[Tensor] = None,
                    requant_shift: Optional[Tensor] = None) -> Tensor:
    """:func:`lowbit.primitives.int_attention`'s output ``[B, H, L, D]`` (``[B, L, H, D]`` when ``heads_last``), or
    its int8 codes under ``requant`` (rescaled by ``requant_r`` / ``requant_shift``, channels ``h * D + d``)."""
    o, _ = P.int_attention(q, k, v, q_qp, k_qp, v_qp, scale, p_qp, rel_bias, mask)
    if heads_last or requant is not None:
        o = o.transpose(1, 2)
    if requant is not None:
        b, l, h, d = o.shape
        o = quantize(o.reshape(b, l, h * d), requant, requant_r, requant_shift).view(b, l, h, d)
        if not heads_last:
            o = o.transpose(1, 2).contiguous()
    return o
