"""Check and time the numba.cuda attention kernel on a real GPU (run it on the H200):

    python kernels/attention_gpu_check.py

1. correctness against torch's scaled_dot_product_attention in float64 and float32 on random
   inputs (causal and not, lq != lk, lengths off the tile size, large logits);
2. time at (1, 16, 16384, 128) non-causal float32 next to SDPA float32 and bf16, in TFLOP/s
   (4·b·h·lq·lk·e FLOPs). Target: >= 30% of the fp32 FMA peak (~67 TFLOP/s), i.e. < ~110 ms.
"""

import torch
import torch.nn.functional as F

from minimodels.bench import timeit
from minimodels.kernels.attention import attention, attention_ref, causal_mask

assert torch.cuda.is_available(), "needs a CUDA GPU"
dev = torch.device("cuda")
torch.manual_seed(0)

for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
    for b, h, lq, lk, e, causal, std in [
        (2, 3, 1, 1, 64, True, 1), (2, 3, 100, 100, 64, True, 1), (1, 4, 37, 300, 128, True, 1),
        (1, 4, 300, 37, 128, False, 1), (2, 2, 129, 257, 80, False, 1), (1, 2, 65, 65, 7, True, 1),
        (1, 2, 200, 200, 64, True, 30),
    ]:
        q = torch.randn(b, h, lq, e, device=dev, dtype=torch.float64) * std
        k = torch.randn(b, h, lk, e, device=dev, dtype=torch.float64) * std
        v = torch.randn(b, h, lk, e, device=dev, dtype=torch.float64)
        mask = causal_mask(lq, lk, dev) if causal else None
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        _, want_lse = attention_ref(q, k, v, causal, return_lse=True)
        out, lse = attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal,
                             return_lse=True, backend="cuda")
        err = max((out.double() - want).abs().max().item(),
                  (lse.double() - want_lse).abs().max().item() / max(1, std**2))
        tol_here = tol * std  # float32 rounding of q and k: logit errors grow with their size
        status = "ok" if err < tol_here else "FAIL"
        print(f"{status} {str(dtype)[6:]:8} {(b, h, lq, lk, e)} causal={causal} std={std} "
              f"max err {err:.2e}")
        assert err < tol_here

b, h, l, e = 1, 16, 16384, 128
q, k, v = (torch.randn(b, h, l, e, device=dev) for _ in range(3))
flops = 4 * b * h * l * l * e


qb, kb, vb = (x.bfloat16() for x in (q, k, v))
rows = [  # (name, fn, share of the full FLOPs)
    ("minimodels cuda float32", lambda: attention(q, k, v, backend="cuda"), 1),
    ("SDPA float32", lambda: F.scaled_dot_product_attention(q, k, v), 1),
    ("SDPA bf16", lambda: F.scaled_dot_product_attention(qb, kb, vb), 1),
    ("minimodels cuda causal", lambda: attention(q, k, v, causal=True, backend="cuda"), 0.5),
    ("SDPA float32 causal", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 0.5),
]
print(f"\n{torch.cuda.get_device_name()} at (b, h, l, e) = {(b, h, l, e)}; causal rows count "
      "half the FLOPs")
for name, fn, share in rows:
    ms = timeit(fn, device="cuda", repeat=10) * 1e3
    print(f"{name:26} {ms:8.2f} ms  {share * flops / ms / 1e9:6.1f} TFLOP/s")
out = attention(q, k, v, backend="cuda")
ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
print(f"max error vs float64 SDPA at full size: {(out.double() - ref).abs().max().item():.2e}")
