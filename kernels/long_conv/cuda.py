"""The causal convolution's CUDA kernels (numba.cuda) and their host launchers, the only place
that knows grid and block: the direct loop (one thread per output) and the fused FFT
convolution (one block per row, the row's spectrum in shared memory). The equations and the
glossary: kernels/long_conv/__init__.py.

References for the FFT kernel: Stockham's autosort FFT as laid out for GPUs by Govindaraju et
al., "High performance discrete Fourier transforms on graphics processors" (SC 2008), section
4 (radix-R passes, one butterfly per thread, twiddles e^{−2πi·(j mod Ns)·r/(Ns·R)}); the real
FFT as a half-length complex FFT: Cooley, Lewis & Welch, "The fast Fourier transform algorithm:
programming considerations in the calculation of sine, cosine and Laplace transforms" (J. Sound
Vib., 1970); Fu, Kumbong, Nguyen & Ré, "FlashFFTConv: efficient convolutions for long sequences
with tensor cores" (2023), section 3 (a fused FFT convolution keeps the row on chip)."""

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

THREADS = 8 if cuda_simulated() else 256  # CUDA: outputs (time steps) per block
# The fused FFT kernel: the largest FFT length N per dtype (the row's spectrum, M = N/2 complex
# numbers plus one pad word per 32, must fit the 48 KB of static shared memory: 33.8 KB at
# these sizes) and the smallest (the real-FFT split needs M >= 2)
FFT_MAX_N = {np.dtype(np.float32): 8192, np.dtype(np.float64): 4096}
FFT_MIN_N = 4


# =============================================================================================
# CUDA kernels (numba.cuda). Forward: one thread per output y[b, c, t], blocks of THREADS
# consecutive t of one row (grid (b·c, ceil(l / THREADS))). At tap j the warp reads the single
# number k[c, j] (a broadcast) and u[b, c, t − j] for consecutive t (one coalesced load), so
# neighbouring threads share every cache line of u. The filter's gradient: one thread per
# (c, j), summing g[b, c, t]·u[b, c, t − j] over b and t (coalesced across j for each t).
# =============================================================================================


@functools.cache
def _conv_kernels(dtype: np.dtype):
    """Compile-once (per dtype) forward and filter-gradient kernels."""
    zero = dtype.type(0)

    @cuda.jit
    def fwd(u, k, D, y):
        # [core] causal_conv_cuda
        t = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        row = cuda.blockIdx.x
        channels, l = u.shape[1], u.shape[2]
        b, c = row // channels, row % channels
        if t < l:
            acc = D[c] * u[b, c, t]  # the skip term
            for j in range(min(t + 1, k.shape[1])):  # taps 0 .. min(t, lk − 1)
                acc += k[c, j] * u[b, c, t - j]
            y[b, c, t] = acc
        # [/core]

    @cuda.jit
    def filter_grad(u, g, gk):
        m = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        batch, channels, l = u.shape
        lk = gk.shape[1]
        if m < channels * lk:
            c, j = m // lk, m % lk
            acc = zero
            for b in range(batch):
                for t in range(j, l):
                    acc += g[b, c, t] * u[b, c, t - j]
            gk[c, j] = acc

    return fwd, filter_grad


