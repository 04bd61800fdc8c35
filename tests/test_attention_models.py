"""Attention layers: step (KV cache) equals forward, MHA equals torch.nn.MultiheadAttention,
cached generation equals recomputation, and the cost model's arithmetic."""

import pytest
import torch
from helpers import KERNELS, device_for, run_steps

from minimodels import use_backend
from minimodels.models import LM, Residual
from minimodels.models.attention import MultiHeadAttention, attention_cost
from minimodels.nn import MLP, RMSNorm

pytestmark = pytest.mark.ch02




@pytest.mark.parametrize("backend", ["ref", *KERNELS])
@pytest.mark.parametrize("make", [lambda: MultiHeadAttention(8, 2),
                                  lambda: Residual(8, MultiHeadAttention(8, 2), MLP(8))])
def test_step_with_kv_cache_equals_forward(make, backend):
    torch.manual_seed(0)
    dev = device_for(backend)
    layer = make().double().to(dev)
    x = torch.randn(2, 5, 8, dtype=torch.float64, device=dev)
    with use_backend(backend):
        y, (K, V) = run_steps(layer, x)
        want = layer(x)
    assert K.shape == V.shape == (2, 2, 5, 4)  # the cache grows by one position per step
    torch.testing.assert_close(y, want)


def test_mha_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ours = MultiHeadAttention(8, 2, causal=True).double()
    theirs = torch.nn.MultiheadAttention(8, 2, bias=False, batch_first=True).double()
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.Wq.weight, ours.Wk.weight, ours.Wv.weight]))
        theirs.out_proj.weight.copy_(ours.Wo.weight)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)  # True = not allowed
    with use_backend("cpu"):
        got = ours(x)
    torch.testing.assert_close(got, theirs(x, x, x, attn_mask=mask, need_weights=False)[0])


def test_non_causal_layer_sees_the_future():
    torch.manual_seed(0)
    layer = MultiHeadAttention(8, 2, causal=False).double()
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -1] += 1
    assert not torch.allclose(layer(x)[:, 0], layer(x2)[:, 0])


def test_lm_step_equals_forward_and_cached_generation_equals_recompute():
    torch.manual_seed(0)
    lm = LM(11, 16, 2, mixer="attention", n_heads=2, positions=32, tie_head=False).double()
    tokens = torch.randint(0, 11, (2, 7))
    state, logits = None, []
    for t in range(7):
        out, state = lm.step(tokens[:, t], state)
        logits.append(out)
    torch.testing.assert_close(torch.stack(logits, 1), lm(tokens))
    assert torch.equal(lm.generate(tokens[:, :3], 8), lm.generate(tokens[:, :3], 8, False))


def test_shared_layers():
    x = torch.randn(3, 5, dtype=torch.float64)
    y = RMSNorm(5).double()(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    assert MLP(5).W1.out_features == 20 and MLP(5)(x.float()).shape == (3, 5)


def test_cost_model_arithmetic():
    d = 4096
    c = attention_cost(d, 1000, n_layers=1)  # decode: 4·t·d vs 2·12·d²
    assert c.flops_attention == 4 * 1000 * d and c.flops_linear == 24 * d * d
    even = attention_cost(d, 6 * d)  # attention equals the linear layers at context 6·d
    assert even.attention_flop_share == pytest.approx(0.5)
    assert even.kv_byte_share == pytest.approx(0.5)
    assert attention_cost(d, 6 * d, batch=8).kv_byte_share > 0.85  # weights shared, KV not
    pre = attention_cost(d, 3, n_layers=1, mode="prefill")
    assert pre.flops_attention == 4 * (1 + 2 + 3) * d and pre.flops_linear == 3 * 24 * d * d
    with pytest.raises(ValueError, match="mode must be"):
        attention_cost(d, 10, mode="train")
    with pytest.raises(ValueError, match="context must be a positive int"):
        attention_cost(d, 0)


def test_layer_errors_name_the_argument():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match=r"x must have 3 dimensions"):
        MultiHeadAttention(8, 2)(torch.randn(8))
    with pytest.raises(ValueError, match="max_len"):
        LM(5, 8, 1, mixer="attention", n_heads=2, positions=4)(torch.zeros(1, 5, dtype=torch.long))
