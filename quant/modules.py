"""Quantized building blocks (fake-quant for optimisation; integer forms for export).

All quantization math goes through :mod:`lowbit.primitives` and the dispatch of :mod:`kernels.ops`.

Parametrisation
---------------
* Step sizes are learned in the log domain (``s = exp(log_s)``) so that they stay positive and Adam's
  learning rate acts as a relative change; zero points ``z`` are learned directly (rounded in the forward,
  straight-through); ternary weights keep ``z = 1`` fixed (a buffer).
* Channel rescale ``r`` is learned as ``log_r`` (``r = exp(log_r)``), ``shift`` directly.

Every module has four modes (``mode`` attribute): ``"float"`` (exact FP forward), ``"calib"`` (FP forward while
initialising the quantizers from the batch it sees, see :mod:`quant.calibrate`), ``"quant"`` (differentiable: what
the optimiser trains) and ``"int"`` (the exported model's integer arithmetic: int8 activation codes, int32 GEMMs and
the same float epilogues through :mod:`kernels.ops`, i.e. the Triton kernels on CUDA and :mod:`kernels.reference` on
the CPU, bit-identical there to :func:`export.load`; no gradients).

``"quant"`` mode has two forwards (``quant_forward`` attribute, :func:`set_forward`): ``"int"`` (default) runs the
``"int"`` arithmetic (bit-identical to ``"int"`` mode) with the fake-quant gradients (:mod:`quant.int_forward`:
STE for inputs, LSQ for steps and zero points); ``"fake"`` is the float fake-quant forward (quantize-dequantize, float
matmuls), which differs from the integer one by float rounding where it moves an activation across a code boundary.
Layers that are not fully integer (A16 activations, float weights in I&S-ViT's stage 1) always run the fake forward.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import ops
from kernels import reference as R
from lowbit import primitives as P
from lowbit.primitives import QParams, SULQParams
from quant import int_forward as IF

MODES = ("float", "calib", "quant", "int")
FORWARDS = ("int", "fake")
QUANTIZED_MODES = ("quant", "int")
SOFTMAX_QUANTIZERS = ("uniform", "sulq", "sulq-learned")
ACT_PERCENTILES = (0.01, 99.99)


class _Moded(nn.Module):
    mode: str = "float"
    quant_forward: str = "int"  # "quant" mode's forward: "int" (deployed arithmetic) or "fake" (float fake-quant)
    _checked: bool = False
    quantize_weights: bool = True  # False: weights stay float in "quant" mode (I&S-ViT SOS stage 1)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def set_forward(self, forward: str) -> None:
        if forward not in FORWARDS:
            raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
        self.quant_forward = forward

    @property
    def integer_forward(self) -> bool:
        """The integer arithmetic runs: ``"int"`` mode, or ``"quant"`` mode with ``quant_forward == "int"``, on a
        layer with quantized input and weights (else both fall back to the fake-quant forward)."""
        act = getattr(self, "act", None)
        return (self.mode == "int" or (self.mode == "quant" and self.quant_forward == "int")) \
            and act is not None and act.enabled and self.quantize_weights

    def _check_initialised(self) -> None:
        """Fake-quant with uninitialised quantizers (``s = 1``) would be silently wrong: refuse it (checked once)."""
        if not self._checked:
            if not bool(self.initialised):
                raise RuntimeError(f"{type(self).__name__} used in 'quant' mode before initialisation; run "
                                   f"quant.calibrate.calibrate(model, images) first")
            self._checked = True


class ActQuantizer(_Moded):
    """Per-tensor activation quantizer ``x_hat = fake_quantize((x - shift) / r, s, z, bits)``.

    ``bits == 16`` leaves activations in float (the quantizer is the identity). ``r``/``shift`` are not owned here:
    the caller passes them (see :class:`QuantLinear`).
    """

    #: initialise by I&S-ViT's percentile search (``primitives.init_qparams_searched``) instead of ``percentiles``
    search: bool = False

    def __init__(self, bits, percentiles=ACT_PERCENTILES):
        super().__init__()
        self.bits = bits
        self.percentiles = tuple(percentiles)
        self.log_s = nn.Parameter(torch.zeros(()))
        self.z = nn.Parameter(torch.zeros(()))
        self.register_buffer("initialised", torch.tensor(False))

    @property
    def enabled(self) -> bool:
        return self.bits != 16

    @property
    def s(self) -> Tensor:
        return self.log_s.exp()

    def qparams_at(self, s: Tensor, z: Tensor) -> QParams:
        """Deployable per-tensor quantizer at step ``s`` and zero point ``z``: ``s``, integer unsigned ``z``, bits."""
        return QParams(s.detach().clone(), P.round_zero_point(z.detach(), self.bits), self.bits)

    def qparams(self) -> QParams:
        """Deployable per-tensor quantizer: ``s`` (0-d), integer unsigned ``z`` (0-d), bits."""
        return self.qparams_at(self.s, self.z)

    @torch.no_grad()
    def init_from(self, x: Tensor) -> None:
        """``(s, z)`` from the percentile range of ``x`` (already rescaled), or searched (``search``)."""
        if not self.enabled:
            return
        if self.search:
            s, z = (t.reshape(()) for t in P.init_qparams_searched(x.detach().float().reshape(1, -1), self.bits,
                                                                   P.PUBLISHED_ACT_PCTS))
        else:
            s, z = P.init_act_qparams(x.detach().float(), self.bits, self.percentiles)
        self.log_s.copy_(s.log())
        self.z.copy_(z)
        self.initialised.fill_(True)

    def forward(self, x: Tensor, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
        if self.mode == "calib":
            self.init_from(P.apply_rescale(x.float(), r, shift))
        if self.mode not in QUANTIZED_MODES or not self.enabled:
            return P.apply_rescale(x, r, shift)
        self._check_initialised()
        return self.fake(x, self.s, self.z, r, shift)

    def fake(self, x: Tensor, s: Tensor, z: Tensor, r: Optional[Tensor] = None,
             shift: Optional[Tensor] = None) -> Tensor:
        """``ops.fake_quantize((x - shift) / r)`` at step ``s`` and zero point ``z`` (the ``"quant"`` forward)."""
        return ops.fake_quantize(x, QParams(s, z, self.bits), r, shift)


class SULQuantizer(_Moded):
    """Per-tensor SULQ of post-softmax probabilities (I&S-ViT), ``t = -log2(p + eta)`` quantized from the origin
    ``x0``: ``p_hat = 2^(-t_hat) - eta``, ``t_hat = fake_quantize(t - x0, s, z, bits) + x0``.

    ``published=True`` (``--softmax-quantizer sulq``): the exponent is rounded (``2^(-round(t_hat))``, power-of-two
    levels minus ``eta``), the initialisation is the authors' (:func:`lowbit.primitives.init_sulq_published`:
    their ``eta`` grid, the grid spanning the data) and the forward runs on their ``2^bits + 1`` levels
    (``grid_bits``). ``published=False`` (``sulq-learned``): ``x0 = 0``, no
    rounding, ``eta`` and ``(s, z)`` grid-searched by :func:`lowbit.primitives.init_sulq_params`. Afterwards
    ``eta`` and ``x0`` stay fixed (buffers) while ``s`` (as ``log_s``) and ``z`` are learned with the LSQ/STE
    gradients like every other quantizer.
    """

    def __init__(self, bits, published: bool = True):
        super().__init__()
        self.bits = bits
        self.published = bool(published)
        # the forward's grid: the authors' 2^bits + 1 levels when published, else 2^bits
        self.grid_bits = P.sulq_grid_bits(bits) if self.published and bits != 16 else bits
        self.log_s = nn.Parameter(torch.zeros(()))
        self.z = nn.Parameter(torch.zeros(()))
        self.register_buffer("eta", torch.tensor(1.0))
        self.register_buffer("x0", torch.tensor(0.0))
        self.register_buffer("initialised", torch.tensor(False))

    @property
    def enabled(self) -> bool:
        return self.bits != 16

    @property
    def s(self) -> Tensor:
        return self.log_s.exp()

    def qparams_at(self, s: Tensor, z: Tensor) -> SULQParams:
        """Deployable quantizer at log-domain step ``s`` and zero point ``z`` (rounded; 0-d tensors)."""
        return SULQParams(self.eta.detach().clone(), s.detach().clone(),
                          P.round_zero_point(z.detach(), self.grid_bits), self.grid_bits, self.x0.detach().clone(),
                          self.published)

    def qparams(self) -> SULQParams:
        """Deployable quantizer: ``eta``, log-domain ``s``, integer unsigned ``z``, ``x0`` (0-d each), bits, pow2."""
        return self.qparams_at(self.s, self.z)

    @torch.no_grad()
    def init_from(self, p: Tensor) -> None:
        if not self.enabled:
            return
        init = P.init_sulq_published if self.published else P.init_sulq_params
        sp = init(p.detach().float(), self.bits)
        self.eta.copy_(sp.eta)
        self.x0.copy_(torch.as_tensor(sp.x0))
        self.log_s.copy_(sp.s.log())
        self.z.copy_(sp.z)
        self.initialised.fill_(True)

    def forward(self, p: Tensor) -> Tensor:
        if self.mode == "calib":
            self.init_from(p)
        if self.mode not in QUANTIZED_MODES or not self.enabled:
            return p
        self._check_initialised()
        return self.fake(p, self.s, self.z)

    def fake(self, p: Tensor, s: Tensor, z: Tensor) -> Tensor:
        """SULQ fake-quant of ``p`` with log-domain step ``s`` and zero point ``z`` (the ``"quant"`` forward)."""
        return P.sulq_fake_quantize(p, self.eta, s, z, self.grid_bits, x0=self.x0, pow2=self.published)


def _weight_qparams_init(module, w: Tensor) -> None:
    """Per-channel ``(s_w, z_w)`` of ``w [N, K]``: min/max (ternary: searched scale), or I&S-ViT's percentile
    search when the module's ``w_search`` is set."""
    if getattr(module, "w_search", False):
        s, z = P.init_qparams_searched(w.detach().float(), module.w_bits, P.PUBLISHED_WEIGHT_PCTS)
    else:
        s, z = P.init_weight_qparams(w.detach().float(), module.w_bits)
    module.log_ws.data.copy_(s.log())
    module.initialised.fill_(True)
    if isinstance(module.wz, nn.Parameter):
        module.wz.data.copy_(z)
    else:
        module.wz.copy_(z)


