"""Monarch's CUDA kernels (numba.cuda): one token-tiled batched matrix product, launched twice
for the forward and three times for the backward, in two forms: on tensor cores for float32
(sm_80 and later: mma.sync on TF32 pieces, "3xTF32", which keeps float32's accuracy; on sm_90
the warpgroup instruction wgmma for the launches where it is faster) and register-tiled on the
CUDA cores for float64 (and float32 on older GPUs); the float32 forward
fused in one launch in thread-block clusters (sm_90; slower on an H100, so only when forced);
and their host launchers, the only place that knows grid and block. The equations and the
glossary: kernels/monarch/__init__.py."""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch
from numba import cuda

from minimodels.backend import cuda_simulated, launch
from minimodels.kernels._common import (
    cluster_load,
    cluster_sync,
    fence_proxy_async,
    mma_tf32,
    numpy_dtype,
    tf32_split,
    wgmma_tf32x3,
)

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
# The tensor-core kernel's ((JB, WM, MT, NN, CK), blocks per SM) by launch kind: JB groups x
# WM warps per block, each warp 16·MT tokens x 8·NN outputs of one group, c in chunks of CK. On
# a GPU each warp 32 tokens x 64 outputs (64 float32 sums a thread); "flat": one group, 4 warps
# (128 tokens, so the weights cross L2 once per 128 tokens), chunks of 16, 4 blocks an SM;
# "grouped": 8 groups (32-byte runs of neighbouring groups), one warp each, chunks of 8. The
# best of the shapes and staging schemes swept on an H100 (kernels/BENCHMARKS.md, rounds 5, 6
# and 8); in the simulator 2 warps, 16 tokens x 16 outputs, so that tiny tests cross every edge.
MMA_TILES = {"flat": ((1, 4, 2, 8, 16), 4), "grouped": ((8, 1, 2, 8, 8), 2)}
SIMULATOR_MMA_TILES = ((2, 1, 1, 2, 8), 1)
# The same tiles for wgmma (sm_90), where it is faster: WM a multiple of 4, a warpgroup of 4
# warps on one group, 64 tokens a tile; "flat": one warpgroup, 128 tokens (two tiles) x 64
# outputs, chunks of 32, 3 blocks an SM; "grouped": None, its launches stay on mma.sync (8
# groups need 8 warpgroups a block, and were slower: kernels/BENCHMARKS.md, round 11). In the
# simulator one warpgroup, 64 tokens x 16 outputs, for both kinds.
WGMMA_TILES = {"flat": ((1, 4, 2, 8, 32), 3), "grouped": None}
SIMULATOR_WGMMA_TILES = ((1, 4, 1, 2, 8), 1)
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


def _mma_tiles(kind: str) -> tuple[tuple[int, ...], int]:
    return SIMULATOR_MMA_TILES if cuda_simulated() else MMA_TILES[kind]


def _wgmma_tiles(kind: str) -> tuple[tuple[int, ...], int] | None:
    return SIMULATOR_WGMMA_TILES if cuda_simulated() else WGMMA_TILES[kind]


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


# =============================================================================================
# CUDA kernel on tensor cores (sm_80 and later), float32: the same batched product
#     out[b, g, o] = Σ_c W[g, o, c] · in[b, g, c]
# with each warp's tile multiplied by mma.sync (m16n8k8, TF32 inputs, float32 sums) in the
# "3xTF32" form that keeps float32's accuracy (kernels/_common.py): a·b ≈ a_big·b_big +
# a_big·b_small + a_small·b_big. Why: the SIMT kernel above runs both launches at ~40% of the
# FMA rate and ~55% of the copy bandwidth at once (kernels/BENCHMARKS.md, rounds 3 and 4), and
# two float32 passes cannot go under 0.51 ms on the FMA units; on tensor cores the products are
# cheap and the memory traffic is what is left (round 5).
#
# A block owns BM = 16·MT·WM tokens, JB consecutive groups and BN = 8·NN outputs, and walks c in
# chunks of CK; per chunk:
#   - the inputs are staged in shared memory as element (t, j, c) at t·ST + j·SJ + c·SC, in the
#     order of the global layout (c fastest for "flat" inputs, the groups fastest for "grouped"
#     ones, whose runs of JB neighbouring groups fill 32-byte sectors), and the chunk's B
#     fragments beside them: the launcher packed the weights in exactly that order
#     (``_pack_mma``), zero-padded, so their copy is a straight, unguarded one; the next
#     chunk's inputs and fragments are loaded into registers while this chunk is multiplied;
#   - warp w multiplies group jj = w % JB for tokens 16·MT·(w // JB) + [0, 16·MT): per k-step
#     of 8 c, its A fragments come from the staged inputs (the pads put the 32 lanes' loads in
#     32 banks), its B fragments from the staged weights (already split into TF32 parts as they
#     were staged when WM > 1 warps share them: once a block, not once a warp).
# The float32 sums (MT x NN tiles of 16 x 8 a warp) go out through shared memory, CK outputs a
# pass, in the global layout's order again; passes alternate between the input and the weight
# regions (one barrier a pass), and a block without an edge stores unguarded. The 3xTF32 pieces
# come from ``tf32_split`` (integer rounding, 3 instructions; kernels/BENCHMARKS.md, round 8).
# On sm_90 (``wg``) the product is the warpgroup's wgmma instead (kernels/_common.py): warps
# 4i..4i+3 form warpgroup i, on group i % JB, each warp holding 16 rows of every 64-token tile;
# the chunk's B is staged split, in wgmma's canonical layout (``_pack_mma(..., wg=True)``),
# each thread fencing its stores for the tensor cores' async reads before the barrier, in
# dynamic shared memory (16-byte aligned, as the descriptors need). It is faster for the flat
# launches and slower for the grouped ones, whose 8 groups make 8 warpgroups a block
# (kernels/BENCHMARKS.md, round 11), so WGMMA_TILES has tiles for the flat ones only.
# =============================================================================================


