"""Pieces shared by several kernels, under public names (no kernel imports another kernel's
private names): the canonical-example record every op's ``example_inputs`` returns, the
torch -> NumPy dtype mapping the kernel factories are keyed by, and the CUDA block scan of
affine maps h -> A h + B (``scan_maps``) with its launch layout, used by kernels/scan.py's
kernels and by the selective scan's backward, and what numba.cuda does not expose: the
3xTF32 split (``tf32_split``, integer arithmetic) and the tensor-core product (``mma_tf32``,
inline PTX), both with simulator twins, the warpgroup product of sm_90 (``wgmma_tf32x3``,
inline PTX, with a simulator twin) and thread-block-cluster instructions (``cluster_sync``,
``cluster_load``, inline PTX)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from numba import cuda

from minimodels.backend import cuda_simulated, expect_tensor

__all__ = ["Example", "SCAN_CHUNK", "SCAN_ITEMS", "SCAN_THREADS", "cluster_load", "cluster_sync",
           "expect_out", "fence_proxy_async", "mma_tf32", "numpy_dtype", "randn", "scan_maps",
           "tf32_split", "wgmma_tf32x3"]

# =============================================================================================
# Constants: the layout of a chunked block scan (kernels/scan.py, selective_scan's backward)
# =============================================================================================

# One block walks one row in chunks of SCAN_THREADS * SCAN_ITEMS steps; thread i owns
# SCAN_ITEMS consecutive steps of each chunk. The simulator (CI) uses a smaller block so that
# its tests cross many chunk boundaries at tiny sizes.
SCAN_THREADS = 8 if cuda_simulated() else 256  # 256 x 2 measured best of 128..1024 x 1..8 (H200)
SCAN_ITEMS = 2
SCAN_CHUNK = SCAN_THREADS * SCAN_ITEMS


# =============================================================================================
# Canonical inputs of an op
# =============================================================================================


@dataclass(frozen=True)
class Example:
    """One canonical call of an op, ``op(*args, **kwargs)``, and how close another backend must
    come to ``ref`` on it (``torch.testing.assert_close(got, want, rtol=rtol, atol=atol)``).

    ``sizes`` names the sizes (``{"batch": 1, "d_model": 1536, "seqlen": 4096, ...}``) for
    tables and floors. Tests, benchmarks, GPU checks and chapters all build inputs through an
    op's ``example_inputs(shape=None, *, dtype, device, seed)``, so there is one spec per op."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    rtol: float = 1e-5
    atol: float = 1e-6
    sizes: dict = field(default_factory=dict)

    def call(self, op, **overrides):
        """``op(*args, **kwargs, **overrides)``, e.g. ``ex.call(attention, backend="cpu")``."""
        return op(*self.args, **{**self.kwargs, **overrides})


def randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Standard normal float64 values on the CPU from ``generator``: examples draw in float64 on
    the CPU, then cast and move, so one seed gives the same values in every dtype and device."""
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def expect_out(out, like: torch.Tensor, dims: str, inputs) -> torch.Tensor:
    """Check an op's ``out=`` argument: a contiguous tensor of ``like``'s shape, dtype and
    device, and no tensor of ``inputs`` that needs its gradient (a kernel writing into ``out``
    is outside autograd). Raises ``TypeError``/``ValueError`` naming ``out``."""
    expect_tensor("out", out, dims, dtypes=(like.dtype,), shape=like.shape)
    if out.device != like.device:
        raise ValueError(f"out must be on {like.device} like the inputs, got {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        raise ValueError("out= is for calls without autograd, but an input requires grad: call "
                         "without out=, or under torch.no_grad()")
    return out


@functools.cache
def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype of a torch dtype (kernel factories are cached per NumPy dtype)."""
    return np.dtype(str(dtype).removeprefix("torch."))


# =============================================================================================
# CUDA: the block scan of affine maps
# =============================================================================================


