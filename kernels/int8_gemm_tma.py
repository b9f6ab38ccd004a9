"""Persistent int8 GEMM with TMA tensor descriptors (sm_90): ``out[m, n] = epilogue(sum_k a[m, k] * w[n, k])``.

``a [M, K]`` int8 activation codes and ``w [N, K]`` int8 weight codes (K-major: the layout int8 ``wgmma`` takes for
both operands; the centred codes ``w - zw[n]`` of :mod:`kernels.unpack_codes` when ``W_CENTERED``, kept per loaded
weight) come as host-side tensor descriptors of ``[BLOCK_M, BLOCK_K]`` and ``[BLOCK_N, BLOCK_K]`` boxes: each tile
is one bulk copy into shared memory (``cp.async.bulk.tensor``), rows and columns past the edge read as zeros, and
the software pipeliner keeps ``num_stages`` of them in flight ahead of the ``wgmma``. ``NUM_SMS`` programs (one per
SM) walk the output tiles ``pid, pid + NUM_SMS, ...`` in :func:`kernels._helpers.tile_coords` order, so the next
tile's loads overlap this tile's epilogue and no wave is left half full. The epilogue is
:func:`kernels._helpers.gemm_epilogue` (zero points, scales, bias, GELU, per-tensor or per-column requant, the
residual add), run on ``EPI_SPLIT`` column slices of the accumulator one after another so that fewer float values
are live at once than with the whole ``[BLOCK_M, BLOCK_N]`` tile.

Under the interpreter the descriptors are Triton's own emulation (the same block loads, zero-filled at the edges),
so the tests run this body as the GPU does.
"""
import triton
import triton.language as tl

from ._helpers import gemm_epilogue, tile_coords


@triton.jit
def int8_gemm_tma_kernel(a_desc, w_desc, out_ptr, colsum_ptr, sa_ptr, za_ptr, sw_ptr, zw_ptr, bias_ptr, rq_s_ptr,
                         rq_z_ptr, res_ptr, M, N, K, stride_om, stride_rm, HAS_BIAS: tl.constexpr,
                         GELU: tl.constexpr, REQUANT: tl.constexpr, RQ_QMAX: tl.constexpr, RQ_OFFSET: tl.constexpr,
                         RQ_PER_COL: tl.constexpr, W_CENTERED: tl.constexpr, HAS_RES: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         EPI_SPLIT: tl.constexpr, NUM_SMS: tl.constexpr):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True, disallow_acc_multi_buffer=True):
        pid_m, pid_n = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([off_m, k0])
            w = w_desc.load([off_n, k0])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
            if not W_CENTERED:
                rowsum += tl.sum(a.to(tl.int32), axis=1)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        if EPI_SPLIT == 1:
            _epilogue(acc, rowsum, offs_m, off_n, BLOCK_N, M, N, K, out_ptr, stride_om, colsum_ptr, sa_ptr, za_ptr,
                      sw_ptr, zw_ptr, bias_ptr, rq_s_ptr, rq_z_ptr, res_ptr, stride_rm, HAS_BIAS, GELU, REQUANT,
                      RQ_QMAX, RQ_OFFSET, RQ_PER_COL, W_CENTERED, HAS_RES)
        elif EPI_SPLIT == 2:
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            for i in tl.static_range(2):
                _epilogue(acc0 if i == 0 else acc1, rowsum, offs_m, off_n + i * (BLOCK_N // 2), BLOCK_N // 2, M, N,
                          K, out_ptr, stride_om, colsum_ptr, sa_ptr, za_ptr, sw_ptr, zw_ptr, bias_ptr, rq_s_ptr,
                          rq_z_ptr, res_ptr, stride_rm, HAS_BIAS, GELU, REQUANT, RQ_QMAX, RQ_OFFSET, RQ_PER_COL,
                          W_CENTERED, HAS_RES)
        else:  # 4 slices: column i * BN/2 + j * BN/4 + c is slice (i, j)
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, 2, BLOCK_N // 4)), (0, 3, 2, 1))
            for i in tl.static_range(2):
                h = tl.split(halves)[i]
                for j in tl.static_range(2):
                    _epilogue(tl.split(h)[j], rowsum, offs_m, off_n + i * (BLOCK_N // 2) + j * (BLOCK_N // 4),
                              BLOCK_N // 4, M, N, K, out_ptr, stride_om, colsum_ptr, sa_ptr, za_ptr, sw_ptr, zw_ptr,
                              bias_ptr, rq_s_ptr, rq_z_ptr, res_ptr, stride_rm, HAS_BIAS, GELU, REQUANT, RQ_QMAX,
                              RQ_OFFSET, RQ_PER_COL, W_CENTERED, HAS_RES)


@triton.jit
def _epilogue(acc, rowsum, offs_m, n0, WIDTH: tl.constexpr, M, N, K, out_ptr, stride_om, colsum_ptr, sa_ptr, za_ptr,
              sw_ptr, zw_ptr, bias_ptr, rq_s_ptr, rq_z_ptr, res_ptr, stride_rm, HAS_BIAS: tl.constexpr,
              GELU: tl.constexpr, REQUANT: tl.constexpr, RQ_QMAX: tl.constexpr, RQ_OFFSET: tl.constexpr,
              RQ_PER_COL: tl.constexpr, W_CENTERED: tl.constexpr, HAS_RES: tl.constexpr):
    """:func:`kernels._helpers.gemm_epilogue` of the ``WIDTH`` columns from ``n0``."""
    gemm_epilogue(acc, rowsum, offs_m, n0 + tl.arange(0, WIDTH), M, N, K, out_ptr, stride_om, colsum_ptr, sa_ptr,
                  za_ptr, sw_ptr, zw_ptr, bias_ptr, rq_s_ptr, rq_z_ptr, res_ptr, stride_rm, HAS_BIAS, GELU, REQUANT,
                  RQ_QMAX, RQ_OFFSET, RQ_PER_COL, W_CENTERED, HAS_RES)
