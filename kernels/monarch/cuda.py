"""Monarch's CUDA kernel (numba.cuda): one token-tiled, register-tiled batched matrix product,
launched twice for the forward and three times for the backward, and its host launchers, the
only place that knows grid and block. The equations and the glossary:
kernels/monarch/__init__.py."""

from __future__ import annotations

import functools

import numpy as np
import torch
from numba import cuda

from minimodels.backend import cuda_simulated, launch
from minimodels.kernels._common import numpy_dtype

# =============================================================================================
# Constants
# =============================================================================================

# (JB, TY, TX, RM, RN, BK) by itemsize on a GPU, in the simulator small tiles so that tiny tests
# cross every tile edge (kernel below). float32: 256 threads, 32 tokens x 8 groups x 64 outputs
# per block, an 8 x 8 register tile per thread. NOT yet measured on a GPU (kernels/BENCHMARKS.md).
CUDA_TILES = {4: (8, 4, 8, 8, 8, 8), 8: (4, 8, 8, 4, 8, 8)}
SIMULATOR_TILES = (2, 2, 2, 2, 2, 4)


# =============================================================================================
# CUDA kernel (numba.cuda). Each factor of y = P2 · BD(w2) · P1 · BD(w1) · x is a batch of small
# matrix products, one per diagonal block ("group") g, over all tokens:
#     out[b, g, o] = Σ_c W[g, o, c] · in[b, g, c],
# where in, W and out are read and written through strides, so that the permutations cost
# nothing but addresses:
#     forward 1, z = BD(w1) x:              in = x[b, g·p + c],   W = w1,  out = z[b, g·q + o];
#     forward 2, y = P2 BD(w2) P1 z:        in = z[b, c·l + g],   W = w2,  out = y[b, o·l + g];
#     backward, gz = P1ᵀ BD(w2)ᵀ P2ᵀ g:    in = g[b, c·l + g],   W = w2ᵀ, out = gz[b, o·l + g];
#     backward, gx = BD(w1)ᵀ gz:           in = gz[b, g·q + c],  W = w1ᵀ, out = gx[b, g·p + o]
# (W = w2ᵀ means W[g, o, c] = w2[g, c, o]: strides, not a copy). The intermediate z goes
# through global memory: 16 KB per token at n = 4096 does not fit a block's shared memory for
# more than 2 tokens, and 2 x 64 MB of extra traffic cost ~0.03 ms.
#
# A block owns BM = TY·RM tokens, JB consecutive groups and BN = TX·RN outputs of each; its
# TY × TX × JB threads are numbered tid = (ty·TX + tx)·JB + jj. Thread (jj, ty, tx) owns, in
# registers, the RM x RN tile of tokens ty + TY·a and outputs tx + TX·b of group g0 + jj, and
# walks the reduction axis c BK at a time, like a SIMT SGEMM:
#   - stage the input chunk xs[t, c, jj] (BM·BK·JB numbers) and the weight chunk ws[jj, c, o]
#     (JB·BK·BN) in shared memory; the next chunk's global loads are issued into registers
#     before the current chunk's products, so their latency hides behind the FMAs;
#   - per c, read RM inputs and RN weights from shared memory and do RM·RN FMAs.
# Why it is fast: at the float32 tiles a thread does 64 FMAs per 16 shared reads, every weight
# fetched from L2 serves 32 tokens (the former one-block-per-token kernel: 1 token) and every
# input number 64 outputs; 2 blocks of 256 threads fit an SM (124 registers, 25 KB of shared).
# Why JB groups per block: in forward 2 (and the backward's gz) neighbouring groups are
# neighbouring numbers in memory (z[b, c·l + g], y[b, o·l + g]): one group alone would read and
# write one 4-byte word per 32-byte sector. With lanes running over 8 groups, every sector read
# or written is used whole. The staging order follows whichever axis is contiguous in memory
# (c for x and gz, the groups for z and g; c or o for the weights), chosen per launch from the
# strides: each thread keeps a fixed offset and adds a fixed step per pass (no div/mod).
# Shared reads are free of bank conflicts: a warp (float32 tiles) is 8 groups x 4 tx of one
# ty, reading 8 consecutive inputs (broadcast over tx) and 32 weights in 32 banks (a group's
# slice of ws is padded to SJ ≡ 4 words mod 32). Every index is unsigned (np.uint64): Numba
# guards each signed index with a negative-index test (kernels/attention/cuda.py).
# =============================================================================================


def _tiles(itemsize: int) -> tuple[int, ...]:
    return SIMULATOR_TILES if cuda_simulated() else CUDA_TILES[itemsize]