# [core] scan_maps
@cuda.jit(device=True)
def scan_maps(sA, sB, A, B, i):
    """Inclusive scan over the block of the maps h -> A h + B (thread order = time order).

    sA, sB: (2, SCAN_THREADS) ping-pong buffers, so each of the log2(SCAN_THREADS) steps needs
    one barrier. Returns p: thread i's composition of maps 0..i is in sA[p, i], sB[p, i]."""
    p = 0
    sA[p, i] = A
    sB[p, i] = B
    cuda.syncthreads()
    offset = 1
    while offset < SCAN_THREADS:
        if i >= offset:  # (A, B) after (Ap, Bp):  h -> A (Ap h + Bp) + B
            B = A * sB[p, i - offset] + B
            A = A * sA[p, i - offset]
        p = 1 - p
        sA[p, i] = A
        sB[p, i] = B
        cuda.syncthreads()
        offset *= 2
    return p
# [/core]


# =============================================================================================
# CUDA: tensor cores (sm_80 and later) as inline PTX
# =============================================================================================
# numba.cuda has no warp-level matrix instructions, but NVVM accepts inline PTX, so an
# intrinsic emits mma.sync; another splits a float32 into its TF32 pieces (integer arithmetic):
#   tf32_split(x) -> (big, small)
#                   x's 3xTF32 pieces: big = x rounded to TF32 (10 mantissa bits, ties away from
#                   0: bits + 2¹², low 13 bits cleared), small = x - big (exact, as float32s);
#                   the tensor core reads small's top 19 bits, so it multiplies small truncated
#                   to TF32;
#   mma_tf32(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3) -> (d0, d1, d2, d3)
#                   mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: the 32 lanes of a warp
#                   together compute D = A·B + C, A (16 x 8), B (8 x 8), C and D (16 x 8) in
#                   float32, each lane holding pieces (PTX ISA, "Matrix fragments for
#                   mma.m16n8k8"), with g = lane // 4, t = lane % 4:
#                     a0 = A[g, t]   a1 = A[g+8, t]   a2 = A[g, t+4]   a3 = A[g+8, t+4]
#                     b0 = B[t, g]   b1 = B[t+4, g]
#                     c0 = C[g, 2t]  c1 = C[g, 2t+1]  c2 = C[g+8, 2t]  c3 = C[g+8, 2t+1]  (D too);
#                   A and B are read as TF32: the low 13 bits of each piece are ignored.
# Every lane of the warp must call mma_tf32 together. A float32 product a·b at float32 accuracy
# from TF32 products ("3xTF32"): a = a_big + a_small, b likewise (tf32_split), then a·b ≈
# a_big·b_big + a_big·b_small + a_small·b_big: what is dropped, a_small·b_small (each small is
# within 2⁻¹¹ of its number) and the truncation of the two smalls (each within 2⁻¹⁰ of a
# small), is at most 5·2⁻²² |a·b|.
# Why not cvt.rna.tf32.f32 for both pieces: ptxas guards it against infinities and NaNs (4
# instructions for big, 3 for small, where these take 2 and 1). And why small is not rounded
# by bits + 2¹² as big is: a GPU's NaN is 0x7FFFFFFF, which that carry turns into -0; the
# remainder of an infinite or NaN x is NaN, and left as it is, it makes the product NaN (big may
# then be anything: a NaN x's big is -0, an infinite one's is the infinity).
# In the simulator both are Python: mma_tf32 gathers the warp's pieces in a mailbox of its
# block, behind a barrier of the warp's 32 threads (so they must call it together, as on the
# GPU; mailboxes alternate between calls, so one barrier a call suffices), and multiplies in
# float64; the GPU sums in float32 (its rounding within one mma is the hardware's).