class QuantLinear(_Moded):
    """Quantized ``y = W x + b`` with weight refinement and optional channel rescale/shift.

    Fake-quant forward (``W [N, K]``, ``x [..., K]``)::

        x_hat      = fake_quantize((x - shift) / r, s_a, z_a, a_bits)            per tensor
        W', b'     = fold_rescale(W + dW, b, r, shift)     i.e. W' = (W + dW) * r, b' = b + (W + dW) @ shift
        W_hat      = fake_quantize(W', s_w, z_w, w_bits)                         per output channel, s_w, z_w [N, 1]
        y          = x_hat @ W_hat^T + b'

    The refinement ``dW`` lives in the original weight domain and is applied *before* the fold, so the deployed
    weight codes are ``quantize((W + dW) * r)``. ``W`` and ``b`` are frozen; ``dW`` starts at zero.
    ``rescale=True`` creates ``r = exp(log_r)`` and ``shift`` (used on post-LayerNorm linears).

    Integer forward (``"int"`` mode, and ``"quant"`` mode by default): ``y = ops.linear_float_weight(ops.quantize(x,
    r, shift), W', ...)`` with the :meth:`deploy` values, the arithmetic of ``ops.packed_linear`` on the packed codes
    without packing them (:class:`quant.int_forward.IntLinearFn`: fake-quant gradients in ``"quant"`` mode); when
    ``norm_fused`` the input comes from a :class:`QuantLayerNorm` that already applied ``r``/``shift``.
    """

    norm_fused: bool = False

    def __init__(self, linear: nn.Linear, w_bits, a_bits, rescale: bool = False):
        super().__init__()
        P.check_bits(w_bits)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.w_bits, self.a_bits = w_bits, a_bits
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.dW = nn.Parameter(torch.zeros_like(self.weight))
        n = self.out_features
        self.log_ws = nn.Parameter(torch.zeros(n, 1))
        if w_bits == P.TERNARY:
            self.register_buffer("wz", torch.ones(n, 1))
        else:
            self.wz = nn.Parameter(torch.zeros(n, 1))
        self.register_buffer("initialised", torch.tensor(False))
        self.act = ActQuantizer(a_bits)
        self.rescale = rescale
        if rescale:
            self.log_r = nn.Parameter(torch.zeros(self.in_features))
            self.shift = nn.Parameter(torch.zeros(self.in_features))
        else:
            self.log_r = self.shift = None

    def set_mode(self, mode: str) -> None:
        super().set_mode(mode)
        self.act.set_mode(mode)

    @property
    def r(self) -> Optional[Tensor]:
        return None if self.log_r is None else self.log_r.exp()

    @property
    def ws(self) -> Tensor:
        return self.log_ws.exp()

    def folded(self):
        """``(W', b') = fold_rescale(W + dW, b, r, shift)``."""
        return P.fold_rescale(self.weight + self.dW, self.bias, self.r, self.shift)

    @torch.no_grad()
    def init_rescale(self, x: Tensor, alpha: float = 0.5, percentiles=ACT_PERCENTILES) -> None:
        """SmoothQuant-style ``(r, shift)`` from per-channel percentile ranges of ``x [..., K]``."""
        x2 = x.detach().float().reshape(-1, self.in_features)
        lo = P.percentile(x2, percentiles[0], dim=0).reshape(-1)
        hi = P.percentile(x2, percentiles[1], dim=0).reshape(-1)
        r, shift = P.smooth_rescale_shift(lo, hi, self.weight + self.dW, alpha)
        self.log_r.copy_(r.log())
        self.shift.copy_(shift)

    @torch.no_grad()
    def init_weight_qparams(self) -> None:
        """Per-channel ``(s_w, z_w)`` of the folded weight (``primitives.init_weight_qparams``)."""
        _weight_qparams_init(self, self.folded()[0])

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "float":
            return F.linear(x, self.weight + self.dW, self.bias)
        if self.integer_forward:
            return self._forward_int(x)
        if self.mode == "calib":
            if self.rescale and self.act.enabled:
                self.init_rescale(x)
            self.init_weight_qparams()
        xq = self.act(x, self.r, self.shift)
        w, b = self.folded()
        if self.mode in QUANTIZED_MODES and self.quantize_weights:
            self._check_initialised()
            w = ops.fake_quantize_weight(w, self.ws, self.wz, self.w_bits)
        return F.linear(xq, w.to(xq.dtype), b.to(xq.dtype))

    def _forward_int(self, x: Tensor) -> Tensor:
        """:class:`quant.int_forward.IntLinearFn` on the folded weight (no gradient in ``"int"`` mode)."""
        self._check_initialised()
        self.act._check_initialised()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode == "quant"):
            w, b = self.folded()
            r, shift = (None, None) if self.norm_fused else (self.r, self.shift)
            return IF.IntLinearFn.apply(x, r, shift, self.act.s, self.act.z, w, b, self.ws, self.wz, self.a_bits,
                                        self.w_bits, None)

    @torch.no_grad()
    def deploy(self) -> Dict[str, object]:
        """Integer form: ``codes [N, K] uint8 = quantize(W', s_w, z_w)``, ``w_scale [N]``, ``w_zero [N]`` (unsigned
        integer), ``bias [N]`` (= b'), ``input`` (:class:`QParams`, or None for A16), ``r [K]``/``shift [K]`` (or None),
        ``w_bits``. Then ``y = lowbit.primitives.int_linear_codes(quantize((x - shift) / r), ...)`` with ``bias``.
        """
        w, b = self.folded()
        return {
            "codes": P.quantize(w.float(), self.ws, self.wz, self.w_bits),
            "w_scale": self.ws.detach().reshape(-1).clone(),
            "w_zero": P.round_zero_point(self.wz.detach(), self.w_bits).reshape(-1),
            "bias": b.detach().float().clone(),
            "input": self.act.qparams() if self.act.enabled else None,
            "r": None if self.log_r is None else self.r.detach().clone(),
            "shift": None if self.shift is None else self.shift.detach().clone(),
            "w_bits": self.w_bits,
        }

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}, a_bits={self.a_bits}, "
                f"rescale={self.rescale}")