@functools.cache
def _a_fragments(MT: int, MS: int, ST: int, SC: int):
    """Device function a_fragments(xs, a, af): my lane's A pieces of one k-step for each of my
    MT tiles (rows r, r + 8; columns k, k + 4: mma_tf32's layout, which wgmma's A shares),
    tile m's element (t, c) at a + (m·MS + t)·ST + c·SC in the staged inputs xs, split into
    af[m] (big 0-3, small 4-7)."""
    U = np.uint64

    @cuda.jit(device=True, **({} if cuda_simulated() else {"forceinline": True}))
    def a_fragments(xs, a, af):
        for m in range(MT):
            am = a + U(m * MS * ST)
            af[m, 0] = xs[am]
            af[m, 1] = xs[am + U(8 * ST)]
            af[m, 2] = xs[am + U(4 * SC)]
            af[m, 3] = xs[am + U(8 * ST + 4 * SC)]
            for i in range(4):
                af[m, i], af[m, i + 4] = tf32_split(af[m, i])

    return a_fragments


@functools.cache
def _chunk_product(MT: int, NN: int, KS: int, ST: int, SC: int, SPLIT: int = 0):
    """Device function chunk_product(xs, ws, x_rd, w_rd, acc, af): a warp's acc[m, n] (C
    fragments of MT x NN tiles of 16 x 8) += the staged chunk's A fragments (16 tokens x 8 c a
    k-step, element (t, c) at x_rd + t·ST + c·SC) times its B fragments (ws, from w_rd, 64 words
    a tile and k-step), KS k-steps, in 3xTF32; af: scratch for one k-step's A pieces. SPLIT > 0:
    the B fragments were staged already split, their TF32 parts at w_rd + ..., the remainders
    SPLIT words further (when several warps share them, splitting once per block saves work)."""
    U = np.uint64
    a_fragments = _a_fragments(MT, 16, ST, SC)

    @cuda.jit(device=True, **({} if cuda_simulated() else {"forceinline": True}))
    def chunk_product(xs, ws, x_rd, w_rd, acc, af):
        # [core] monarch_mma
        for kk in range(KS):
            a_fragments(xs, x_rd + U(kk * 8 * SC), af)  # A: rows r, r + 8; columns k, k + 4
            for n in range(NN):  # B: rows k, k + 4, column r of output tile n
                wi = w_rd + U((kk * NN + n) * 64)
                if SPLIT:
                    bb0, bb1 = ws[wi], ws[wi + U(1)]
                    bs0, bs1 = ws[wi + U(SPLIT)], ws[wi + U(SPLIT + 1)]
                else:
                    bb0, bs0 = tf32_split(ws[wi])
                    bb1, bs1 = tf32_split(ws[wi + U(1)])
                for m in range(MT):  # small terms first, then big·big
                    d = mma_tf32(af[m, 4], af[m, 5], af[m, 6], af[m, 7], bb0, bb1,
                                 acc[m, n, 0], acc[m, n, 1], acc[m, n, 2], acc[m, n, 3])
                    d = mma_tf32(af[m, 0], af[m, 1], af[m, 2], af[m, 3], bs0, bs1,
                                 d[0], d[1], d[2], d[3])
                    d = mma_tf32(af[m, 0], af[m, 1], af[m, 2], af[m, 3], bb0, bb1,
                                 d[0], d[1], d[2], d[3])
                    for i in range(4):
                        acc[m, n, i] = d[i]
        # [/core]

    return chunk_product


@functools.cache
def _chunk_product_wg(MT: int, NN: int, KS: int, ST: int, SC: int, SPLIT: int):
    """Device function chunk_product(xs, ws, x_rd, w_rd, acc, af): as ``_chunk_product``, for a
    warpgroup on sm_90: per k-step, each warp's A pieces of its 16 rows of each 64-token tile
    (element (t, c) at x_rd + t·ST + c·SC; tile m at 64·m rows), and one wgmma_tf32x3 over the
    staged B (TF32 parts at w_rd, remainders SPLIT words further, NN·64 words a k-step)."""
    U = np.uint64
    product = wgmma_tf32x3(MT, NN)
    a_fragments = _a_fragments(MT, 64, ST, SC)

    @cuda.jit(device=True, **({} if cuda_simulated() else {"forceinline": True}))
    def chunk_product(xs, ws, x_rd, w_rd, acc, af):
        # [core] monarch_wgmma
        for kk in range(KS):
            a_fragments(xs, x_rd + U(kk * 8 * SC), af)  # rows r, r + 8 of my warp's 16
            wi = w_rd + U(kk * NN * 64)
            product(acc, af, ws, wi, wi + U(SPLIT))
        # [/core]

    return chunk_product


