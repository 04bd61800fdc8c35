"""Monarch's CUDA kernel (numba.cuda): one token-tiled, register-tiled batched matrix product,
launched twice for the forward and three times for the backward, and its host launchers, the
only place that knows grid and block. The equations and the glossary:
kernels/monarch/__init__.py."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda

from minimodels.backend import cuda_simulated, launch
from minimodels.kernels._common import numpy_dtype

# =============================================================================================
# Constants
# =============================================================================================

# ((JB, TY, TX, RM, RN, BK), blocks per SM) by itemsize and by launch kind, on a GPU; in the
# simulator small tiles so that tiny tests cross every tile edge (kernel below). "flat": the
# groups' inputs and outputs are contiguous runs (x -> z, gz -> gx): one group per block, 128
# tokens x 64 outputs. "grouped": neighbouring groups are neighbouring numbers in memory (z -> y,
# g -> gz): 8 groups per block (4 in float64), so that every 32-byte sector is used whole. Both
# grids run groups first, so that the blocks in flight share whole cache lines.
# float32: an 8 x 8 register tile per thread; "grouped" walks c 4 at a time (at 8 its 24
# prefetch registers spill). Chosen by sweeps on an H100 (kernels/BENCHMARKS.md, rounds 3, 4).
CUDA_TILES = {4: {"flat": ((1, 16, 8, 8, 8, 8), 4), "grouped": ((8, 4, 8, 8, 8, 4), 2)},
              8: {"flat": ((1, 32, 8, 4, 8, 8), 2), "grouped": ((4, 8, 8, 4, 8, 8), 2)}}
SIMULATOR_TILES = {"flat": ((1, 4, 2, 2, 2, 4), 1), "grouped": ((2, 2, 2, 2, 2, 4), 1)}
VECTOR_BYTES = 16  # one shared-memory load of a thread: LDS.128


# =============================================================================================
# CUDA kernel (numba.cuda). Each factor of y = P2 · BD(w2) · P1 · BD(w1) · x is a batch of small
# matrix products, one per diagonal block ("group") g, over all tokens:
#     out[b, g, o] = Σ_c W[g, o, c] · in[b, g, c],
# where in and out are read and written through strides, so that the permutations cost nothing
# but addresses, and the weights come as wt[g, c, o] = W[g, o, c], contiguous (prepared by the
# launcher: 1 MB at n = 4096):
#     forward 1, z = BD(w1) x:              in = x[b, g·p + c],   wt = w1ᵀ, out = z[b, g·q + o];
#     forward 2, y = P2 BD(w2) P1 z:        in = z[b, c·l + g],   wt = w2ᵀ, out = y[b, o·l + g];
#     backward, gz = P1ᵀ BD(w2)ᵀ P2ᵀ g:    in = g[b, c·l + g],   wt = w2,  out = gz[b, o·l + g];
#     backward, gx = BD(w1)ᵀ gz:           in = gz[b, g·q + c],  wt = w1,  out = gx[b, g·p + o].
# The intermediate z goes through global memory: both factors in one block would need every
# token's whole z (16 KB at n = 4096) or, split by output block, would re-read x from L2 16 to
# 64 times (kernels/BENCHMARKS.md, round 2).
#
# A block owns BM = TY·RM tokens, JB consecutive groups and BN = TX·RN outputs of each; its
# TY × TX × JB threads are numbered tid = (ty·TX + tx)·JB + jj. Thread (jj, ty, tx) owns, in
# registers, the RM x RN tile of tokens ty·V + v + TY·V·m (runs of V = 16 bytes) and outputs
# tx + TX·b of group g0 + jj, and walks the reduction axis c BK at a time, like a SIMT SGEMM:
#   - stage the input chunk xs[jj, c, t] (tokens contiguous) and the weight chunk ws[jj, c, ·]
#     in shared memory; the next chunk's global loads are issued into registers before the
#     current chunk's products, so their latency hides behind the FMAs;
#   - per c, read RM inputs and RN weights as RM/V + RN/V 16-byte loads and do RM·RN FMAs.
# The weights of my outputs tx + TX·b sit next to each other in ws: output o = tx + TX·b is
# staged at (b // V)·TX·V + tx·V + b % V, so a thread reads them as 16-byte vectors while
# neighbouring threads still own neighbouring outputs: a warp's global stores of z (or of
# groups, in "grouped" launches) cover whole 32-byte sectors.
# Why it is fast: at the float32 tiles a thread does 64 FMAs per 4 shared loads (the former
# kernel: per 16, which saturated the shared-memory pipe at one load per 4 FMAs); a "flat"
# block reuses each weight for 256 tokens (weights cross L2 once per 256 tokens, not 32).
# Shared memory is free of bank conflicts: rows are padded so that a warp's 16-byte loads and
# the staging stores fall in distinct banks (the pads below). Every index is unsigned
# (np.uint64): Numba guards each signed index with a negative-index test
# (kernels/attention/cuda.py).
# =============================================================================================


def _tiles(itemsize: int, kind: str) -> tuple[tuple[int, ...], int]:
    return SIMULATOR_TILES[kind] if cuda_simulated() else CUDA_TILES[itemsize][kind]


def _pad(words: int, itemsize: int, V: int, target: int) -> int:
    """The least words >= ``words``, a multiple of V (rows stay 16-byte aligned), whose size in
    bytes is ``target`` modulo 128 (the 32 banks of 4 bytes)."""
    w = -(-words // V) * V
    while (w * itemsize) % 128 != target % 128:
        w += V
    return w


@functools.cache
def _bgemm_kernel(dtype: np.dtype, tiles: tuple[int, ...], blocks_per_sm: int = 2):
    """Compile-once (per dtype, tiles and launch bound) batched strided matrix product; returns
    (kernel, BM, JB, BN, threads)."""
    JB, TY, TX, RM, RN, BK = tiles
    NT, BM, BN = JB * TY * TX, TY * RM, TX * RN
    V = math.gcd(VECTOR_BYTES // dtype.itemsize, RM, RN)  # numbers per 16-byte run
    ok = (NT % (BK * JB) == 0 and BM % (NT // (BK * JB)) == 0
          and NT % (JB * BM) == 0 and BK % (NT // (JB * BM)) == 0 and NT % BN == 0
          and BK % (NT // BN) == 0)
    if not ok:
        raise ValueError(f"tiles (JB, TY, TX, RM, RN, BK) = {tiles}: need BK·JB, JB·BM and BN "
                         f"dividing the {NT} threads, BM a multiple of NT / (BK·JB), BK a "
                         f"multiple of NT / (JB·BM) and of NT / BN")
    TS = NT // (BK * JB)  # input staging along c: token rows one pass covers
    CS = NT // (JB * BM)  # input staging along the groups: c rows one pass covers
    IU = BM * BK * JB // NT  # input staging passes (either way)
    RP = NT // BN  # weight staging: c rows one pass covers
    WU = JB * BK // RP  # weight staging passes
    SX = _pad(BM, dtype.itemsize, V, 16)  # xs: words per c row; staging lanes (c, t) or (jj, t)
    SJX = _pad(BK * SX, dtype.itemsize, V, 16)  # xs: words per group, 16 bytes mod 128
    SW = _pad(BN, dtype.itemsize, V, 0)  # ws: words per c row
    SJW = _pad(BK * SW, dtype.itemsize, V, 16)  # ws: words per group, 16 bytes mod 128
    X_WORDS, W_WORDS = JB * SJX, JB * SJW
    ACC = (RM, RN)
    U = np.uint64
    zero = dtype.type(0)
    # registers bounded so that blocks_per_sm blocks share an SM (2: 16 warps at 256 threads)
    options = {} if cuda_simulated() else {"launch_bounds": (NT, blocks_per_sm)}

    @cuda.jit(**options)
    def kernel(inp, wt, out, batch, G, O, C, ir, ig, ic, orow, og, oo):
        # inp, wt, out: flat arrays; out[b·orow + g·og + o·oo] = Σ_c wt[(g·C + c)·O + o] ·
        # inp[b·ir + g·ig + c·ic] for b < batch, g < G, o < O, c < C.
        xs = cuda.shared.array(X_WORDS, dtype)  # xs[jj, c, t]: rows SX, groups SJX
        ws = cuda.shared.array(W_WORDS, dtype)  # ws[jj, c, ·]: rows SW, groups SJW
        acc = cuda.local.array(ACC, dtype)  # tokens ty·V + v + TY·V·m, outputs tx + TX·b
        xa = cuda.local.array(RM, dtype)
        wb = cuda.local.array(RN, dtype)
        xn = cuda.local.array(IU, dtype)  # the next chunk, loaded while this one is used
        wn = cuda.local.array(WU, dtype)
        tid = U(cuda.threadIdx.x)
        jj, tx, ty = tid % U(JB), (tid // U(JB)) % U(TX), tid // U(JB * TX)
        # a 1-D grid, groups first: blocks that run at the same time share token rows, so
        # their 32-byte runs of neighbouring groups ("grouped") fill whole cache lines
        nbt, nbg = (U(batch) + U(BM - 1)) // U(BM), (U(G) + U(JB - 1)) // U(JB)
        bid = U(cuda.blockIdx.x)
        gb, tb = bid % nbg, (bid // nbg) % nbt
        b0, g0, o0 = tb * U(BM), gb * U(JB), bid // (nbt * nbg) * U(BN)
        uB, uG, uO, uC = U(batch), U(G), U(O), U(C)
        interior = b0 + U(BM) <= uB and g0 + U(JB) <= uG and o0 + U(BN) <= uO  # no edge
        uir, uig, uic = U(ir), U(ig), U(ic)
        # input staging: I copy (t_i + dt·u, c_i + dc·u, j_i) of each chunk, u < IU; lanes run
        # along c (then tokens) when c is contiguous in memory, else along the groups, then
        # tokens: either way a warp's stores land in distinct banks
        if ic == 1:
            c_i, j_i, t_i = tid % U(BK), (tid // U(BK)) % U(JB), tid // U(BK * JB)
            dt, dc = U(TS), U(0)
        else:
            j_i, t_i, c_i = tid % U(JB), (tid // U(JB)) % U(BM), tid // U(JB * BM)
            dt, dc = U(0), U(CS)
        i_src = (b0 + t_i) * uir + (g0 + j_i) * uig + c_i * uic  # + c1·ic + u·i_step
        i_step = dt * uir + dc * uic
        i_dst = j_i * U(SJX) + c_i * U(SX) + t_i  # + u·i_dstep
        i_dstep = dc * U(SX) + dt
        i_group = g0 + j_i < uG
        # weight staging: I copy output o_w of rows r_w + RP·u (row r = jj·BK + c), u < WU,
        # from wt[g0 + jj, c1 + c, o0 + o_w], into its place among my outputs' neighbours
        o_w, r_w = tid % U(BN), tid // U(BN)
        nb = o_w // U(TX)
        w_src = g0 * uC * uO + r_w * uO + o0 + o_w  # + c1·O + jj·C·O + c·O (u)
        w_dst = r_w * U(SW) + (nb // U(V)) * U(TX * V) + (o_w % U(TX)) * U(V) + nb % U(V)
        # my reads of the staged chunk
        x_rd = jj * U(SJX) + ty * U(V)  # + c·SX + m·TY·V + v
        w_rd = jj * U(SJW) + tx * U(V)  # + c·SW + (b // V)·TX·V + b % V
        for a in range(RM):
            for b in range(RN):
                acc[a, b] = zero
        for c1 in range(0, C + BK, BK):  # load chunk c1 while multiplying chunk c0 = c1 - BK
            if c1 > 0:
                cuda.syncthreads()  # everyone is done reading the chunk before c0
                for u in range(IU):
                    xs[i_dst + U(u) * i_dstep] = xn[u]
                for u in range(WU):
                    r = u * RP
                    ws[w_dst + U(r * SW + (r // BK) * (SJW - BK * SW))] = wn[u]
                cuda.syncthreads()
            uc1 = U(c1)
            if uc1 + U(BK) <= uC and interior:  # into registers, in flight during the FMAs below
                for u in range(IU):
                    xn[u] = inp[i_src + uc1 * uic + U(u) * i_step]
                for u in range(WU):
                    r = u * RP
                    wn[u] = wt[w_src + (uc1 + U(r % BK)) * uO + U(r // BK) * uC * uO]
            elif uc1 < uC:  # the same, zero past the edges (the last c chunk, edge blocks)
                for u in range(IU):
                    ok = (i_group and uc1 + c_i + dc * U(u) < uC
                          and b0 + t_i + dt * U(u) < uB)
                    xn[u] = inp[i_src + uc1 * uic + U(u) * i_step] if ok else zero
                for u in range(WU):
                    r = u * RP
                    ok = (g0 + U(r // BK) < uG and uc1 + r_w + U(r % BK) < uC
                          and o0 + o_w < uO)
                    wn[u] = (wt[w_src + (uc1 + U(r % BK)) * uO + U(r // BK) * uC * uO]
                             if ok else zero)
            # [core] monarch_cuda
            if c1 > 0:  # the register tile: tokens ty·V + v + TY·V·m, outputs tx + TX·b
                for c in range(BK):  # (RM + RN) / V shared loads of 16 bytes, RM·RN FMAs
                    for a in range(RM):  # xs[jj, c, t]: my RM tokens, V at a time
                        xa[a] = xs[x_rd + U(c * SX + (a // V) * TY * V + a % V)]
                    for b in range(RN):  # ws[jj, c, ·]: the weights of my RN outputs
                        wb[b] = ws[w_rd + U(c * SW + (b // V) * TX * V + b % V)]
                    for a in range(RM):
                        for b in range(RN):
                            acc[a, b] += xa[a] * wb[b]
            # [/core]
        g = g0 + jj
        if g < uG:
            for a in range(RM):
                t = b0 + ty * U(V) + U(a % V + (a // V) * TY * V)
                if t < uB:
                    for b in range(RN):
                        o = o0 + tx + U(b * TX)
                        if o < uO:
                            out[t * U(orow) + g * U(og) + o * U(oo)] = acc[a, b]

    return kernel, BM, JB, BN, NT


def _bgemm(inp, wt, out, sizes, in_strides, out_strides):
    """out[b, g, o] = Σ_c wt[g, c, o] in[b, g, c] through strides (in numbers) on flat views of
    contiguous tensors; wt (G, C, O) contiguous; sizes = (tokens, G, O, C), each stride triple
    (token, group, c or o)."""
    batch, G, O, C = sizes
    if batch == 0 or G == 0 or O == 0:  # nothing to write (a grid cannot have 0 blocks)
        return
    # "grouped" when neighbouring groups are neighbouring numbers of the input or the output
    kind = "grouped" if G > 1 and 1 in (in_strides[1], out_strides[1]) else "flat"
    tiles, blocks_per_sm = _tiles(inp.element_size(), kind)
    kernel, BM, JB, BN, threads = _bgemm_kernel(numpy_dtype(inp.dtype), tiles, blocks_per_sm)
    grid = -(-batch // BM) * -(-G // JB) * -(-O // BN)
    launch(kernel, grid, threads, inp.view(-1), wt.view(-1), out.view(-1), batch, G, O, C,
           *in_strides, *out_strides)


def _fwd_cuda(x, w1, w2, y=None):
    """x (b, n), w1 (k, q, p), w2 (l, s, r) contiguous -> y (b, l·s), written into ``y`` when
    given: z = BD(w1) x into global memory, then y = P2 BD(w2) P1 z."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    b = x.shape[0]
    y = x.new_empty(b, l * s) if y is None else y
    if b:
        z = x.new_empty(b, k * q)
        w1t, w2t = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
        _bgemm(x, w1t, z, (b, k, q, p), (k * p, p, 1), (k * q, q, 1))
        _bgemm(z, w2t, y, (b, l, s, r), (k * q, 1, l), (l * s, 1, l))
    return y


def _bwd_cuda(x, g, w1, w2):
    """-> gx (b, n), z (b, k·q), gz (b, k·q); see ``cpu._monarch_bwd_loop``."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    b = x.shape[0]
    gx = torch.empty_like(x)
    z, gz = x.new_empty(b, k * q), x.new_empty(b, k * q)
    if b:
        _bgemm(x, w1.transpose(1, 2).contiguous(), z, (b, k, q, p), (k * p, p, 1),
               (k * q, q, 1))
        _bgemm(g, w2, gz, (b, l, r, s), (l * s, 1, l), (k * q, 1, l))
        _bgemm(gz, w1, gx, (b, k, p, q), (k * q, q, 1), (k * p, p, 1))
    return gx, z, gz
