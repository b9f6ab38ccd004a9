"""Integer forward, fake-quant backward: the deployed arithmetic in the optimiser's forward pass.

Each :class:`torch.autograd.Function` here computes in its forward exactly what the exported model computes, through
:mod:`kernels.ops` (Triton on CUDA, the CPU backend on the CPU); ``"int"`` mode calls
the same functions without gradients, so the two are bit-identical. The backward rebuilds the float fake-quant
subgraph of the same layer from the saved float inputs (:func:`kernels.ops.fake_quantize`,
:func:`kernels.ops.fake_quantize_weight`, :mod:`lowbit.primitives`) and backpropagates through it: the gradients
are those of the fake-quant forward (``quant.run --forward fake``): STE for inputs, LSQ for steps and zero points,
chain rule for the rescale/shift and the refinement ``dW`` (which the caller folds outside, as the fake path does).

* :class:`IntLinearFn` -- ``y = packed_linear(quantize((x - shift) / r), pack(quantize(W')), s_w, z_w, b')`` for
  ``x [..., K]`` (or the im2col patches of an image ``[B, C, H, W]``, output ``[B, N, H/p, W/p]``). Backward: the
  dequantized tensors ``x_hat = fake_quantize(x)``, ``W_hat = fake_quantize_weight(W')`` are recomputed and
  ``dL/dx_hat = g @ W_hat``, ``dL/dW_hat = g^T x_hat``, ``dL/db' = sum g`` are pushed through them (float matmuls).
* :class:`IntAttentionFn` -- ``ops.quant_attention`` on the int8 codes of ``q, k, v [B, H, L, D]``. Backward:
  the fake-quant attention (``P`` recomputed in float, never stored) is rebuilt and differentiated.
* :class:`FusedLayerNormFn` -- the LayerNorm with the consumer's rescale folded into its affine
  (``gamma / r``, ``(beta - shift) / r``), as deployed; backward of ``(LayerNorm(x) - shift) / r``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import ops
from kernels.configs import ATTENTION_HEAD_DIMS
from lowbit import primitives as P
from lowbit.primitives import QParams


def _leaves(tensors, needs):
    """Detached copies of ``tensors`` (requiring grad where ``needs``) for rebuilding a subgraph in a backward."""
    return [None if t is None else t.detach().requires_grad_(bool(n) and t.is_floating_point())
            for t, n in zip(tensors, needs)]


def _grads(outs, gouts, leaves, needs):
    """``d(sum <outs, gouts>)/d leaves`` for the leaves that need it (None elsewhere)."""
    want = [i for i, (t, n) in enumerate(zip(leaves, needs)) if n and t is not None]
    pairs = [(o, g) for o, g in zip(outs, gouts) if o is not None and g is not None and o.requires_grad]
    res = [None] * len(leaves)
    if want and pairs:
        got = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in want], [g for _, g in pairs],
                                  allow_unused=True)
        for i, g in zip(want, got):
            res[i] = g
    return res


# ---------------------------------------------------------------------------------------------- linear


def act_qparams(s: Tensor, z: Tensor, bits) -> QParams:
    """The deployed per-tensor quantizer of a learned ``(s, z)``: ``s`` and the rounded unsigned ``z``."""
    return QParams(s.detach(), P.round_zero_point(z.detach(), bits), bits)


def deployed_linear(x: Tensor, a_qp: QParams, r: Optional[Tensor], shift: Optional[Tensor], w: Tensor,
               bias: Optional[Tensor], ws: Tensor, wz: Tensor, w_bits,
               patch: Optional[Tuple[int, int]] = None) -> Tensor:
    """The deployed linear (no gradient): codes ``a = ops.quantize((x - shift) / r)`` (of ``patchify(x)`` when
    ``patch``) times the weight codes ``quantize(w, ws, wz)`` by ``ops.linear_float_weight`` (the arithmetic of
    ``ops.packed_linear`` on the packed codes, without packing them); float32 output ``[..., N]`` (patch:
    ``[B, N, H/p, W/p]``)."""
    xin = P.patchify(x, patch) if patch is not None else x
    a = ops.quantize(xin, a_qp, r, shift)
    y = ops.linear_float_weight(a, a_qp, w.detach(), ws.detach(), wz.detach(), w_bits,
                                None if bias is None else P.f32(bias.detach()))
    if patch is not None:
        ph, pw = patch
        y = y.reshape(x.shape[0], x.shape[2] // ph, x.shape[3] // pw, -1).permute(0, 3, 1, 2)
    return y


class IntLinearFn(torch.autograd.Function):
    """Integer forward of a quantized linear, fake-quant (STE/LSQ) backward.

    ``apply(x, r, shift, s, z, w, bias, ws, wz, a_bits, w_bits, patch)``: ``x [..., K]`` float (or an image with
    ``patch``), ``r``/``shift [K]`` the input rescale applied by the quantizer (None when a fused LayerNorm did it),
    ``s``/``z`` the per-tensor input quantizer, ``w [N, K]`` the folded weight ``W' = (W + dW) * r``, ``bias`` ``b'``,
    ``ws``/``wz [N, 1]`` the weight quantizer. Gradients for every tensor input, as
    ``F.linear(fake_quantize((x - shift) / r), fake_quantize_weight(w), bias)``.
    """

    @staticmethod
    def forward(ctx, x, r, shift, s, z, w, bias, ws, wz, a_bits, w_bits, patch):
        ctx.save_for_backward(x, r, shift, s, z, w, bias, ws, wz)
        ctx.cfg = (a_bits, w_bits, patch)
        return deployed_linear(x, act_qparams(s, z, a_bits), r, shift, w, bias, ws, wz, w_bits, patch)

    @staticmethod
    def backward(ctx, g):
        a_bits, w_bits, patch = ctx.cfg
        x, r, shift, s, z, w, bias, ws, wz = ctx.saved_tensors
        needs = ctx.needs_input_grad[:9]
        xq, x_vjp = ops.fake_quantize_vjp(x, QParams(s, z, a_bits), r, shift, needs[:5])
        wq, w_vjp = ops.fake_quantize_weight_vjp(w, ws, wz, w_bits, (needs[5], needs[7], needs[8]))
        if patch is not None:
            xq = P.patchify(xq, patch)
            g = g.permute(0, 2, 3, 1)
        g2 = g.reshape(-1, wq.shape[0])
        g2 = g2 if g2.dtype == wq.dtype else g2.to(wq.dtype)
        grads = [None] * 9
        if any(needs[:5]):
            gxq = (g2 @ wq).reshape(xq.shape)
            grads[:5] = x_vjp(gxq if patch is None else P.unpatchify(gxq, patch, x.shape))
        if needs[5] or needs[7] or needs[8]:
            grads[5], grads[7], grads[8] = w_vjp(g2.t() @ xq.reshape(-1, wq.shape[1]))
        if bias is not None and needs[6]:
            grads[6] = g2.sum(0)
            grads[6] = grads[6] if grads[6].dtype == bias.dtype else grads[6].to(bias.dtype)
        return (*grads, None, None, None)


# ---------------------------------------------------------------------------------------------- LayerNorm


def fused_layernorm(x: Tensor, ln_w: Tensor, ln_b: Tensor, r: Tensor, shift: Tensor, eps: float) -> Tensor:
    """The deployed ``(LayerNorm(x) - shift) / r``: :func:`lowbit.primitives.layernorm` with the folded affine
    ``(gamma / r, (beta - shift) / r)`` (:func:`lowbit.primitives.fold_into_layernorm`), float32."""
    g, b = P.fold_into_layernorm(P.f32(ln_w.detach()), P.f32(ln_b.detach()), P.f32(r.detach()),
                                 P.f32(shift.detach()))
    return P.layernorm(x, g, b, eps)


class FusedLayerNormFn(torch.autograd.Function):
    """``apply(x, ln_w, ln_b, r, shift, eps)``: forward :func:`fused_layernorm`, backward that of
    ``apply_rescale(F.layer_norm(x, ln_w, ln_b, eps), r, shift)`` (what the fake-quant consumer computes)."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, r, shift, eps):
        ctx.save_for_backward(x, ln_w, ln_b, r, shift)
        ctx.eps = eps
        return fused_layernorm(x, ln_w, ln_b, r, shift, eps)

    @staticmethod
    def backward(ctx, g):
        needs = ctx.needs_input_grad[:5]
        x, ln_w, ln_b, r, shift = leaves = _leaves(ctx.saved_tensors, needs)
        with torch.enable_grad():
            y = P.apply_rescale(F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, ctx.eps).float(), r, shift)
            grads = _grads([y], [g], leaves, needs)
        return (*grads, None)