class QuantConv2dPatch(_Moded):
    """Quantized patch-embedding convolution (kernel == stride, no padding).

    Weight ``[D, C, p, p]`` is quantized per output channel as ``[D, C*p*p]`` at ``w_bits`` with refinement ``dW``;
    the input image is quantized per tensor at ``input_bits`` (8; 16 = float).
    """

    def __init__(self, conv: nn.Conv2d, w_bits, input_bits=8):
        super().__init__()
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding not in ((0, 0), 0, "valid"):
            raise ValueError("quantized patch embedding needs a plain conv (groups=1, dilation=1, no padding)")
        self.stride, self.w_bits = conv.stride, w_bits
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.dW = nn.Parameter(torch.zeros_like(self.weight))
        n = self.weight.shape[0]
        self.log_ws = nn.Parameter(torch.zeros(n, 1))
        if w_bits == P.TERNARY:
            self.register_buffer("wz", torch.ones(n, 1))
        else:
            self.wz = nn.Parameter(torch.zeros(n, 1))
        self.register_buffer("initialised", torch.tensor(False))
        self.act = ActQuantizer(input_bits)

    def set_mode(self, mode: str) -> None:
        super().set_mode(mode)
        self.act.set_mode(mode)

    @property
    def ws(self) -> Tensor:
        return self.log_ws.exp()

    @property
    def integer_forward(self) -> bool:
        """As :class:`_Moded`, but overlapping patches (stride != kernel) keep ``"quant"`` mode's fake forward
        (``"int"`` mode refuses them: they have no deployed form)."""
        overlap = tuple(self.stride) != tuple(self.weight.shape[2:])
        return super().integer_forward and not (overlap and self.mode == "quant")

    def weight_2d(self) -> Tensor:
        w = self.weight + self.dW
        return w.reshape(w.shape[0], -1)

    @torch.no_grad()
    def init_weight_qparams(self) -> None:
        """Per-channel ``(s_w, z_w)`` of the refined weight ``[D, C*p*p]`` (``primitives.init_weight_qparams``)."""
        _weight_qparams_init(self, self.weight_2d())

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "calib":
            self.init_weight_qparams()
        if self.mode == "float":
            return F.conv2d(x, self.weight + self.dW, self.bias, self.stride)
        if self.integer_forward:
            return self._forward_int(x)
        xq = self.act(x)
        w = self.weight_2d()
        if self.mode in QUANTIZED_MODES and self.quantize_weights:
            self._check_initialised()
            w = ops.fake_quantize_weight(w, self.ws, self.wz, self.w_bits)
        return F.conv2d(xq, w.reshape(self.weight.shape).to(xq.dtype), self.bias, self.stride)

    def _forward_int(self, x: Tensor) -> Tensor:
        """im2col (:func:`lowbit.primitives.patchify`) + integer linear (:class:`quant.int_forward.IntLinearFn`),
        NCHW output ``[B, D, H/p, W/p]``; no gradient in ``"int"`` mode."""
        self._check_initialised()
        self.act._check_initialised()
        ph, pw = self.weight.shape[2:]
        if tuple(self.stride) != (ph, pw):
            raise NotImplementedError(f"'int' mode needs non-overlapping patches (stride {tuple(self.stride)} != "
                                      f"{(ph, pw)})")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode == "quant"):
            return IF.IntLinearFn.apply(x, None, None, self.act.s, self.act.z, self.weight_2d(), self.bias, self.ws,
                                        self.wz, self.act.bits, self.w_bits, (ph, pw))

    @torch.no_grad()
    def deploy(self) -> Dict[str, object]:
        """Integer form: ``codes [D, C*p*p] uint8`` (im2col order C, kh, kw), ``w_scale [D]``, ``w_zero [D]``,
        ``bias [D]``, ``input`` QParams (None for float input), ``kernel_shape`` ``(D, C, p, p)``, ``stride``."""
        return {
            "codes": P.quantize(self.weight_2d().float(), self.ws, self.wz, self.w_bits),
            "w_scale": self.ws.detach().reshape(-1).clone(),
            "w_zero": P.round_zero_point(self.wz.detach(), self.w_bits).reshape(-1),
            "bias": None if self.bias is None else self.bias.detach().clone(),
            "input": self.act.qparams() if self.act.enabled else None,
            "kernel_shape": tuple(self.weight.shape),
            "stride": tuple(self.stride),
            "w_bits": self.w_bits,
        }