def _fwd_cuda(u, k, D, y=None):
    """u (b, c, l), k (c, lk), D (c,) contiguous -> y (b, c, l)."""
    y = torch.empty_like(u) if y is None else y
    batch, channels, l = u.shape
    if u.numel():
        fwd, _ = _conv_kernels(numpy_dtype(u.dtype))
        launch(fwd, (batch * channels, (l + THREADS - 1) // THREADS), THREADS, u, k, D, y)
    return y


def _filter_grad_cuda(u, g, lk):
    """-> gk (c, lk): gk[c, j] = Σ_b Σ_t g[b, c, t]·u[b, c, t − j]."""
    gk = u.new_zeros(u.shape[1], lk)
    if u.numel():
        _, filter_grad = _conv_kernels(numpy_dtype(u.dtype))
        n = u.shape[1] * lk
        launch(filter_grad, (n + THREADS - 1) // THREADS, THREADS, u, g, gk)
    return gk


# =============================================================================================
# Fused FFT convolution (numba.cuda): one block per row (b, h), the whole row on chip.
#
# y = irfft(rfft(u, N) · 2N·K_f)[:l] with K_f = (rfft(k, N) + D) / 2N, N = 2M a power of two
# >= l + lk − 1. A real N-point transform is one complex M-point FFT of z_n = u_2n + i·u_{2n+1}
# plus a split of Z into the spectra of the even and odd samples (and the reverse merge before
# the inverse), so a row is M complex numbers: 32 KB in float32 at N = 8192, inside the 48 KB of
# static shared memory (float64: N <= 4096). The spectrum lives in two shared planes (real and
# imaginary parts: 4-byte words, so a warp reading 32 consecutive numbers is one conflict-free
# wavefront), with one pad word per 32 (number i at i + i // 32) so that the stride-R writes of
# a pass land in distinct banks.
#
# Both transforms are Stockham passes of radix R (16, or 8, 4, 2 to finish off M: ``fft_plan``).
# A thread owns one butterfly per pass: it reads its R inputs at stride M/R (coalesced),
# multiplies them by twiddles (a table in global memory, computed once in float64 and rounded,
# read coalesced through L1), does an R-point FFT in registers (radix-2 decimation in
# frequency, fully unrolled: every index is a constant, the outputs land in bit-reversed
# registers), waits for the block (each pass works in place), and writes its R outputs. The
# first forward pass reads u from device memory instead of shared memory and the last inverse
# pass writes y, so u and y cross device memory once each. The middle is fused: a thread
# finishes the forward FFT's last pass for two columns whose entries pair up as k and M − k,
# splits, multiplies by K_f, merges, and starts the inverse FFT's first pass on the same
# registers, with no shared-memory round trip. The inverse is the same forward FFT applied to
# V = conj(Z')/M, since FFT(conj(Z')/M) = conj(IFFT(Z')): one pass routine serves both.
#
# At N = 8192 (M = 4096, plan 16·16·16): 256 threads, 8 barriers, 4 pass reads and 4 pass
# writes of the 32 KB spectrum, ~20 000 warp instructions per row (SASS: ~350 per thread and
# radix-16 pass, ~2 250 for both paths of the middle), 128 registers (2 blocks, 16 warps per
# SM). The grid is b·h blocks in channel-major order (block x = h·b_total + b), so the blocks
# that share one K_f[h] run together and find it in L2. kernels/BENCHMARKS.md (causal_conv)
# has the floors and the predicted time.
# =============================================================================================


def fft_plan(M: int) -> tuple[int, ...]:
    """The radices of an M-point FFT (M a power of two, 2 <= M <= 4096), forward order: as few
    passes as radix 16 allows, the radices as equal as possible, the largest last (the fused
    middle pass holds two columns of the last radix in registers). 4096 -> (16, 16, 16),
    2048 -> (8, 16, 16), 512 -> (8, 8, 8), 32 -> (4, 8)."""
    m = M.bit_length() - 1
    if M < 2 or M != 1 << m or m > 12:
        raise ValueError(f"fft_plan: M must be a power of two in 2 .. 4096, got {M}")
    passes = -(-m // 4)
    logs = [m // passes + (i >= passes - m % passes) for i in range(passes)]
    return tuple(1 << e for e in logs)


def _passes(M: int):
    """(R, Ns) of each forward pass and of each inverse pass (Ns: the points already merged by
    the previous passes, the twiddles' period), for ``fft_plan(M)``; the inverse runs the
    radices in reverse order, so its first pass has the forward's last radix."""
    plan = fft_plan(M)
    fwd = [(R, int(np.prod(plan[:s], dtype=np.int64))) for s, R in enumerate(plan)]
    rev = plan[::-1]
    inv = [(R, int(np.prod(rev[:q], dtype=np.int64))) for q, R in enumerate(rev)]
    return fwd, inv


def _twiddle_layout(M: int):
    """The twiddle table's layout: ({(R, Ns): offset}, pair, length). The block of a pass with
    twiddles (Ns > 1) holds w[offset + (r − 1)·Ns + q] = e^{−2πi·q·r/(Ns·R)} (r = 1..R−1,
    q = 0..Ns−1: consecutive threads read consecutive words); the middle pass's
    e^{−2πi·k/N}, k = 0..M−1, start at ``pair``."""
    fwd, inv = _passes(M)
    blocks, size = {}, 0
    for R, Ns in fwd + inv:
        if Ns > 1 and (R, Ns) not in blocks:
            blocks[R, Ns] = size
            size += (R - 1) * Ns
    return blocks, size, size + M


@functools.cache
def _twiddle_table(M: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The twiddle table of ``_twiddle_layout`` (complex of ``dtype``'s precision, on
    ``device``), computed in float64 and rounded once."""
    blocks, pair, size = _twiddle_layout(M)
    turns = torch.empty(size, dtype=torch.float64)  # the angles in turns, exact fractions
    for (R, Ns), off in blocks.items():
        q = torch.arange(Ns, dtype=torch.float64)
        r = torch.arange(1, R, dtype=torch.float64)[:, None]
        turns[off:off + (R - 1) * Ns] = (q * r / (Ns * R)).reshape(-1)
    turns[pair:] = torch.arange(M, dtype=torch.float64) / (2 * M)
    w = torch.polar(torch.ones_like(turns), -2 * torch.pi * turns)  # complex128
    ctype = torch.complex64 if dtype == torch.float32 else torch.complex128
    return w.to(ctype).to(device)


def _bit_reversed(R: int) -> tuple[int, ...]:
    bits = R.bit_length() - 1
    return tuple(int(f"{p:0{bits}b}"[::-1], 2) if bits else 0 for p in range(R))


def _offsets(step: int, count: int) -> tuple:
    """The padded distances of entries c = 0, step, .., (count − 1)·step from an entry
    ``base`` of a pass: at(base + c) = at(base) + c + c // 32 for every base and step the
    passes use (both powers of two, and base's low bits never carry into c's), so each shared
    access is a constant offset from one per-thread address."""
    return tuple(np.uint64(c + (c >> 5)) for c in range(0, step * count, step))


@functools.cache
def _fft_conv_kernel(dtype: np.dtype, M: int):
    """The fused kernel for real rows of ``dtype`` and FFT length N = 2M:
    ``kernel(u, Kf, W, y, batch, channels, l)`` with u, y the flat (b·h·l,) rows, Kf the flat
    (h·(M + 1),) scaled half spectra, W the twiddle table; grid b·h blocks of
    ``fft_threads(M)`` threads."""
    ftype = dtype.type
    ctype = np.complex64 if dtype == np.float32 else np.complex128
    U = np.uint64
    zero = ftype(0)
    fwd, inv = _passes(M)
    blocks, PAIR, _ = _twiddle_layout(M)
    P = len(fwd)
    RL = fwd[-1][0]  # the middle pass's radix
    C = M // RL  # its columns: Z[col + r·C], r = 0..RL−1
    ITEMS = max(C // 2, 1)  # its work items: column pairs (t, C − t), and (0, C/2)
    T = fft_threads(M)
    ZERO = U(ITEMS if T > ITEMS else 0)  # the thread of item 0
    WORDS = M + M // 32  # one shared plane, one pad word per 32
    uM = U(M)
    # device functions inlined by NVVM (each pass routine is called once, and the local arrays
    # they share must become registers); FMA contraction allowed
    DEVICE = {} if cuda_simulated() else {"forceinline": True, "fastmath": {"contract"}}

    @cuda.jit(device=True, **DEVICE)
    def at(i):  # the padded position of spectrum entry i
        return i + (i >> U(5))

    @cuda.jit(device=True, **DEVICE)
    def cplx(re, im):
        return ctype(complex(re, im))

    @cuda.jit(device=True, **DEVICE)
    def times_i(z):  # i·z
        return cplx(-z.imag, z.real)

    @cuda.jit(device=True, **DEVICE)
    def mul(a, b):  # a·b, written out so that the compiler fuses it into 2 mul + 2 fma
        return cplx(a.real * b.real - a.imag * b.imag, a.real * b.imag + a.imag * b.real)

    def make_dft(R):
        """In-place R-point DFT X_s = Σ_r v_{o+r} e^{−2πi·rs/R} of v[o:o+R], a local array:
        radix-2 decimation in frequency (one butterfly layer, then the two halves), so X_s
        ends in register o + REV[s] (bit-reversed order). Unrolled by the compiler: every
        index and twiddle is a constant."""
        HALF = R // 2
        TW = tuple(ctype(np.exp(-2j * np.pi * i / R)) for i in range(HALF))
        half_dft = make_dft(HALF) if HALF > 1 else None

        @cuda.jit(device=True, **DEVICE)
        def dft(v, o):
            for i in range(HALF):
                t = v[o + i] - v[o + i + HALF]
                v[o + i] = v[o + i] + v[o + i + HALF]
                if i == 0:
                    v[o + i + HALF] = t
                elif 4 * i == R:
                    v[o + i + HALF] = cplx(t.imag, -t.real)  # W_R^{R/4} = −i
                else:
                    v[o + i + HALF] = mul(t, TW[i])
            if HALF > 1:
                half_dft(v, o)
                half_dft(v, o + HALF)
        return dft

    @cuda.jit(device=True, **DEVICE)
    def load_u(u, row, l, n2):
        """z_n = u_2n + i·u_{2n+1} of row ``row`` (zero past its end l), n2 = 2n."""
        return cplx(u[row * l + n2] if n2 < l else zero,
                    u[row * l + n2 + U(1)] if n2 + U(1) < l else zero)

    @cuda.jit(device=True, **DEVICE)
    def store_y(y, row, l, n2, z):
        """y_2n = Re z, y_{2n+1} = −Im z (z = conj(z'_n), see the inverse), n2 = 2n."""
        if n2 < l:
            y[row * l + n2] = z.real
        if n2 + U(1) < l:
            y[row * l + n2 + U(1)] = -z.imag

    def make_pass(R, Ns, source, sink):
        """One Stockham pass of radix R after Ns points merged (Ns = 1: no twiddles). Butterfly
        j reads x[j + r·M/R] (from u when ``source`` is "u", else shared), twiddles input r by
        e^{−2πi·(j mod Ns)·r/(Ns·R)}, transforms, and writes output s to position
        (j − j mod Ns)·R + j mod Ns + s·Ns (shared, or y when ``sink`` is "y")."""
        dft, REV = make_dft(R), _bit_reversed(R)
        STRIDE = M // R
        FROM_U, TO_Y = source == "u", sink == "y"
        GATHER = _offsets(STRIDE, R)  # shared: at(j + r·STRIDE) − at(j)
        SCATTER = tuple(_offsets(Ns, R)[REV[p]] for p in range(R))  # register p: output REV[p]
        U_GATHER = tuple(U(2 * r * STRIDE) for r in range(R))  # u: 2·(n − j)
        Y_SCATTER = tuple(U(2 * REV[p] * Ns) for p in range(R))  # y (Ns = M/R, base j)
        TW_AT = U(blocks.get((R, Ns), 0))
        uNs, uR = U(Ns), U(R)

        @cuda.jit(device=True, **DEVICE)
        def stage(u, Kf, W, y, re, im, row, h, l):
            j = U(cuda.threadIdx.x)
            v = cuda.local.array(R, ctype)
            active = j < U(STRIDE)
            q = j & (uNs - U(1))
            if active:
                if FROM_U:
                    for r in range(R):
                        v[r] = load_u(u, row, l, U(2) * j + U_GATHER[r])
                else:
                    for r in range(R):
                        v[r] = cplx(re[at(j) + GATHER[r]], im[at(j) + GATHER[r]])
                if Ns > 1:
                    for r in range(1, R):
                        v[r] = mul(v[r], W[TW_AT + U((r - 1) * Ns) + q])
                dft(v, 0)
            if not FROM_U:
                cuda.syncthreads()  # every read of this pass is done: write in place
            if active:
                base = at((j - q) * uR + q)
                for p in range(R):
                    if TO_Y:
                        store_y(y, row, l, U(2) * j + Y_SCATTER[p], v[p])
                    else:
                        re[base + SCATTER[p]] = v[p].real
                        im[base + SCATTER[p]] = v[p].imag
            if not TO_Y:
                cuda.syncthreads()
        return stage

    @cuda.jit(device=True, **DEVICE)
    def split_multiply_merge(Z, Zm, Ka, Kb, w):
        """From Z_k and Z_{M−k} of z's M-point FFT to the inverse FFT's inputs V_k, V_{M−k}
        (w = e^{−2πi·k/N}, Ka = K_f[k], Kb = K_f[M − k], scaled by 1/2N):
            X_k = (E + w·O)/2 and conj(X_{M−k}) = (E − w·O)/2 with E = Z_k + conj(Z_{M−k}),
            O = −i·(Z_k − conj(Z_{M−k})) (the even and odd samples' spectra, times 2);
            Y = K_f·X;  Y_e = (Y_k + conj(Y_{M−k}))/2, Y_o = (Y_k − conj(Y_{M−k}))·conj(w)/2;
            Z'_k = Y_e + i·Y_o (the spectrum of y_2n + i·y_{2n+1}),
            Z'_{M−k} = conj(Y_e) + i·conj(Y_o);
            V = conj(Z')/M, so that the forward FFT of V is conj(z')."""
        Zc = Zm.conjugate()
        E = Z + Zc
        O = cplx((Z - Zc).imag, -(Z - Zc).real)
        wO = mul(w, O)
        Y = mul(Ka, E + wO)
        Ym = mul(Kb.conjugate(), E - wO)
        Ye = Y + Ym
        iYo = times_i(mul(Y - Ym, w.conjugate()))
        return (Ye + iYo).conjugate(), Ye - iYo

    def make_middle(source, sink):
        """The forward FFT's last pass (radix RL, Ns = C) for a pair of columns, the split,
        product and merge, and the inverse FFT's first pass (radix RL, Ns = 1) for the same
        columns. Item t > 0 (thread t) owns columns t and C − t: Z_{t + r·C} pairs with
        Z_{M − t − r·C} = Z_{(C − t) + (RL − 1 − r)·C}. Item 0 owns column 0 (Z_{r·C} pairs with
        Z_{(RL − r)·C}; k = 0 with K_f[M], the Nyquist bin) and column C/2 (with itself,
        reversed); thread ITEMS runs it when the block has that thread (its code differs, so a
        warp of its own does not run both)."""
        dft, REV = make_dft(RL), _bit_reversed(RL)
        FROM_U, TO_Y = source == "u", sink == "y"
        GATHER = _offsets(C, RL)  # at(col + r·C) − at(col)
        SCATTER = tuple(_offsets(1, RL)[REV[p]] for p in range(RL))  # at(col·RL + s) − at(col·RL)
        U_GATHER = tuple(U(2 * r * C) for r in range(RL))
        Y_SCATTER = tuple(U(2 * REV[p]) for p in range(RL))
        COLUMN = tuple(U(r * C) for r in range(RL))  # k − col
        TW_AT = U(blocks.get((RL, C), 0))
        uC, uRL, uPAIR = U(C), U(RL), U(PAIR)

        @cuda.jit(device=True, **DEVICE)
        def load_column(u, W, re, im, row, l, col, v):
            for r in range(RL):
                if FROM_U:
                    v[r] = load_u(u, row, l, U(2) * col + U_GATHER[r])
                else:
                    v[r] = cplx(re[at(col) + GATHER[r]], im[at(col) + GATHER[r]])
            if C > 1:
                for r in range(1, RL):
                    v[r] = mul(v[r], W[TW_AT + U((r - 1) * C) + col])
            dft(v, 0)

        @cuda.jit(device=True, **DEVICE)
        def store_column(y, re, im, row, l, col, v):
            base = col * uRL
            for p in range(RL):
                if TO_Y:
                    store_y(y, row, l, U(2) * base + Y_SCATTER[p], v[p])
                else:
                    re[at(base) + SCATTER[p]] = v[p].real
                    im[at(base) + SCATTER[p]] = v[p].imag

        def unrolled(make_step, n):
            """Steps make_step(0) .. make_step(n − 1) in sequence, each with its index a
            constant (a binary tree of calls, inlined: no loop left for the compiler to keep)."""
            if n == 1:
                return make_step(0)
            first, rest = unrolled(make_step, n // 2), unrolled(lambda r: make_step(r + n // 2),
                                                              n - n // 2)

            @cuda.jit(device=True, **DEVICE)
            def both(Kf, W, za, zb, va, vb, ka, kb, ca):
                first(Kf, W, za, zb, va, vb, ka, kb, ca)
                rest(Kf, W, za, zb, va, vb, ka, kb, ca)
            return both

        def pair_columns(r):
            """Item t > 0, k = t + r·C: Z_k is za's, Z_{M−k} zb's entry RL − 1 − r."""
            A, B, K = REV[r], REV[RL - 1 - r], COLUMN[r]

            @cuda.jit(device=True, **DEVICE)
            def step(Kf, W, za, zb, va, vb, ka, kb, ca):
                va[r], vb[RL - 1 - r] = split_multiply_merge(za[A], zb[B], Kf[ka + K], Kf[kb - K],
                                                             W[uPAIR + ca + K])
            return step

        def pair_column_0(r):
            """Item 0, k = r·C (r = 0 .. RL/2): Z_{M−k} is za's entry (RL − r) mod RL; k = 0
            pairs with K_f[M] (the Nyquist bin), k = M/2 with itself."""
            rm = (RL - r) % RL
            A, B, K = REV[r], REV[rm], COLUMN[r]

            @cuda.jit(device=True, **DEVICE)
            def step(Kf, W, za, zb, va, vb, ka, kb, ca):
                Vk, Vm = split_multiply_merge(za[A], za[B], Kf[ka + K], Kf[kb - K], W[uPAIR + K])
                va[rm] = Vm
                va[r] = Vk  # last: k = 0 and k = M/2 keep their own
            return step

        def pair_column_half(r):
            """Item 0, k = C/2 + r·C (r < RL/2): Z_{M−k} is zb's entry RL − 1 − r."""
            A, B, K = REV[r], REV[RL - 1 - r], U(C // 2) + COLUMN[r]

            @cuda.jit(device=True, **DEVICE)
            def step(Kf, W, za, zb, va, vb, ka, kb, ca):
                vb[r], vb[RL - 1 - r] = split_multiply_merge(zb[A], zb[B], Kf[ka + K], Kf[kb - K],
                                                             W[uPAIR + K])
            return step

        pairs = unrolled(pair_columns, RL)
        pairs_0 = unrolled(pair_column_0, RL // 2 + 1)
        pairs_half = unrolled(pair_column_half, RL // 2) if C > 1 else None

        @cuda.jit(device=True, **DEVICE)
        def middle(u, Kf, W, y, re, im, row, h, l):
            t = U(cuda.threadIdx.x)
            za = cuda.local.array(RL, ctype)  # column ca: the forward spectrum, bit-reversed
            zb = cuda.local.array(RL, ctype)  # column cb
            va = cuda.local.array(RL, ctype)  # column ca: the inverse's input, natural order
            vb = cuda.local.array(RL, ctype)
            first = t == ZERO  # item 0, in a warp of its own where the block has one spare
            active = first or (U(0) < t < U(ITEMS))
            if active:
                ca = U(0) if first else t
                cb = uC // U(2) if first else uC - t
                ka = h * (uM + U(1)) + ca  # K_f[h, k] for k = ca + r·C
                kb = h * (uM + U(1)) + uM - ca  # K_f[h, M − k]
                load_column(u, W, re, im, row, l, ca, za)
                if C > 1:
                    load_column(u, W, re, im, row, l, cb, zb)
                if first:
                    pairs_0(Kf, W, za, zb, va, vb, ka, kb, ca)
                    if C > 1:
                        pairs_half(Kf, W, za, zb, va, vb, ka, kb, ca)
                else:
                    pairs(Kf, W, za, zb, va, vb, ka, kb, ca)
                dft(va, 0)
                if C > 1:
                    dft(vb, 0)
            if not FROM_U:
                cuda.syncthreads()
            if active:
                store_column(y, re, im, row, l, ca, va)
                if C > 1:
                    store_column(y, re, im, row, l, cb, vb)
            if not TO_Y:
                cuda.syncthreads()
        return middle

    def then(first, second):
        @cuda.jit(device=True, **DEVICE)
        def both(u, Kf, W, y, re, im, row, h, l):
            first(u, Kf, W, y, re, im, row, h, l)
            second(u, Kf, W, y, re, im, row, h, l)
        return both

    # the pipeline: forward passes 0 .. P−2, the middle, inverse passes 1 .. P−1
    run = make_middle("u" if P == 1 else "shared", "y" if P == 1 else "shared")
    for s in range(P - 2, -1, -1):
        run = then(make_pass(*fwd[s], "u" if s == 0 else "shared", "shared"), run)
    for q in range(1, P):
        run = then(run, make_pass(*inv[q], "shared", "y" if q == P - 1 else "shared"))

    # registers: at most 128 per float32 thread, 255 per float64 thread, so that 16 or 8 warps
    # share an SM; the radix-16 middle pass holds 64 numbers per thread (ptxas at M = 4096,
    # float32: 128 registers, 8 bytes spilled; at M = 2048, float64: 255, none)
    BLOCKS = max(1, min(32, (16 if dtype == np.float32 else 8) // -(-T // 32)))
    options = {} if cuda_simulated() else {"launch_bounds": (T, BLOCKS),
                                           "fastmath": {"contract"}}

    @cuda.jit(**options)
    def fft_conv(u, Kf, W, y, batch, channels, l):
        # [core] fused FFT convolution
        re = cuda.shared.array(WORDS, ftype)  # the row's spectrum, real parts
        im = cuda.shared.array(WORDS, ftype)  # imaginary parts
        x = U(cuda.blockIdx.x)  # channel-major: x = h·batch + b
        h, b = x // U(batch), x % U(batch)
        run(u, Kf, W, y, re, im, b * U(channels) + h, h, U(l))
        # [/core]

    return fft_conv


def fft_threads(M: int) -> int:
    """Threads per block for an M-point plan: one per butterfly of its smallest radix."""
    return M // min(fft_plan(M))


def _fft_conv_cuda(u, Kf, y=None):
    """u (b, h, l) contiguous real, Kf (h, M + 1) contiguous complex: the filter's half
    spectrum (rfft at N = 2M, plus D) divided by 2N -> y (b, h, l) = irfft(rfft(u, N)·2N·Kf)[:l]."""
    y = torch.empty_like(u) if y is None else y
    batch, channels, l = u.shape
    M = Kf.shape[1] - 1
    if u.numel():
        kernel = _fft_conv_kernel(numpy_dtype(u.dtype), M)
        W = _twiddle_table(M, u.dtype, u.device)
        launch(kernel, batch * channels, fft_threads(M), u.view(-1), Kf.view(-1), W,
               y.view(-1), batch, channels, l)
    return y
