"""Check and time the numba.cuda WKV kernels on a real GPU (run it on the H200):

    python kernels/wkv_gpu_check.py

1. correctness of the forward against ``wkv_ref`` (computed on the CPU in float64) in float64
   and float32, on random inputs with |k| up to 40, lengths off the ITEMS chunk, and state
   resumption (two calls = one call); the backward kernel against autograd of the reference;
2. time of the forward at (1, 4096, 2048) float32 (target: < 3.5 ms) and the backward, and a
   batch sweep b = 1, 2, 4, 8, 16 at (b, 4096, 2048) as multiples of the memory floor (read k,
   v; write y, over the measured device copy bandwidth), with flash-linear-attention's Triton
   ``fused_recurrent_rwkv4`` beside it when ``fla`` is importable (0.1.2 has it; its one file
   ``fla/ops/rwkv4/fused_recurrent.py`` plus empty package ``__init__``s on PYTHONPATH suffice,
   which is how it was carried to the H200).
"""

import torch

from minimodels.bench import copy_bandwidth, gpu_time, timeit
from minimodels.kernels.wkv import MIN_LOG, wkv, wkv_ref

assert torch.cuda.is_available(), "needs a CUDA GPU"
dev = torch.device("cuda")
g = torch.Generator().manual_seed(0)


def inputs(b, l, c, k_max=40.0):
    w = torch.rand(c, generator=g, dtype=torch.float64) * 3
    u = torch.randn(c, generator=g, dtype=torch.float64)
    k = (torch.rand(b, l, c, generator=g, dtype=torch.float64) * 2 - 1) * k_max
    v = torch.randn(b, l, c, generator=g, dtype=torch.float64)
    return w, u, k, v


# 1. correctness ------------------------------------------------------------------------------
for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
    for b, l, c, k_max in [(1, 1, 1, 1), (2, 37, 19, 5), (3, 200, 130, 40), (2, 1001, 64, 40)]:
        w, u, k, v = inputs(b, l, c, k_max)
        want = wkv_ref(w, u, k, v)
        got = wkv(*(x.to(dev, dtype) for x in (w, u, k, v)), backend="cuda").cpu().double()
        err = (got - want).abs().max().item()
        assert torch.isfinite(got).all() and err < tol, (dtype, b, l, c, err)
        # state resumption: the first 2/5 of the sequence, then the rest from the state
        cut = max(1, 2 * l // 5)
        a = [x.to(dev, dtype) for x in (w, u, k, v)]
        y1, s = wkv(a[0], a[1], a[2][:, :cut], a[3][:, :cut], return_state=True, backend="cuda")
        y2 = wkv(a[0], a[1], a[2][:, cut:], a[3][:, cut:], state=s, backend="cuda")
        whole = wkv(*a, backend="cuda")
        assert torch.equal(torch.cat([y1, y2], 1), whole), ("resume", dtype, b, l, c)
        print(f"forward {str(dtype)[6:]:8s} ({b}, {l}, {c}) |k| <= {k_max:g}: max err "
              f"{err:.1e}; resumed = one call: True")

w, u, k, v = inputs(2, 300, 48, 10.0)
gy = torch.randn(k.shape, generator=g, dtype=torch.float64)
a_ref = [x.clone().requires_grad_() for x in (w, u, k, v)]
want = torch.autograd.grad(wkv_ref(*a_ref), a_ref, gy)
a_gpu = [x.to(dev).requires_grad_() for x in (w, u, k, v)]
got = torch.autograd.grad(wkv(*a_gpu, backend="cuda"), a_gpu, gy.to(dev))
for name, gw, gg in zip("wukv", want, got, strict=True):
    err = (gg.cpu() - gw).abs().max().item()
    assert err < 1e-9, (name, err)
    print(f"backward d/d{name} float64 vs autograd of the reference: max err {err:.1e}")

# 2. timing -----------------------------------------------------------------------------------
bw = copy_bandwidth("cuda")
print(f"\ndevice copy bandwidth {bw / 1e12:.2f} TB/s ({torch.cuda.get_device_name()})")


def make(b, l=4096, c=2048):
    w = torch.rand(c, device=dev) * 3
    u = torch.randn(c, device=dev)
    k = torch.randn(b, l, c, device=dev)
    v = torch.randn(b, l, c, device=dev)
    return w, u, k, v


w, u, k, v = make(1)
fwd = timeit(lambda: wkv(w, u, k, v, backend="cuda"), device="cuda", warmup=3, repeat=50)
kg, vg = k.clone().requires_grad_(), v.clone().requires_grad_()
wg, ug = w.clone().requires_grad_(), u.clone().requires_grad_()
y = wkv(wg, ug, kg, vg, backend="cuda")
gy = torch.randn_like(y)
bwd = timeit(lambda: torch.autograd.grad(y, (wg, ug, kg, vg), gy, retain_graph=True),
             device="cuda", warmup=3, repeat=50)
floor = 3 * k.numel() * 4 / bw
print(f"(1, 4096, 2048) float32: forward {fwd * 1e3:.3f} ms (target < 3.5 ms; {fwd / floor:.1f}x "
      f"the memory floor {floor * 1e3:.3f} ms); backward {bwd * 1e3:.3f} ms")


# 3. batch sweep, and flash-linear-attention's Triton kernel if it is importable ---------------
# fla's fused_recurrent_rwkv4 takes log w (it decays by e^{-e^w}) and a state (b, 3, 1, c) of
# (a, b, p); it also writes the state of every step (for its backward).
try:
    from fla.ops.rwkv4 import fused_recurrent_rwkv4
except ImportError:
    fused_recurrent_rwkv4 = None
    print("\nflash-linear-attention (fla.ops.rwkv4) not importable: no Triton peer")
print("\n| b | forward ms (wall) | GPU ms | memory floor ms | x floor | fla GPU ms | fla wall ms |"
      " max abs diff |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
for b in (1, 2, 4, 8, 16):
    w, u, k, v = make(b)
    w = w + 0.01  # fla needs log w
    ours = lambda w=w, u=u, k=k, v=v: wkv(w, u, k, v, backend="cuda")  # noqa: E731
    t = timeit(ours, device="cuda", warmup=3, repeat=30)
    floor = 3 * k.numel() * 4 / bw
    row = (f"| {b} | {t * 1e3:.3f} | {gpu_time(ours) * 1e3:.3f} | {floor * 1e3:.3f} | "
           f"{t / floor:.1f} |")
    if fused_recurrent_rwkv4 is not None:
        s0 = torch.zeros(b, 3, 1, k.shape[2], device=dev)
        s0[:, 2] = MIN_LOG

        def fla(w=w, u=u, k=k, v=v, s0=s0):
            return fused_recurrent_rwkv4(torch.log(w), u, k, v, s0)[0]

        diff = (fla() - ours()).abs().max().item()
        row += (f" {gpu_time(fla) * 1e3:.3f} | "
                f"{timeit(fla, device='cuda', warmup=3, repeat=30) * 1e3:.3f}"
                f" | {diff:.1e} |")
    else:
        row += " - | - | - |"
    print(row)