@functools.cache
def _mma_kernel(tiles: tuple[int, ...], blocks_per_sm: int, in_grouped: bool,
                out_grouped: bool, wg: bool = False):
    """Compile-once float32 batched product on tensor cores, by mma.sync or (``wg``, sm_90) by
    wgmma; returns (kernel, BM, JB, BN, CK, threads, dynamic shared bytes)."""
    JB, WM, MT, NN, CK = tiles
    NT, BM, BN, KS = 32 * JB * WM, 16 * MT * WM, 8 * NN, CK // 8
    if CK % 8 or BN % CK or NT % (JB * CK) or BM % (NT // (JB * CK) or 1):
        raise ValueError(f"mma tiles (JB, WM, MT, NN, CK) = {tiles}: need CK a multiple of 8 "
                         f"dividing 8·NN, and JB·CK dividing the {NT} threads into staging "
                         f"passes of whole token rows")
    if wg and (WM % 4 or NN > 32):
        raise ValueError(f"wgmma tiles (JB, WM, MT, NN, CK) = {tiles}: need WM a multiple of 4 "
                         f"(warpgroups of 4 warps on one group) and 8·NN <= 256 outputs")
    TS = NT // (JB * CK)  # token rows one staging pass covers (inputs, and CK outputs)
    IU = BM // TS  # staging passes
    W_WORDS = JB * KS * NN * 64  # a chunk of B fragments, (jj, kk, n, lane, 2) or (wg) B's
    # canonical layout (jj, kk, n, h, r, t): B[k = 4h + t, o = 8n + r] (kernels/_common.py)
    WU = -(-W_WORDS // NT)  # its staging passes
    # WM > 1 warps share a group's weights: split them into TF32 parts and remainders once, as
    # they are staged (the remainders W_WORDS further), not once per warp in the product
    SPLIT = W_WORDS if WM > 1 or wg else 0
    WS_WORDS = W_WORDS + SPLIT
    # shared layouts: input (t, j, c) at t·ST + j·SJ + c·SC, output (t, j, o) at t·SO + j·SJO +
    # o·SOO; ST ≡ 4 mod 8 ("flat") or odd ("grouped") puts a warp's A fragment in 32 banks
    SJ, SC, ST = (1, JB, JB * CK + 1) if in_grouped else (CK, 1, JB * CK + 4)
    SJO, SOO, SO = (1, JB, JB * CK + 1) if out_grouped else (CK, 1, JB * CK + 4)
    # shared memory: the input chunk at 0 (WB words), the weights' chunk from WB; later output
    # passes alternate between the two regions, so that a pass needs one barrier, not two
    WB = BM * max(ST, SO)
    WORDS = WB + max(WS_WORDS, BM * SO)
    f32 = np.float32
    U = np.uint64
    options = {} if cuda_simulated() else {"launch_bounds": (NT, blocks_per_sm)}
    chunk_product = (_chunk_product_wg if wg else _chunk_product)(MT, NN, KS, ST, SC, SPLIT)
    # wgmma on a GPU: dynamic shared memory (16-byte aligned, as B's descriptors need; and past
    # 48 KB where the tiles want it)
    DYNAMIC = wg and not cuda_simulated()
    SM_WORDS = 0 if DYNAMIC else WORDS
    MS = 64 if wg else 16  # tokens between a warp's tiles m and m + 1

    @cuda.jit(**options)
    def kernel(inp, wp, out, batch, G, O, C, CB, ir, ig, ic, orow, og, oo):
        # out[b·orow + g·og + o·oo] = Σ_c W[g, o, c] · inp[b·ir + g·ig + c·ic]; wp: W packed by
        # _pack_mma, CB chunks per (group block, output block), each W_WORDS long
        sm = cuda.shared.array(SM_WORDS, f32)  # this chunk's inputs, then its B fragments
        acc = cuda.local.array((MT, NN, 4), f32)  # C fragments of my MT x NN tiles
        af = cuda.local.array((MT, 8), f32)  # A fragments of one k-step: big 0-3, small 4-7
        xn = cuda.local.array(IU, f32)  # the next chunk, loaded while this one is multiplied
        wn = cuda.local.array(WU, f32)  # the next chunk's B fragments
        tid = U(cuda.threadIdx.x)
        lane, w = tid % U(32), tid // U(32)
        if wg:  # warpgroup w // 4 on group jj, its warp w % 4 on 16 rows of each 64-token tile
            jj = (w // U(4)) % U(JB)
            row0 = (w // U(4 * JB)) * U(64 * MT) + (w % U(4)) * U(16)
        else:  # warp w on group jj, 16·MT consecutive tokens
            jj = w % U(JB)
            row0 = (w // U(JB)) * U(16 * MT)
        r, k = lane // U(4), lane % U(4)
        nbt, nbg = (U(batch) + U(BM - 1)) // U(BM), (U(G) + U(JB - 1)) // U(JB)
        bid = U(cuda.blockIdx.x)  # a 1-D grid, groups first (as the SIMT kernel's)
        b0, g0 = (bid // nbg) % nbt * U(BM), bid % nbg * U(JB)
        o0 = bid // (nbt * nbg) * U(BN)
        uB, uG, uO, uC = U(batch), U(G), U(O), U(C)
        uir, uig, uic = U(ir), U(ig), U(ic)
        # staging: I copy element (t_i + TS·u, j_i, c_i) of each chunk, u < IU
        if in_grouped:
            j_i, c_i, t_i = tid % U(JB), (tid // U(JB)) % U(CK), tid // U(JB * CK)
        else:
            c_i, j_i, t_i = tid % U(CK), (tid // U(CK)) % U(JB), tid // U(JB * CK)
        i_src = (b0 + t_i) * uir + (g0 + j_i) * uig + c_i * uic  # + q·CK·ic + u·TS·ir
        i_dst = t_i * U(ST) + j_i * U(SJ) + c_i * U(SC)  # + u·TS·ST
        whole = b0 + U(BM) <= uB and g0 + U(JB) <= uG  # no token or group edge in this block
        x_rd = (row0 + r) * U(ST) + jj * U(SJ) + k * U(SC)  # + m·MS·ST + kk·8·SC
        w_src = ((g0 // U(JB)) * (U(O + BN - 1) // U(BN)) + o0 // U(BN)) * U(CB * W_WORDS) + tid
        w_rd = U(WB) + jj * U(KS * NN * 64)  # + (kk·NN + n)·64 (+ my lane's pair: mma.sync)
        if not wg:
            w_rd += lane * U(2)
        for m in range(MT):
            for n in range(NN):
                for i in range(4):
                    acc[m, n, i] = f32(0)
        # chunk q of c (inputs and B fragments) goes from registers to shared memory, chunk
        # q + 1 into registers, then chunk q is multiplied; the packed weights need no guard
        for q in range(-1, CB):
            if q >= 0:
                cuda.syncthreads()  # everyone is done with chunk q - 1
                for u in range(IU):
                    sm[i_dst + U(u * TS * ST)] = xn[u]
                for u in range(WU):
                    if W_WORDS % NT == 0 or tid + U(u * NT) < U(W_WORDS):
                        if SPLIT:
                            (sm[tid + U(WB + u * NT)],
                             sm[tid + U(WB + u * NT + SPLIT)]) = tf32_split(wn[u])
                        else:
                            sm[tid + U(WB + u * NT)] = wn[u]
                if wg:  # my stores of B, visible to the tensor cores' reads after the barrier
                    fence_proxy_async()
                cuda.syncthreads()
            if q + 1 < CB:
                uq = U((q + 1) * CK)
                if whole and uq + U(CK) <= uC:
                    for u in range(IU):
                        xn[u] = inp[i_src + uq * uic + U(u * TS) * uir]
                else:  # zero past the edges (tokens, groups, the last c chunk)
                    for u in range(IU):
                        ok = (b0 + t_i + U(u * TS) < uB and g0 + j_i < uG and uq + c_i < uC)
                        xn[u] = inp[i_src + uq * uic + U(u * TS) * uir] if ok else f32(0)
                for u in range(WU):
                    if W_WORDS % NT == 0 or tid + U(u * NT) < U(W_WORDS):
                        wn[u] = wp[w_src + U((q + 1) * W_WORDS + u * NT)]
            if q >= 0:
                chunk_product(sm, sm, x_rd, w_rd, acc, af)
        # out, CK outputs a pass: fragments -> shared (t, j, o) -> global in its layout's order
        if out_grouped:
            j_o, o_o, t_o = tid % U(JB), (tid // U(JB)) % U(CK), tid // U(JB * CK)
        else:
            o_o, j_o, t_o = tid % U(CK), (tid // U(CK)) % U(JB), tid // U(JB * CK)
        o_rd = t_o * U(SO) + j_o * U(SJO) + o_o * U(SOO)  # + u·TS·SO
        o_wr = (row0 + r) * U(SO) + jj * U(SJO) + U(2) * k * U(SOO)
        g = g0 + j_o
        # a block without an edge stores unguarded, stepping one address (the guarded stores'
        # index arithmetic and branches were half the epilogue's instructions: round 8)
        inside = whole and o0 + U(BN) <= uO
        row_step = U(TS) * U(orow)  # my next output row
        o_dst = (b0 + t_o) * U(orow) + g * U(og) + (o0 + o_o) * U(oo)  # + p·CK·oo + u·row_step
        for p in range(BN // CK):
            ob = U(p % 2 * WB)  # pass p's region: its last readers were pass p - 2's, before
            if p == 0:  # pass p - 1's barrier; the first pass's, the last chunk's
                cuda.syncthreads()
            for nn in range(CK // 8):
                for m in range(MT):  # D: rows r, r + 8; columns 2k, 2k + 1 of tile p·CK/8 + nn
                    a = ob + o_wr + U(m * MS * SO + nn * 8 * SOO)
                    sm[a] = acc[m, p * (CK // 8) + nn, 0]
                    sm[a + U(SOO)] = acc[m, p * (CK // 8) + nn, 1]
                    sm[a + U(8 * SO)] = acc[m, p * (CK // 8) + nn, 2]
                    sm[a + U(8 * SO + SOO)] = acc[m, p * (CK // 8) + nn, 3]
            cuda.syncthreads()  # pass p is in shared memory
            if inside:
                dst = o_dst + U(p * CK) * U(oo)
                for u in range(IU):
                    out[dst] = sm[ob + o_rd + U(u * TS * SO)]
                    dst += row_step
            else:
                o = o0 + U(p * CK) + o_o
                if g < uG and o < uO:
                    for u in range(IU):
                        t = b0 + t_o + U(u * TS)
                        if t < uB:
                            out[t * U(orow) + g * U(og) + o * U(oo)] = sm[ob + o_rd
                                                                          + U(u * TS * SO)]

    return kernel, BM, JB, BN, CK, NT, 4 * WORDS if DYNAMIC else 0


def _pack_mma(W, JB: int, BN: int, CK: int, wg: bool = False):
    """W (G, O, C) -> (wp, CB): the B fragments in the order a block stages them, one chunk of
    JB groups x CK c x BN outputs after another: wp[gb, ob, cb, jj, kk, n, r, t, h] =
    W[gb·JB + jj, ob·BN + 8n + r, cb·CK + 8kk + 4h + t], zero-padded to whole blocks and chunks
    (lane 4r + t holds (b0, b1) = the pair h = 0, 1); CB chunks per (gb, ob). ``wg``: each
    k-step's B in wgmma's canonical layout instead, wp[gb, ob, cb, jj, kk, n, h, r, t]."""
    G, O, C = W.shape
    Gp, Op, Cp = -(-G // JB) * JB, -(-O // BN) * BN, -(-C // CK) * CK
    if (Gp, Op, Cp) == (G, O, C):  # nothing to pad: one copy (the permutation), not three
        Wp = W
    else:
        Wp = W.new_zeros(Gp, Op, Cp)
        Wp[:G, :O, :C] = W
    wp = Wp.reshape(Gp // JB, JB, Op // BN, BN // 8, 8, Cp // CK, CK // 8, 2, 4)
    order = (0, 2, 5, 1, 6, 3, 7, 4, 8) if wg else (0, 2, 5, 1, 6, 3, 4, 8, 7)
    return wp.permute(*order).contiguous(), Cp // CK


# =============================================================================================
# Fused CUDA kernel on tensor cores and thread-block clusters (sm_90 and later), float32, where
# k = q = l = r (every z index g·q + o is i·l + j with i = g, j = o): the whole forward
#     y = P2 · BD(w2) · P1 · BD(w1) · x
# in one launch, z never in global memory. A token's z (16 KB at n = 4096) is too big for one
# block to hold for enough tokens to amortise the weights, so a cluster of CS blocks holds it
# together, each block in its own shared memory, and reads the others' (distributed shared
# memory, kernels/_common.py):
#   - phase 1: block ρ of the cluster computes z[t, g, o] for its JB = k / CS groups g = ρ·JB +
#     jj, all q outputs o, T tokens, into its shared memory ZS (element (t, jj, o) at t·ZT +
#     o·JB + jj); cluster_sync;
#   - phase 2: block ρ computes y[t, o·l + j] = Σ_i w2[j, o, i] · z[t, i, j] for its JB groups
#     j = ρ·JB + jj: the inputs z[t, i, j] of chunk i ∈ [8·c1, 8·c1 + 8) come from block i // JB's
#     ZS; cluster_sync (no block leaves while others read its ZS).
# Each phase is the tensor-core kernel's loop above with one block shape: JB groups x WM warps,
# each warp 16·MT tokens x all outputs of one group, c in chunks of 8; the next chunk's inputs
# (from global memory in phase 1, from the cluster's shared memory in phase 2) and B fragments
# are loaded into registers while this chunk is multiplied. Global traffic: x read once, y
# written once (the floor), the weights once per block per T tokens from L2.
# The simulator runs blocks one after another, so there a cluster is emulated by one block of
# CS·NT threads (rank = thread // NT) whose shared memory holds every rank's part.
# Measured on an H100 it is slower than the two launches (1.14 ms against 1.00 ms at 32768
# tokens, n = 4096, round 8; 1.22 against 1.17 in round 7): each block's shape, 8 groups x 32
# tokens in both phases, is the slow one of the grouped launch (kernels/BENCHMARKS.md, round
# 7); so it runs only when forced.
# =============================================================================================

# (CS, WM, MT): clusters of 8 blocks of 8 warps (2 blocks an SM), 32 tokens a cluster; the best
# of 5 shapes on an H100 (kernels/BENCHMARKS.md, round 7)
FUSED_TILES = (8, 1, 2)
SIMULATOR_FUSED_TILES = (2, 1, 1)


def _fused_tiles() -> tuple[int, int, int]:
    return SIMULATOR_FUSED_TILES if cuda_simulated() else FUSED_TILES


@functools.cache
def _fused_kernel(k: int, p: int, q: int, s: int, tiles: tuple[int, int, int]):
    """Compile-once fused forward for x (b, k·p), w1 (k, q, p), w2 (q, s, k); returns (kernel,
    T tokens a cluster, CS blocks a cluster, NT threads a block, shared bytes a block)."""
    misfit = _fused_misfit(k, p, q, q, s, tiles)
    if misfit:
        raise ValueError(f"fused tiles (CS, WM, MT) = {tiles} do not fit k = {k}, p = {p}, "
                         f"q = {q}, s = {s}: {misfit}")
    CS, WM, MT = tiles
    CK = 8  # c per chunk: one k-step of m16n8k8
    JB = k // CS
    NT, T = 32 * JB * WM, 16 * MT * WM
    NN1, NN2 = q // 8, s // 8  # output tiles of 8 a warp: phase 1, phase 2
    CB1, CB2 = p // CK, k // CK  # chunks: phase 1, phase 2
    W1, W2 = JB * NN1 * 64, JB * NN2 * 64  # a chunk of B fragments (_pack_mma's order)
    WU1, WU2 = -(-W1 // NT), -(-W2 // NT)
    WU = max(WU1, WU2)
    n, m = k * p, q * s  # widths of x and y
    TS = NT // (JB * CK)  # token rows one staging pass covers (inputs, and outputs)
    IU = T // TS  # staging passes
    ST, SO = JB * CK + 4, JB * CK + 1  # staged input (t, jj, c) at t·ST + jj·CK + c; output
    ZT = q * JB + 1  # (t, jj, o) at t·SO + jj + o·JB; ZS (t, jj, o) at t·ZT + o·JB + jj
    XB = T * ZT  # shared memory: ZS, then the staged chunk (later an output pass), then WS
    WB = XB + T * max(ST, SO)
    WORDS = WB + max(W1, W2)
    NN = max(NN1, NN2)
    f32 = np.float32
    U = np.uint64
    SIM = cuda_simulated()
    SIM_WORDS = CS * WORDS if SIM else 1
    blocks_per_sm = 2 if NT <= 256 and 4 * WORDS <= 113 * 1024 else 1  # 128 registers a thread
    options = {} if SIM else {"launch_bounds": (NT, blocks_per_sm)}

    product1, product2 = _chunk_product(MT, NN1, 1, ST, 1), _chunk_product(MT, NN2, 1, ST, 1)
    inline = {} if SIM else {"forceinline": True}

    def staging(W, WU):
        """store(...): a chunk from registers (xn, wn) to shared memory, between barriers;
        fetch(...): the next chunk's W words of B fragments from wp[w_src + ...] into wn."""
        @cuda.jit(device=True, **inline)
        def store(sm, xn, wn, i_dst, w_dst, tid):
            cuda.syncthreads()  # everyone is done with the chunk before
            for u in range(IU):
                sm[i_dst + U(u * TS * ST)] = xn[u]
            for u in range(WU):
                if W % NT == 0 or tid + U(u * NT) < U(W):
                    sm[w_dst + tid + U(u * NT)] = wn[u]
            cuda.syncthreads()

        @cuda.jit(device=True, **inline)
        def fetch(wn, wp, w_src, tid):
            for u in range(WU):
                if W % NT == 0 or tid + U(u * NT) < U(W):
                    wn[u] = wp[w_src + U(u * NT)]
        return store, fetch

    (store1, fetch1), (store2, fetch2) = staging(W1, WU1), staging(W2, WU2)

    @cuda.jit(device=True, **inline)
    def cluster_barrier():  # in the simulator the cluster is one block
        if SIM:
            cuda.syncthreads()
        else:
            cluster_sync()

    @cuda.jit(**options)
    def kernel(x, wp1, wp2, y, batch):
        # x (batch, n), y (batch, m) flat; wp1, wp2: w1 and w2 packed by _pack_mma (JB groups,
        # all outputs, chunks of 8)
        if SIM:  # one block is the cluster
            sm = cuda.shared.array(SIM_WORDS, f32)
            rank, tid = U(cuda.threadIdx.x) // U(NT), U(cuda.threadIdx.x) % U(NT)
            tile = U(cuda.blockIdx.x)
            lb = rank * U(WORDS)  # my part of the shared memory
        else:
            sm = cuda.shared.array(0, f32)
            rank, tid = U(cuda.blockIdx.x) % U(CS), U(cuda.threadIdx.x)
            tile = U(cuda.blockIdx.x) // U(CS)
            lb = U(0)
        acc = cuda.local.array((MT, NN, 4), f32)  # C fragments
        af = cuda.local.array((MT, 8), f32)  # A fragments of one k-step: big 0-3, small 4-7
        xn = cuda.local.array(IU, f32)  # the next chunk, loaded while this one is multiplied
        wn = cuda.local.array(WU, f32)
        lane, w = tid % U(32), tid // U(32)
        jj, wm = w % U(JB), w // U(JB)
        r, kq = lane // U(4), lane % U(4)
        uB, b0, g0 = U(batch), tile * U(T), rank * U(JB)
        # staging: I copy element (t_i + TS·u, j_i, c_i) of each chunk, u < IU
        c_i, j_i, t_i = tid % U(CK), (tid // U(CK)) % U(JB), tid // U(JB * CK)
        i_dst = lb + U(XB) + t_i * U(ST) + j_i * U(CK) + c_i  # + u·TS·ST
        x_rd = lb + U(XB) + (wm * U(16 * MT) + r) * U(ST) + jj * U(CK) + kq
        x_src = (b0 + t_i) * U(n) + (g0 + j_i) * U(p) + c_i  # + c1·8 + u·TS·n
        z_src = t_i * U(ZT) + (g0 + j_i) * U(JB)  # + il: (t, i, j) in block i // JB's ZS
        # ---- phase 1: ZS[t, jj, o] = Σ_c w1[g0 + jj, o, c] x[b0 + t, (g0 + jj)·p + c]
        for a in range(MT):
            for b in range(NN):
                for i in range(4):
                    acc[a, b, i] = f32(0)
        w_src = rank * U(CB1 * W1) + tid
        w_rd = lb + U(WB) + jj * U(NN1 * 64) + lane * U(2)
        for c1 in range(-1, CB1):
            if c1 >= 0:
                store1(sm, xn, wn, i_dst, lb + U(WB), tid)
            if c1 + 1 < CB1:
                for u in range(IU):
                    ok = b0 + t_i + U(u * TS) < uB
                    xn[u] = x[x_src + U((c1 + 1) * CK + u * TS * n)] if ok else f32(0)
                fetch1(wn, wp1, w_src + U((c1 + 1) * W1), tid)
            if c1 >= 0:
                product1(sm, sm, x_rd, w_rd, acc, af)
        z_wr = lb + (wm * U(16 * MT) + r) * U(ZT) + U(2) * kq * U(JB) + jj
        for a in range(MT):  # D: rows r, r + 8; columns 2k, 2k + 1 of output tile b
            for b in range(NN1):
                zi = z_wr + U(a * 16 * ZT + b * 8 * JB)
                sm[zi] = acc[a, b, 0]
                sm[zi + U(JB)] = acc[a, b, 1]
                sm[zi + U(8 * ZT)] = acc[a, b, 2]
                sm[zi + U(8 * ZT + JB)] = acc[a, b, 3]
                for i in range(4):  # zero again for phase 2 (tiles past NN1 never left 0)
                    acc[a, b, i] = f32(0)
        cluster_barrier()  # every block's ZS is written
        # ---- phase 2: y[b0 + t, o·q + g0 + jj] = Σ_i w2[g0 + jj, o, i] z[t, i, g0 + jj]
        w_src = rank * U(CB2 * W2) + tid
        w_rd = lb + U(WB) + jj * U(NN2 * 64) + lane * U(2)
        for c1 in range(-1, CB2):
            if c1 >= 0:
                store2(sm, xn, wn, i_dst, lb + U(WB), tid)
            if c1 + 1 < CB2:
                i = U((c1 + 1) * CK) + c_i  # z's group: block i // JB, its group i % JB
                zi = z_src + i % U(JB)
                for u in range(IU):
                    if SIM:
                        xn[u] = sm[i // U(JB) * U(WORDS) + zi + U(u * TS * ZT)]
                    else:
                        xn[u] = cluster_load(sm, zi + U(u * TS * ZT), i // U(JB))
                fetch2(wn, wp2, w_src + U((c1 + 1) * W2), tid)
            if c1 >= 0:
                product2(sm, sm, x_rd, w_rd, acc, af)
        cluster_barrier()  # no block reads my ZS any more
        # y, 8 outputs a pass: fragments -> shared (t, jj, o) -> global, groups fastest
        j_o, o_o, t_o = tid % U(JB), (tid // U(JB)) % U(CK), tid // U(JB * CK)
        o_rd = lb + U(XB) + t_o * U(SO) + j_o + o_o * U(JB)  # + u·TS·SO
        o_wr = lb + U(XB) + (wm * U(16 * MT) + r) * U(SO) + jj + U(2) * kq * U(JB)
        for b in range(NN2):
            cuda.syncthreads()  # the last pass's readers are done
            for a in range(MT):  # D: rows r, r + 8; columns 2k, 2k + 1
                oi = o_wr + U(a * 16 * SO)
                sm[oi] = acc[a, b, 0]
                sm[oi + U(JB)] = acc[a, b, 1]
                sm[oi + U(8 * SO)] = acc[a, b, 2]
                sm[oi + U(8 * SO + JB)] = acc[a, b, 3]
            cuda.syncthreads()
            for u in range(IU):
                t = b0 + t_o + U(u * TS)
                if t < uB:
                    y[t * U(m) + (U(b * CK) + o_o) * U(q) + g0 + j_o] = sm[o_rd + U(u * TS * SO)]

    return kernel, T, CS, NT, 4 * WORDS


def _fused_misfit(k: int, p: int, q: int, l: int, s: int, tiles: tuple[int, int, int]) -> str:
    """Why the fused kernel cannot take these factors at these tiles ("" when it can): both
    factors need as many groups (k = q = l, so r = k), the cluster must divide them, the
    reductions and outputs come in 8s (p, k, q, s multiples of 8), a warp holds all outputs of
    a group (q, s <= 64: 64 float32 sums a thread), and a block has at most 1024 threads."""
    CS, WM, _ = tiles
    return ("need k = q = l" if not k == q == l else
            "need the cluster size dividing k" if k % CS else
            "need p, k, q and s multiples of 8" if (p % 8 or k % 8 or q % 8 or s % 8) else
            "need q and s at most 64" if q > 64 or s > 64 else
            "need 32·(k / CS)·WM <= 1024 threads a block" if 32 * (k // CS) * WM > 1024 else "")


def _fused_plan(k: int, p: int, q: int, l: int, s: int):
    """``_fused_kernel``'s tuple for these factors, or None where it does not take them
    (``_fused_misfit``) or a block would need more than an sm_90 GPU's 227 KB of shared
    memory."""
    tiles = _fused_tiles()
    if _fused_misfit(k, p, q, l, s, tiles):
        return None
    plan = _fused_kernel(k, p, q, s, tiles)
    return plan if plan[4] <= 227 * 1024 else None


def _fwd_fused(x, w1, w2, y, plan):
    """y = P2 BD(w2) P1 BD(w1) x in one launch of the fused kernel (``plan``: _fused_plan's)."""
    k, q, _ = w1.shape
    s = w2.shape[1]
    b = x.shape[0]
    _need_sm90("fused", x.device)
    kernel, T, CS, NT, shared = plan
    JB = k // CS
    wp1, _ = _pack_mma(w1, JB, q, 8)
    wp2, _ = _pack_mma(w2, JB, s, 8)
    clusters = -(-b // T)
    args = (x.view(-1), wp1.view(-1), wp2.view(-1), y.view(-1), b)
    if cuda_simulated():  # a cluster is one block of CS·NT threads
        launch(kernel, clusters, CS * NT, *args)
    else:
        launch(kernel, clusters * CS, NT, *args, shared_bytes=shared, cluster=CS)


_FORCED_ENGINE: list[str] = []  # set by forced_engine


def _need_sm90(engine: str, device) -> None:
    """RuntimeError unless the simulator or an sm_90 GPU (clusters, wgmma) runs ``engine``."""
    if not cuda_simulated() and torch.cuda.get_device_capability(device) < (9, 0):
        major, minor = torch.cuda.get_device_capability(device)
        raise RuntimeError(f"engine {engine!r} needs sm_90 (this GPU is sm_{major}{minor}): use "
                           f"engine 'mma'")


def _engine(dtype: torch.dtype) -> str:
    """"wgmma" (tensor cores, 3xTF32, one launch a factor; by sm_90's warpgroup instruction
    where WGMMA_TILES has tiles for the launch, else by mma.sync) for float32 on sm_90; "mma"
    (the same, always mma.sync) for float32 on sm_80 to sm_89, and in the simulator; "simt"
    (the register-tiled kernel) for float64 and for older GPUs. "fused" (the forward in one
    launch on tensor cores and clusters, sm_90, where the factors fit it; else as "mma") only
    when forced: on an H100 it is slower than the two launches (kernels/BENCHMARKS.md, round
    7)."""
    if dtype != torch.float32:
        return "simt"
    if _FORCED_ENGINE:
        return _FORCED_ENGINE[-1]
    if cuda_simulated():
        return "mma"
    cc = torch.cuda.get_device_capability()
    return "wgmma" if cc >= (9, 0) else "mma" if cc >= (8, 0) else "simt"


@contextlib.contextmanager
def forced_engine(engine: str):
    """Within the block, float32 products run on ``engine``: "fused" (one launch, sm_90),
    "wgmma" (one launch a factor, sm_90's default: its warpgroup instruction where it has
    tiles), "mma" (tensor cores by mma.sync, one launch a factor, as on sm_80) or "simt" (CUDA
    cores, as on GPUs before sm_80): for benchmarks and tests that compare them."""
    if engine not in ("fused", "wgmma", "mma", "simt"):
        raise ValueError(f"engine must be 'fused', 'wgmma', 'mma' or 'simt', got {engine!r}")
    _FORCED_ENGINE.append(engine)
    try:
        yield
    finally:
        _FORCED_ENGINE.pop()


def _bgemm(inp, W, out, sizes, in_strides, out_strides):
    """out[b, g, o] = Σ_c W[g, o, c] in[b, g, c] through strides (in numbers) on flat views of
    contiguous tensors; W (G, O, C), any strides; sizes = (tokens, G, O, C), each stride triple
    (token, group, c or o)."""
    batch, G, O, C = sizes
    if batch == 0 or G == 0 or O == 0:  # nothing to write (a grid cannot have 0 blocks)
        return
    # "grouped" when neighbouring groups are neighbouring numbers in memory
    in_grouped, out_grouped = G > 1 and in_strides[1] == 1, G > 1 and out_strides[1] == 1
    kind = "grouped" if in_grouped or out_grouped else "flat"
    engine = _engine(inp.dtype)
    if engine != "simt":
        if engine == "wgmma":
            _need_sm90("wgmma", inp.device)
        wg_tiles = _wgmma_tiles(kind) if engine == "wgmma" else None
        wg = wg_tiles is not None  # else mma.sync (the kinds wgmma has no tiles for)
        tiles, blocks_per_sm = wg_tiles if wg else _mma_tiles(kind)
        kernel, BM, JB, BN, CK, threads, shared = _mma_kernel(tiles, blocks_per_sm, in_grouped,
                                                              out_grouped, wg)
        wp, CB = _pack_mma(W, JB, BN, CK, wg)
        grid = -(-batch // BM) * -(-G // JB) * -(-O // BN)
        launch(kernel, grid, threads, inp.view(-1), wp.view(-1), out.view(-1), batch, G, O, C,
               CB, *in_strides, *out_strides, shared_bytes=shared)
        return
    tiles, blocks_per_sm = _tiles(inp.element_size(), kind)
    kernel, BM, JB, BN, threads = _bgemm_kernel(numpy_dtype(inp.dtype), tiles, blocks_per_sm)
    grid = -(-batch // BM) * -(-G // JB) * -(-O // BN)
    wt = W.transpose(1, 2).contiguous()
    launch(kernel, grid, threads, inp.view(-1), wt.view(-1), out.view(-1), batch, G, O, C,
           *in_strides, *out_strides)


def _fwd_cuda(x, w1, w2, y=None):
    """x (b, n), w1 (k, q, p), w2 (l, s, r) contiguous -> y (b, l·s), written into ``y`` when
    given: in one fused launch where it fits (engine "fused"), else z = BD(w1) x into global
    memory, then y = P2 BD(w2) P1 z."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    b = x.shape[0]
    y = x.new_empty(b, l * s) if y is None else y
    plan = _fused_plan(k, p, q, l, s) if _engine(x.dtype) == "fused" else None
    if b and plan:
        _fwd_fused(x, w1, w2, y, plan)
    elif b:
        z = x.new_empty(b, k * q)
        _bgemm(x, w1, z, (b, k, q, p), (k * p, p, 1), (k * q, q, 1))
        _bgemm(z, w2, y, (b, l, s, r), (k * q, 1, l), (l * s, 1, l))
    return y


def _bwd_cuda(x, g, w1, w2):
    """-> gx (b, n), z (b, k·q), gz (b, k·q); see ``cpu._monarch_bwd_loop``."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    b = x.shape[0]
    gx = torch.empty_like(x)
    z, gz = x.new_empty(b, k * q), x.new_empty(b, k * q)
    if b:
        _bgemm(x, w1, z, (b, k, q, p), (k * p, p, 1), (k * q, q, 1))
        _bgemm(g, w2.transpose(1, 2), gz, (b, l, r, s), (l * s, 1, l), (k * q, 1, l))
        _bgemm(gz, w1.transpose(1, 2), gx, (b, k, p, q), (k * q, q, 1), (k * p, p, 1))
    return gx, z, gz