class QuantAttentionCore(_Moded):
    """Quantized ``softmax(scale * Q K^T + bias + mask) V`` on ``q, k, v [B, H, L, D]``.

    ``q_hat, k_hat, v_hat`` are per-tensor fake-quantized at ``a_bits`` (``q`` before the scale, as in
    :func:`kernels.reference.quant_attention`); relative-position bias and mask are added in float; the
    probabilities ``P`` are fake-quantized at ``a_bits`` by a learnable ``softmax_quantizer``: ``"uniform"``
    (:class:`ActQuantizer`, integer ``P V``) or ``"sulq"`` / ``"sulq-learned"`` (:class:`SULQuantizer`,
    table-dequantized ``P``, float ``P V``; see :mod:`kernels.quant_attention_sulq`); softmax is float
    (:func:`quant.int_forward.fake_attention`). Integer forward (``"int"`` mode, ``"quant"`` by default):
    ``ops.quant_attention`` on the int8 codes (:class:`quant.int_forward.IntAttentionFn`, fake-quant gradients).
    """

    def __init__(self, a_bits, softmax_quantizer: str = "uniform"):
        super().__init__()
        if softmax_quantizer not in SOFTMAX_QUANTIZERS:
            raise ValueError(f"softmax_quantizer must be one of {SOFTMAX_QUANTIZERS}, got {softmax_quantizer!r}")
        self.softmax_quantizer = softmax_quantizer
        self.q_quant, self.k_quant = ActQuantizer(a_bits), ActQuantizer(a_bits)
        self.v_quant = ActQuantizer(a_bits)
        self.p_quant = (SULQuantizer(a_bits, published=softmax_quantizer == "sulq")
                        if softmax_quantizer.startswith("sulq") else ActQuantizer(a_bits))

    def set_mode(self, mode: str) -> None:
        super().set_mode(mode)
        for m in (self.q_quant, self.k_quant, self.v_quant, self.p_quant):
            m.set_mode(mode)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float, rel_bias: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        """``rel_bias [H, L, L]``; ``mask [nW, L, L]`` with windows fastest in the batch (Swin) or a
        broadcastable additive mask (ViT ``attn_mask``)."""
        if self.q_quant.enabled and (self.mode == "int" or (self.mode == "quant" and self.quant_forward == "int")):
            return self._forward_int(q, k, v, scale, rel_bias, mask)
        return IF.fake_attention(q, k, v, scale, rel_bias, mask, self.q_quant, self.k_quant, self.v_quant,
                                 self.p_quant)

    def _forward_int(self, q: Tensor, k: Tensor, v: Tensor, scale: float, rel_bias: Optional[Tensor],
                     mask: Optional[Tensor]) -> Tensor:
        """:class:`quant.int_forward.IntAttentionFn`: ``ops.quant_attention`` on the int8 codes of ``q, k, v``
        (no gradient in ``"int"`` mode)."""
        qs = (self.q_quant, self.k_quant, self.v_quant, self.p_quant)
        for m in qs:
            m._check_initialised()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode == "quant"):
            return IF.IntAttentionFn.apply(self, scale, q, k, v, rel_bias, mask,
                                           *(t for m in qs for t in (m.s, m.z)))

    def deploy(self) -> Dict[str, Optional[QParams]]:
        """Per-tensor QParams for ``q``, ``k``, ``v`` and the probabilities ``p`` (None each under A16); ``p`` is a
        :class:`SULQParams` under a SULQ ``softmax_quantizer`` (``kernels.ops.quant_attention`` takes either)."""
        return {name: (m.qparams() if m.enabled else None)
                for name, m in (("q", self.q_quant), ("k", self.k_quant), ("v", self.v_quant), ("p", self.p_quant))}