@functools.cache
def _bgemm_kernel(dtype: np.dtype, tiles: tuple[int, ...]):
    """Compile-once (per dtype and tiles) batched strided matrix product; returns (kernel, BM,
    JB, BN, threads)."""
    JB, TY, TX, RM, RN, BK = tiles
    NT, BM, BN = JB * TY * TX, TY * RM, TX * RN
    if NT % (BK * JB) or BM % (NT // max(BK * JB, 1)) or NT % BK or NT % BN or (BN * BK) % NT:
        raise ValueError(f"tiles (JB, TY, TX, RM, RN, BK) = {tiles}: need BK·JB and BK and BN "
                         f"dividing the {NT} threads, BM a multiple of NT / (BK·JB), and NT "
                         f"dividing BN·BK")
    TS = NT // (BK * JB)  # token rows one input staging pass covers
    IU = BM // TS  # input staging passes
    A = BN * BK // NT  # weight staging passes per group
    WU = JB * A  # weight staging passes
    SC = BN + 4  # ws: words per c row (c-fast staging: lanes c, o land in distinct banks)
    SJ = BK * SC + 4  # ws: words per group, ≡ 4 mod 32 at the GPU tiles (see above)
    X_WORDS, W_WORDS = BM * BK * JB, JB * SJ
    ACC = (RM, RN)
    U = np.uint64
    zero = dtype.type(0)
    # at most 128 registers, so that 2 blocks (16 warps) share an SM (ptxas: 124 for float32,
    # 127 for float64, no spills; 128 and 145 without the bound)
    options = {} if cuda_simulated() else {"launch_bounds": (NT, 2)}

    @cuda.jit(**options)
    def kernel(inp, w, out, batch, G, O, C, ir, ig, ic, wg, wo, wc, orow, og, oo):
        # inp, w, out: flat arrays; out[b·orow + g·og + o·oo] = Σ_c w[g·wg + o·wo + c·wc] ·
        # inp[b·ir + g·ig + c·ic] for b < batch, g < G, o < O, c < C.
        xs = cuda.shared.array(X_WORDS, dtype)  # xs[t, c, jj]
        ws = cuda.shared.array(W_WORDS, dtype)  # ws[jj, c, o], rows padded (SC, SJ)
        acc = cuda.local.array(ACC, dtype)  # tokens ty + TY·a, outputs tx + TX·b of group g0 + jj
        xa = cuda.local.array(RM, dtype)
        wb = cuda.local.array(RN, dtype)
        xn = cuda.local.array(IU, dtype)  # the next chunk, loaded while this one is used
        wn = cuda.local.array(WU, dtype)
        tid = U(cuda.threadIdx.x)
        jj, tx, ty = tid % U(JB), (tid // U(JB)) % U(TX), tid // U(JB * TX)
        b0, g0, o0 = (U(cuda.blockIdx.x) * U(BM), U(cuda.blockIdx.y) * U(JB),
                      U(cuda.blockIdx.z) * U(BN))
        uB, uG, uO, uC = U(batch), U(G), U(O), U(C)
        interior = b0 + U(BM) <= uB and g0 + U(JB) <= uG and o0 + U(BN) <= uO  # no edge
        uir, uig, uic, uwg, uwo, uwc = U(ir), U(ig), U(ic), U(wg), U(wo), U(wc)
        # input staging: I copy (t_i + TS·u, c_i, j_i) of each chunk, u < IU; lanes run along
        # whichever of c and the groups is contiguous in memory
        if ic == 1:
            c_i, j_i = tid % U(BK), (tid // U(BK)) % U(JB)
        else:
            j_i, c_i = tid % U(JB), (tid // U(JB)) % U(BK)
        t_i = tid // U(BK * JB)
        i_src = (b0 + t_i) * uir + (g0 + j_i) * uig + c_i * uic  # + c1·ic + u·TS·ir
        i_dst = (t_i * U(BK) + c_i) * U(JB) + j_i  # + u·TS·BK·JB
        i_step = U(TS) * uir
        i_group = g0 + j_i < uG
        # weight staging: I copy (group u // A, c_w + dc·(u % A), o_w + do·(u % A)), u < WU;
        # lanes run along c or o, whichever is contiguous in memory
        if wc == 1:
            c_w, o_w, dc, do = tid % U(BK), tid // U(BK), U(0), U(NT // BK)
        else:
            o_w, c_w, dc, do = tid % U(BN), tid // U(BN), U(NT // BN), U(0)
        w_src = g0 * uwg + (o0 + o_w) * uwo + c_w * uwc  # + c1·wc + group·wg + (u % A)·w_step
        w_dst = c_w * U(SC) + o_w
        w_step, w_dstep = dc * uwc + do * uwo, dc * U(SC) + do
        # my reads of the staged chunk
        x_rd = ty * U(BK * JB) + jj  # + a·TY·BK·JB + c·JB
        w_rd = jj * U(SJ) + tx  # + c·SC + b·TX
        for a in range(RM):
            for b in range(RN):
                acc[a, b] = zero
        for c1 in range(0, C + BK, BK):  # load chunk c1 while multiplying chunk c0 = c1 - BK
            if c1 > 0:
                cuda.syncthreads()  # everyone is done reading the chunk before c0
                for u in range(IU):
                    xs[i_dst + U(u * TS * BK * JB)] = xn[u]
                for u in range(WU):
                    ws[w_dst + U((u // A) * SJ) + U(u % A) * w_dstep] = wn[u]
                cuda.syncthreads()
            uc1 = U(c1)
            if uc1 + U(BK) <= uC and interior:  # into registers, in flight during the FMAs below
                for u in range(IU):
                    xn[u] = inp[i_src + uc1 * uic + U(u) * i_step]
                for u in range(WU):
                    wn[u] = w[w_src + uc1 * uwc + U(u // A) * uwg + U(u % A) * w_step]
            elif uc1 < uC:  # the same, zero past the edges (the last c chunk, edge blocks)
                for u in range(IU):
                    ok = i_group and uc1 + c_i < uC and b0 + t_i + U(u * TS) < uB
                    xn[u] = inp[i_src + uc1 * uic + U(u) * i_step] if ok else zero
                for u in range(WU):
                    ok = (g0 + U(u // A) < uG and uc1 + c_w + dc * U(u % A) < uC
                          and o0 + o_w + do * U(u % A) < uO)
                    wn[u] = (w[w_src + uc1 * uwc + U(u // A) * uwg + U(u % A) * w_step]
                             if ok else zero)
            # [core] monarch_cuda
            if c1 > 0:  # the register tile: tokens ty + TY·a, outputs tx + TX·b of group g0 + jj
                for c in range(BK):  # RM + RN shared reads, RM·RN FMAs
                    uc = U(c)
                    for a in range(RM):  # xs[t, c, jj]: the inputs of my RM tokens
                        xa[a] = xs[x_rd + uc * U(JB) + U(a * TY * BK * JB)]
                    for b in range(RN):  # ws[jj, c, o]: the weights of my RN outputs
                        wb[b] = ws[w_rd + uc * U(SC) + U(b * TX)]
                    for a in range(RM):
                        for b in range(RN):
                            acc[a, b] += xa[a] * wb[b]
            # [/core]
        g = g0 + jj
        if g < uG:
            for a in range(RM):
                t = b0 + ty + U(a * TY)
                if t < uB:
                    for b in range(RN):
                        o = o0 + tx + U(b * TX)
                        if o < uO:
                            out[t * U(orow) + g * U(og) + o * U(oo)] = acc[a, b]

    return kernel, BM, JB, BN, NT


def _bgemm(inp, w, out, sizes, in_strides, w_strides, out_strides):
    """out[b, g, o] = Σ_c W[g, o, c] in[b, g, c] through strides (in numbers) on flat views of
    contiguous tensors; sizes = (tokens, G, O, C), each stride triple (token or group, group or
    output, c)."""
    batch, G, O, C = sizes
    if batch == 0 or G == 0 or O == 0:  # nothing to write (a grid cannot have 0 blocks)
        return
    kernel, BM, JB, BN, threads = _bgemm_kernel(numpy_dtype(inp.dtype),
                                                _tiles(inp.element_size()))
    grid = (-(-batch // BM), -(-G // JB), -(-O // BN))
    launch(kernel, grid, threads, inp.view(-1), w.view(-1), out.view(-1), batch, G, O, C,
           *in_strides, *w_strides, *out_strides)


def _fwd_cuda(x, w1, w2, y=None):
    """x (b, n), w1 (k, q, p), w2 (l, s, r) contiguous -> y (b, l·s), written into ``y`` when
    given: z = BD(w1) x into global memory, then y = P2 BD(w2) P1 z."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    b = x.shape[0]
    y = x.new_empty(b, l * s) if y is None else y
    if b:
        z = x.new_empty(b, k * q)
        _bgemm(x, w1, z, (b, k, q, p), (k * p, p, 1), (q * p, p, 1), (k * q, q, 1))
        _bgemm(z, w2, y, (b, l, s, r), (k * q, 1, l), (s * r, r, 1), (l * s, 1, l))
    return y


def _bwd_cuda(x, g, w1, w2):
    """-> gx (b, n), z (b, k·q), gz (b, k·q); see ``cpu._monarch_bwd_loop``."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    b = x.shape[0]
    gx = torch.empty_like(x)
    z, gz = x.new_empty(b, k * q), x.new_empty(b, k * q)
    if b:
        _bgemm(x, w1, z, (b, k, q, p), (k * p, p, 1), (q * p, p, 1), (k * q, q, 1))
        _bgemm(g, w2, gz, (b, l, r, s), (l * s, 1, l), (s * r, 1, r), (k * q, 1, l))
        _bgemm(gz, w1, gx, (b, k, p, q), (k * q, q, 1), (q * p, 1, p), (k * p, p, 1))
    return gx, z, gz
