"""Check and time the numba.cuda WKV kernels on a real GPU (run it on the H200):

    python kernels/wkv_gpu_check.py

1. correctness of the forward against ``wkv_ref`` (computed on the CPU in float64) in float64
   and float32, on random inputs with |k| up to 40, lengths off the ITEMS chunk, and state
   resumption (two calls = one call); the backward kernel against autograd of the reference;
2. time of the forward at (1, 4096, 2048) float32 (target: < 3.5 ms) and the backward, and a
   batch sweep b = 1, 2, 4, 8, 16 at (b, 4096, 2048) as multiples of the memory floor (read k,
   v; write y, over the measured device copy bandwidth).
"""

import torch

from minimodels.bench import copy_bandwidth, timeit
from minimodels.kernels.wkv import wkv, wkv_ref

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

print("\n| b | forward ms | memory floor ms | x floor |\n|---:|---:|---:|---:|")
for b in (1, 2, 4, 8, 16):
    w, u, k, v = make(b)
    t = timeit(lambda w=w, u=u, k=k, v=v: wkv(w, u, k, v, backend="cuda"), device="cuda",
               warmup=3, repeat=30)
    floor = 3 * k.numel() * 4 / bw
    print(f"| {b} | {t * 1e3:.3f} | {floor * 1e3:.3f} | {t / floor:.1f} |")