class ActCorrection(_Moded):
    """DFQ-ViT activation correction of a transformer block's output ``y [..., D]``: ``y' = y @ M^T`` with a learnable
    ``M [D, D]`` (identity at init: output unchanged), applied in ``"quant"`` mode only (float/calib see ``y``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.matrix = nn.Parameter(torch.eye(dim))

    def forward(self, y: Tensor) -> Tensor:
        if self.mode not in QUANTIZED_MODES:
            return y
        return F.linear(y, self.matrix.to(y.dtype))

    @torch.no_grad()
    def deploy(self) -> Dict[str, object]:
        """``matrix [D, D]`` float32: the block output becomes ``y @ matrix.T`` (last dim, after the residuals)."""
        return {"matrix": self.matrix.detach().float().clone()}


class QuantLayerNorm(nn.LayerNorm, _Moded):
    """A LayerNorm feeding only ``consumer`` (a :class:`QuantLinear`), which the exporter fuses into it.

    ``"float"``/``"calib"``, fake-quant ``"quant"``: the plain LayerNorm (the consumer applies its rescale). When
    the consumer runs its integer forward (``"int"``, default ``"quant"``): ``kernels.reference.layernorm`` with the
    folded affine of :meth:`folded_affine` (``gamma' = gamma / r``, ``beta' = (beta - shift) / r``), the values the
    exported ``layernorm_quantize`` quantizes (:class:`quant.int_forward.FusedLayerNormFn`: in ``"quant"`` mode with
    the gradients of ``(LN(x) - shift) / r``). ``weight``/``bias`` are the original module's parameters (same
    state-dict keys).
    """

    def __init__(self, ln: nn.LayerNorm, consumer: QuantLinear):
        if ln.weight is None or ln.bias is None or len(ln.normalized_shape) != 1:
            raise ValueError("QuantLayerNorm needs an affine LayerNorm over the last dimension")
        super().__init__(ln.normalized_shape, eps=ln.eps, device=ln.weight.device, dtype=ln.weight.dtype)
        self.weight, self.bias = ln.weight, ln.bias
        self._consumer = (consumer,)
        consumer.norm_fused = True

    @torch.no_grad()
    def folded_affine(self):
        """fp32 ``(gamma', beta')`` (:func:`lowbit.primitives.fold_into_layernorm` when the consumer rescales)."""
        c = self._consumer[0]
        g, b = self.weight.detach().float(), self.bias.detach().float()
        if c.rescale and c.act.enabled:
            g, b = P.fold_into_layernorm(g, b, c.r.detach().float(), c.shift.detach().float())
        return g, b

    def forward(self, x: Tensor) -> Tensor:
        c = self._consumer[0]
        if c.integer_forward:
            with torch.set_grad_enabled(torch.is_grad_enabled() and c.mode == "quant"):
                if c.rescale:
                    return IF.FusedLayerNormFn.apply(x, self.weight, self.bias, c.r, c.shift, self.eps)
                return R.layernorm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


def quant_modules(model: nn.Module):
    """All moded quantized modules of ``model`` (top-level ones, i.e. not their inner activation quantizers)."""
    return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2dPatch, QuantAttentionCore))]


def set_forward(model: nn.Module, forward: str) -> None:
    """``"quant"`` mode's forward for every quantized module of ``model``: ``"int"`` (the deployed integer
    arithmetic through :mod:`kernels.ops`, fake-quant gradients; the default) or ``"fake"`` (float fake-quant)."""
    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
    for m in model.modules():
        if isinstance(m, _Moded):
            m.set_forward(forward)


def set_mode(model: nn.Module, mode: str) -> None:
    """Put every quantized module (and activation correction, fused LayerNorm) of ``model`` in ``mode``
    (``float``, ``calib``, ``quant``, ``int``)."""
    for m in quant_modules(model) + [m for m in model.modules() if isinstance(m, (ActCorrection, QuantLayerNorm))]:
        m.set_mode(mode)
