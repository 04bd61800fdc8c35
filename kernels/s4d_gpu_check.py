"""Check and time the S4D kernel on a real GPU: ``python kernels/s4d_gpu_check.py``.

1. cuda against the float64 reference (relative error max |K − K64| / max |K64|) at small and
   odd sizes, complex64 and complex128, including L = 1 and L = 4096;
2. times s4d_kernel(backend="cuda") at (h, n, L) = (1536, 32, 4096) complex64 (target: under
   0.2 ms) with CUDA events after a warm-up, next to the torch reference on the same GPU.
"""

import math

import torch

from minimodels.bench import timeit
from minimodels.kernels.ssm_kernel import ITEMS, THREADS, s4d_kernel, s4d_kernel_ref

REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def inputs(h, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(n, dtype=torch.float64)
    A = torch.complex(torch.full((h, n), -0.5, dtype=torch.float64), math.pi * k.repeat(h, 1))
    C = torch.randn(h, n, dtype=torch.complex128, generator=g)
    u = torch.rand(h, generator=g, dtype=torch.float64)
    dt = torch.exp(math.log(1e-3) + u * (math.log(1e-1) - math.log(1e-3)))
    return A.to("cuda", dtype), C.to("cuda", dtype), dt.to("cuda", REAL[dtype])


def rel_error(K, A, C, dt, L):
    want = s4d_kernel_ref(A.cpu().to(torch.complex128), C.cpu().to(torch.complex128),
                          dt.cpu().double(), L)
    return ((K.cpu().double() - want).abs().max() / want.abs().max()).item()


def main():
    print(f"GPU: {torch.cuda.get_device_name()}; THREADS={THREADS}, ITEMS={ITEMS}")
    ok = True
    for dtype, tol in [(torch.complex64, 1e-4), (torch.complex128, 1e-10)]:
        for h, n, L in [(1, 1, 1), (3, 5, 37), (7, 70, 1000), (16, 32, 4096), (4, 64, 16384)]:
            A, C, dt = inputs(h, n, dtype)
            K = s4d_kernel(A, C, dt, L, backend="cuda")
            assert K.dtype == REAL[dtype] and K.shape == (h, L) and K.is_cuda
            err = rel_error(K, A, C, dt, L)
            ok &= err < tol
            print(f"{str(dtype)[6:]:>10} (h, n, L) = {(h, n, L)}: rel. error {err:.1e} "
                  f"{'ok' if err < tol else 'FAIL'} (< {tol:g})")
    h, n, L = 1536, 32, 4096
    A, C, dt = inputs(h, n, torch.complex64)
    K = s4d_kernel(A, C, dt, L, backend="cuda")
    err = rel_error(K[:64], A[:64], C[:64], dt[:64], L)
    t_cuda = 1e3 * timeit(lambda: s4d_kernel(A, C, dt, L, backend="cuda"), device="cuda",
                          warmup=10, repeat=200)
    t_ref = 1e3 * timeit(lambda: s4d_kernel(A, C, dt, L, backend="ref"), device="cuda",
                         repeat=20)
    print(f"\n(1536, 32, 4096) complex64: cuda kernel {t_cuda:.3f} ms (target < 0.2 ms, "
          f"{'met' if t_cuda < 0.2 else 'NOT met'}), torch reference {t_ref:.3f} ms, "
          f"speed-up {t_ref / t_cuda:.0f}x, rel. error (first 64 channels) {err:.1e}")
    print("all checks passed" if ok else "SOME CHECKS FAILED")


if __name__ == "__main__":
    main()