# ---------------------------------------------------------------------------------------------- attention


def fake_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, rel_bias: Optional[Tensor], mask: Optional[Tensor],
                   fq_q: Callable, fq_k: Callable, fq_v: Callable, fq_p: Callable) -> Tensor:
    """The fake-quant attention ``fq_p(softmax(scale * fq_q(q) fq_k(k)^T + rel_bias + mask)) @ fq_v(v)`` in float
    (``rel_bias [H, L, L]``; ``mask [nW, L, L]`` with windows fastest in the batch, or broadcastable additive)."""
    q, k, v = fq_q(q), fq_k(k), fq_v(v)
    attn = (q * scale) @ k.transpose(-2, -1)
    if rel_bias is not None:
        attn = attn + rel_bias.unsqueeze(0)
    if mask is not None:
        b, h, n, _ = attn.shape
        if mask.dim() == 3:
            nw = mask.shape[0]
            attn = (attn.view(b // nw, nw, h, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(b, h, n, n)
        else:
            attn = attn + mask
    attn = attn.softmax(dim=-1)
    return fq_p(attn) @ v


def deployed_attention(q: Tensor, k: Tensor, v: Tensor, qps, scale: float, rel_bias: Optional[Tensor],
                  mask: Optional[Tensor]) -> Tensor:
    """The deployed attention (no gradient): ``ops.quant_attention`` on ``ops.quantize`` codes of ``q, k, v``
    with ``qps = (q_qp, k_qp, v_qp, p_qp)`` (``p_qp`` a :class:`QParams` or :class:`lowbit.primitives.SULQParams`).
    Head dims the Triton kernels do not take run on the CPU backend's plain torch code, on the same device."""
    if mask is not None and mask.dim() != 3:
        raise NotImplementedError("the integer attention takes only Swin's [nW, L, L] window mask, not a ViT "
                                  "attn_mask; use the fake-quant forward (quant.modules.set_forward(model, 'fake'))")
    q_qp, k_qp, v_qp, p_qp = qps
    qc, kc, vc = (ops.quantize(t.contiguous(), qp) for t, qp in ((q, q_qp), (k, k_qp), (v, v_qp)))
    rb = None if rel_bias is None else P.f32(rel_bias.detach()).contiguous()
    mk = None if mask is None else P.f32(mask.detach())
    with contextlib.nullcontext() if q.shape[-1] in ATTENTION_HEAD_DIMS else ops.using_backend("cpu"):
        return ops.quant_attention(qc, kc, vc, q_qp, k_qp, v_qp, scale, p_qp, rel_bias=rb, mask=mk)


class IntAttentionFn(torch.autograd.Function):
    """``apply(core, scale, q, k, v, rel_bias, mask, sq, zq, sk, zk, sv, zv, sp, zp)``: forward
    :func:`deployed_attention` with the deployed quantizers of ``core`` (a :class:`quant.modules.QuantAttentionCore`)
    at the given steps/zero points; backward of :func:`fake_attention` with ``core``'s fake quantizers at them
    (recomputed from the saved ``q, k, v``)."""

    @staticmethod
    def forward(ctx, core, scale, q, k, v, rel_bias, mask, sq, zq, sk, zk, sv, zv, sp, zp):
        ctx.save_for_backward(q, k, v, rel_bias, mask, sq, zq, sk, zk, sv, zv, sp, zp)
        ctx.core, ctx.scale = core, scale
        qps = [m.qparams_at(s, z) for s, z, m in ((sq, zq, core.q_quant), (sk, zk, core.k_quant),
                                                     (sv, zv, core.v_quant), (sp, zp, core.p_quant))]
        return deployed_attention(q, k, v, qps, scale, rel_bias, mask)

    @staticmethod
    def backward(ctx, g):
        core = ctx.core
        needs = ctx.needs_input_grad[2:]
        leaves = _leaves(ctx.saved_tensors, needs)
        q, k, v, rel_bias, mask, sq, zq, sk, zk, sv, zv, sp, zp = leaves
        with torch.enable_grad():
            o = fake_attention(q, k, v, ctx.scale, rel_bias, mask,
                               lambda t: core.q_quant.fake(t, sq, zq), lambda t: core.k_quant.fake(t, sk, zk),
                               lambda t: core.v_quant.fake(t, sv, zv), lambda t: core.p_quant.fake(t, sp, zp))
            grads = _grads([o], [g], leaves, needs)
        return (None, None, *grads)