if cuda_simulated():
    import threading

    def tf32_split(x):
        """x's 3xTF32 pieces (big, small): big = x rounded to TF32, small = x - big (the
        glossary above)."""
        x = np.float32(x)
        big = ((np.asarray(x).view(np.uint32) + np.uint32(0x1000)) & np.uint32(0xFFFFE000))
        big = big.view(np.float32)[()]
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, silently, as on the GPU
            return big, np.float32(x - big)

    _SIM_WARPS = threading.Lock()

    def mma_tf32(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """D = A·B + C for the warp's 16 x 8 x 8 tile; this lane's (d0, d1, d2, d3)."""
        me = threading.current_thread()  # the simulator's BlockThread
        warp, lane = divmod(me.thread_id, 32)
        with _SIM_WARPS:  # per block: two mailboxes and a barrier per warp
            box = me._manager.__dict__.setdefault("mma_tf32", {})
            if warp not in box:
                box[warp] = ([None] * 32, [None] * 32), threading.Barrier(32)
        (even, odd), barrier = box[warp]
        me.mma_calls = getattr(me, "mma_calls", 0) + 1
        mail = odd if me.mma_calls % 2 else even  # alternate: one barrier per call suffices
        mail[lane] = (a0, a1, a2, a3, b0, b1)
        barrier.wait()
        warp_pieces = list(mail)
        A, B = np.zeros((16, 8), np.float32), np.zeros((8, 8), np.float32)
        for i, (x0, x1, x2, x3, y0, y1) in enumerate(warp_pieces):
            g, t = divmod(i, 4)
            A[g, t], A[g + 8, t], A[g, t + 4], A[g + 8, t + 4] = x0, x1, x2, x3
            B[t, g], B[t + 4, g] = y0, y1
        keep = np.uint32(0xFFFFE000)  # the tensor core reads TF32: the low 13 bits are ignored
        A, B = ((M.view(np.uint32) & keep).view(np.float32).astype(np.float64) for M in (A, B))
        g, t = divmod(lane, 4)
        D = A @ B
        return (np.float32(D[g, 2 * t] + c0), np.float32(D[g, 2 * t + 1] + c1),
                np.float32(D[g + 8, 2 * t] + c2), np.float32(D[g + 8, 2 * t + 1] + c3))
else:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.cuda.extending import intrinsic

    @intrinsic
    def tf32_split(typingctx, x):
        """x's 3xTF32 pieces (big, small): big = x rounded to TF32, small = x - big (the
        glossary above)."""
        def codegen(context, builder, sig, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            half, keep = ir.Constant(i32, 0x1000), ir.Constant(i32, 0xFFFFE000)
            x = args[0]
            big = builder.bitcast(builder.and_(builder.add(builder.bitcast(x, i32), half), keep),
                                  f32)
            return cgutils.pack_array(builder, [big, builder.fsub(x, big)])

        return types.UniTuple(types.float32, 2)(types.float32), codegen

    @intrinsic
    def mma_tf32(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """D = A·B + C for the warp's 16 x 8 x 8 tile; this lane's (d0, d1, d2, d3)."""
        f = types.float32

        def codegen(context, builder, sig, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            mma = ir.InlineAsm(
                ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4),
                "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
                "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
            ins = [builder.bitcast(a, i32) for a in args[:6]] + list(args[6:])
            d = builder.call(mma, ins)
            return cgutils.pack_array(builder, [builder.extract_value(d, i) for i in range(4)])

        return types.UniTuple(f, 4)(f, f, f, f, f, f, f, f, f, f), codegen


# =============================================================================================
# CUDA: the warpgroup matrix product of sm_90 (wgmma) as inline PTX
# =============================================================================================
# mma.sync is a warp's instruction: every 16 x 8 x 8 product costs an issue slot and its B
# fragment a register load. sm_90's wgmma.mma_async is a warpgroup's (4 consecutive warps, 128
# threads): one instruction multiplies a 64 x N x 8 tile, A from registers (each warp's 16 rows
# in mma.sync's A fragment layout), B read by the tensor cores straight from shared memory
# through a 64-bit descriptor. One factory:
#   wgmma_tf32x3(MT, NN) -> product(acc, af, sm, b_big, b_small)
#       for m < MT: the warpgroup's tile m (64 rows: warp w of the group holds rows 16w + [0,
#       16)) acc[m] += A_m · B in 3xTF32, A_m from af[m] (this lane's pieces of its 16 x 8 A
#       fragment, mma_tf32's layout: big 0-3, small 4-7), B (8 x 8·NN) from the float32 shared
#       array sm: its TF32 parts at word b_big, its remainders at b_small, each in the
#       canonical K-major layout without swizzle:
#           B[k, o] at  (o // 8)·64 + (k // 4)·32 + (o % 8)·4 + k % 4     (k < 8, o < 8·NN)
#       (core matrices of 8 rows o x 16 bytes of k; the descriptor's leading byte offset,
#       between the two core matrices along k, WGMMA_LBO = 128, its stride byte offset,
#       between neighbouring 8s of o, WGMMA_SBO = 256; b_big and b_small 16-byte aligned);
#       acc (MT, NN, 4) in mma_tf32's C layout, tile n's acc[m, n, i] = D[r + 8·(i // 2),
#       8n + 2k + i % 2] of my warp's rows (r = lane // 4, k = lane % 4).
#   The three products of each tile (a_small·b_big, a_big·b_small, a_big·b_big) and the MT
#   tiles are issued in one asm statement, between wgmma.fence and wgmma.wait_group 0: the
#   accumulators never leave registers while the tensor cores own them, and the compiler sees
#   one instruction that reads acc, af and shared memory and writes acc.
# All 128 threads of each warpgroup must call it together, with the same b_big and b_small.
# wgmma reads shared memory through the "async proxy", ordinary stores write it through the
# generic one: a thread that stored B's pieces calls fence_proxy_async() (fence.proxy.async.
# shared::cta) after its stores and before the barrier that hands them to the warpgroups, or
# the tensor cores may read what was there before (PTX ISA, memory consistency model: proxies).
# In the simulator the twin gathers the warpgroup's A pieces in a mailbox behind a barrier of
# its 128 threads (as mma_tf32's twin does for a warp), reads B from sm in the layout above,
# and multiplies in float64 what the tensor cores read (the low 13 bits of each piece dropped).

WGMMA_LBO, WGMMA_SBO = 128, 256  # bytes: B's core matrices along k, along o (layout above)

if cuda_simulated():
    def fence_proxy_async():
        """My shared-memory stores made visible to the async proxy (a no-op here)."""

    @functools.cache
    def wgmma_tf32x3(MT: int, NN: int):
        """The warpgroup's 3xTF32 product acc[m] += A_m · B for m < MT, B 8 x 8·NN (glossary
        above)."""
        N = 8 * NN
        k_, o_ = np.meshgrid(np.arange(8), np.arange(N), indexing="ij")
        b_at = (o_ // 8) * 64 + (k_ // 4) * 32 + (o_ % 8) * 4 + k_ % 4  # B[k, o]'s word
        keep = np.uint32(0xFFFFE000)

        def tf32(M):  # as the tensor core reads a piece
            return (np.ascontiguousarray(M, np.float32).view(np.uint32) & keep).view(
                np.float32).astype(np.float64)

        def product(acc, af, sm, b_big, b_small):
            me = threading.current_thread()
            group, lane = divmod(me.thread_id, 128)
            with _SIM_WARPS:
                box = me._manager.__dict__.setdefault("wgmma_tf32x3", {})
                if group not in box:
                    box[group] = ([None] * 128, [None] * 128), threading.Barrier(128)
            (even, odd), barrier = box[group]
            me.wgmma_calls = getattr(me, "wgmma_calls", 0) + 1
            mail = odd if me.wgmma_calls % 2 else even
            mail[lane] = np.array(af[:MT, :8], np.float32)
            barrier.wait()
            A = np.zeros((MT, 2, 64, 8), np.float32)  # (tile, big/small, row, k)
            for i, pieces in enumerate(mail):
                w, (r, k) = i // 32, divmod(i % 32, 4)
                for h in range(2):
                    rows, cols = [16 * w + r, 16 * w + r + 8] * 2, [k, k, k + 4, k + 4]
                    A[:, h, rows, cols] = pieces[:, 4 * h:4 * h + 4]
            Bb, Bs = tf32(sm[int(b_big) + b_at]), tf32(sm[int(b_small) + b_at])
            w, (r, k) = lane // 32, divmod(lane % 32, 4)
            for m in range(MT):
                Ab, As = tf32(A[m, 0]), tf32(A[m, 1])
                D = As @ Bb + Ab @ Bs + Ab @ Bb
                for n in range(NN):
                    for i in range(4):
                        d = D[16 * w + r + 8 * (i // 2), 8 * n + 2 * k + i % 2]
                        acc[m, n, i] = np.float32(acc[m, n, i] + d)

        return product
else:
    @intrinsic
    def fence_proxy_async(typingctx):
        """fence.proxy.async.shared::cta: my shared-memory stores made visible to wgmma."""
        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []),
                               "fence.proxy.async.shared::cta;", "~{memory}", side_effect=True)
            builder.call(asm, [])
            return context.get_dummy_value()

        return types.none(), codegen

    @functools.cache
    def wgmma_tf32x3(MT: int, NN: int):
        """The warpgroup's 3xTF32 product acc[m] += A_m · B for m < MT, B 8 x 8·NN (glossary
        above)."""
        X = 4 * NN * MT  # accumulators a thread
        shape = f"m64n{8 * NN}k8"
        A0, DB = 2 * X, 2 * X + 8 * MT  # first A piece, descriptors (big, small), then 1
        lines = [".reg .pred p;", f"setp.ne.b32 p, ${DB + 2}, 0;", "wgmma.fence.sync.aligned;"]
        for m in range(MT):
            acc = ", ".join(f"${m * 4 * NN + j}" for j in range(4 * NN))
            big = ", ".join(f"${A0 + 8 * m + j}" for j in range(4))
            small = ", ".join(f"${A0 + 8 * m + 4 + j}" for j in range(4))
            for a, b in ((small, DB), (big, DB + 1), (big, DB)):  # small terms first
                lines.append(f"wgmma.mma_async.sync.aligned.{shape}.f32.tf32.tf32 {{{acc}}}, "
                             f"{{{a}}}, ${b}, p, 1, 1;")
        lines += ["wgmma.commit_group.sync.aligned;", "wgmma.wait_group.sync.aligned 0;"]
        text = "{\n\t" + "\n\t".join(lines) + "\n\t}"
        constraints = ",".join(["=f"] * X + [str(j) for j in range(X)] + ["r"] * (8 * MT)
                               + ["l", "l", "r"] + ["~{memory}"])
        fixed = ((WGMMA_LBO >> 4) << 16) | ((WGMMA_SBO >> 4) << 32)  # no swizzle, base 0

        @intrinsic
        def product(typingctx, acc, af, sm, b_big, b_small):
            def codegen(context, builder, sig, args):
                f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
                accp, afp, smp = (context.make_array(t)(context, builder, a).data
                                  for t, a in zip(sig.args[:3], args[:3], strict=True))
                cvta = ir.InlineAsm(ir.FunctionType(i64, [i64]), "cvta.to.shared.u64 $0, $1;",
                                    "=l,l")

                def descriptor(i):  # B's 64-bit shared-memory matrix descriptor
                    off = context.cast(builder, args[i], sig.args[i], types.uint64)
                    s = builder.call(cvta, [builder.ptrtoint(builder.gep(smp, [off]), i64)])
                    s = builder.lshr(builder.and_(s, ir.Constant(i64, 0x3FFFF)),
                                     ir.Constant(i64, 4))
                    return builder.or_(s, ir.Constant(i64, fixed))

                ptrs = [builder.gep(accp, [ir.Constant(i64, j)]) for j in range(X)]
                ins = [builder.load(p) for p in ptrs]
                ins += [builder.bitcast(builder.load(builder.gep(afp, [ir.Constant(i64, j)])),
                                        i32) for j in range(8 * MT)]
                ins += [descriptor(3), descriptor(4), ir.Constant(i32, 1)]
                asm = ir.InlineAsm(
                    ir.FunctionType(ir.LiteralStructType([f32] * X),
                                    [f32] * X + [i32] * (8 * MT) + [i64, i64, i32]),
                    text, constraints, side_effect=True)
                d = builder.call(asm, ins)
                for j, p in enumerate(ptrs):
                    builder.store(builder.extract_value(d, j), p)
                return context.get_dummy_value()

            return types.none(acc, af, sm, b_big, b_small), codegen

        return product


# =============================================================================================
# CUDA: thread-block clusters (sm_90 and later) as inline PTX
# =============================================================================================
# A cluster is a group of blocks launched together on one GPC; each block can read the others'
# shared memory ("distributed shared memory"). Two intrinsics:
#   cluster_sync()              barrier.cluster.arrive + wait: every thread of every block of
#                               the cluster arrives before any goes on; shared-memory writes
#                               before it are visible to the whole cluster after it (release /
#                               acquire, the PTX defaults). A block must not exit while others
#                               may still read its shared memory: end with one.
#   cluster_load(a, i, rank)    a[i] of block ``rank``'s copy of the float32 shared array a:
#                               mapa.shared::cluster maps my shared address to rank's, and
#                               ld.shared::cluster reads it.
# They have no simulator twins: the simulator runs blocks one after another, so a cluster
# cannot be simulated as blocks; kernels that use them emulate a cluster as one block there
# (kernels/monarch/cuda.py).

if cuda_simulated():
    def cluster_sync():
        raise RuntimeError("cluster_sync: thread-block clusters need a GPU (sm_90 or later); "
                           "the simulator cannot run them")

    def cluster_load(ary, idx, rank):
        raise RuntimeError("cluster_load: thread-block clusters need a GPU (sm_90 or later); "
                           "the simulator cannot run them")
else:
    @intrinsic
    def cluster_sync(typingctx):
        """barrier.cluster.arrive; barrier.cluster.wait: all threads of the cluster meet."""
        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []),
                               "barrier.cluster.arrive.aligned;\n\tbarrier.cluster.wait.aligned;",
                               "~{memory}", side_effect=True)
            builder.call(asm, [])
            return context.get_dummy_value()

        return types.none(), codegen

    @intrinsic
    def cluster_load(typingctx, ary, idx, rank):
        """ary[idx] of the cluster's block ``rank`` (ary: a float32 shared array)."""
        def codegen(context, builder, sig, args):
            aryty = sig.args[0]
            arr = context.make_array(aryty)(context, builder, args[0])
            i = context.cast(builder, args[1], sig.args[1], types.intp)
            ptr = cgutils.get_item_pointer(context, builder, aryty, arr, [i], wraparound=False)
            i64, i32 = ir.IntType(64), ir.IntType(32)
            asm = ir.InlineAsm(
                ir.FunctionType(ir.FloatType(), [i64, i32]),
                "{\n\t.reg .u64 %ga;\n\t.reg .u32 %sa;\n\tcvta.to.shared.u64 %ga, $1;"
                "\n\tcvt.u32.u64 %sa, %ga;\n\tmapa.shared::cluster.u32 %sa, %sa, $2;"
                "\n\tld.shared::cluster.f32 $0, [%sa];\n\t}",
                "=f,l,r", side_effect=True)
            rk = context.cast(builder, args[2], sig.args[2], types.uint32)
            return builder.call(asm, [builder.ptrtoint(ptr, i64), rk])

        return types.float32(ary, idx, rank), codegen
