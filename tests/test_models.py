"""The mixer registry and the one LM: every registered mixer obeys the sequence-layer contract
(step = forward) inside the LM on every backend, the LM equals the skeleton written out by hand,
hybrids stack different mixers, options reach the factories that take them, bad arguments are
clear errors, and use_backend reaches every kernel call inside it."""

import pytest
import torch
from helpers import ALL, ScaleMixer, device_for, run_steps

import minimodels
from minimodels.backend import BackendUnavailable, resolve
from minimodels.models import FAMILY_MLP, LM, MIXERS, MLPS, Residual, state_numel
from minimodels.nn import MLP, RMSNorm

MIXER_OPTIONS = {"attention": {"n_heads": 2}, "s4d": {"d_state": 4}, "mamba": {"d_state": 4}}


def lm_steps(lm, tokens):
    state, out = None, []
    for t in range(tokens.shape[1]):
        logits, state = lm.step(tokens[:, t], state)
        out.append(logits)
    return torch.stack(out, 1), state


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_mixer_steps_as_it_runs_in_parallel(name, backend):
    torch.manual_seed(0)
    dev = device_for(backend)
    lm = LM(13, 8, 2, mixer=name, **MIXER_OPTIONS.get(name, {})).double().to(dev)
    tokens = torch.randint(0, 13, (2, 6), device=dev)
    with minimodels.use_backend(backend):
        want = lm(tokens)
        got, state = lm_steps(lm, tokens)
    assert want.shape == (2, 6, 13)
    torch.testing.assert_close(got, want)
    assert state[0] == 6 and state_numel(state) > 0


def test_lm_is_the_skeleton_written_by_hand():
    torch.manual_seed(1)
    lm = LM(11, 8, 2, mixer="attention", n_heads=2, positions=16).double()
    tokens = torch.randint(0, 11, (3, 5))
    x = lm.embed.weight[tokens] + lm.pos.weight[:5]  # (b, l, d)
    for block in lm.blocks:
        x = x + block.mixer(block.norm1(x))
        x = x + block.mlp(block.norm2(x))
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + lm.norm.eps) * lm.norm.weight
    torch.testing.assert_close(lm(tokens), x @ lm.embed.weight.T)  # tied head
    assert lm.head.weight is lm.embed.weight
    assert isinstance(lm.blocks[0].mlp, MLP) and isinstance(lm.blocks[0].norm1, RMSNorm)


def test_family_mlps_and_norms():
    rwkv = LM(7, 8, 2, mixer="rwkv", norm="layer", embed_norm=True, tie_head=False)
    assert type(rwkv.blocks[1].mlp) is MLPS[FAMILY_MLP["rwkv"]]
    assert isinstance(rwkv.blocks[0].norm1, torch.nn.LayerNorm) and rwkv.embed_norm is not None
    assert rwkv.head.weight is not rwkv.embed.weight
    mamba = LM(7, 8, 2)  # mamba by default, no MLP (the block has its own gate)
    assert mamba.blocks[0].mlp is None and mamba.blocks[0].norm2 is None
    assert LM(7, 8, 1, mixer="mamba", mlp="mlp").blocks[0].mlp is not None


def test_rwkv_layers_get_their_depth():
    lm = LM(7, 8, 3, mixer="rwkv")
    decays = [block.mixer.time_decay for block in lm.blocks]
    assert not torch.equal(decays[0], decays[2])  # the init depends on layer / n_layers


def test_hybrid_stack_and_its_state():
    torch.manual_seed(2)
    jamba = LM(11, 8, 4, mixer=["mamba", "mamba", "mamba", "attention"], d_state=4, n_heads=2)
    assert [type(b.mixer).__name__ for b in jamba.blocks] == [
        "MambaBlock", "MambaBlock", "MambaBlock", "MultiHeadAttention"]
    assert [b.mlp is None for b in jamba.blocks] == [True, True, True, False]
    tokens = torch.randint(0, 11, (2, 5))
    got, state = lm_steps(jamba.double(), tokens)
    torch.testing.assert_close(got, jamba(tokens))
    c = jamba.blocks[0].mixer.d_inner
    conv, ssm, kv = 2 * c * 3, 2 * c * 4, 2 * 2 * 5 * 8  # window (b,c,k-1), x (b,c,n), K and V
    assert state_numel(state) == 3 * (conv + ssm) + kv


def test_state_numel():
    t = torch.zeros(2, 3)
    assert state_numel(None) == 0 and state_numel(7) == 0 and state_numel(t) == 6
    assert state_numel((4, [t, (t, None)], {"k": t})) == 18


def test_custom_factory_and_residual_contract():
    block = Residual(4, ScaleMixer(4)).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(block(x), x + 0.5 * block.norm1(x))
    torch.testing.assert_close(run_steps(block, x)[0], block(x))
    lm = LM(5, 4, 2, mixer=ScaleMixer)
    assert lm(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 5)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="unknown mixer 'mamba2'.*attention.*mamba"):
        LM(5, 4, 2, mixer="mamba2")
    with pytest.raises(ValueError, match="list of 3 entries for n_layers=2"):
        LM(5, 4, 2, mixer=["mamba"] * 3)
    with pytest.raises(ValueError, match="unknown mlp"):
        LM(5, 4, 2, mlp="moe2")
    with pytest.raises(ValueError, match="n_heads"):
        LM(5, 4, 2, mixer="mamba", n_heads=2)
    with pytest.raises(ValueError, match="norm must be one of"):
        LM(5, 4, 2, norm="batch")
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        LM(5, 0, 2)
    with pytest.raises(TypeError, match="tokens must be int64"):
        LM(5, 4, 1)(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="max_len=4"):
        LM(5, 4, 1, mixer="attention", n_heads=2, positions=4)(torch.zeros(1, 5, dtype=torch.long))


def test_use_backend_reaches_every_kernel_call():
    calls = []

    def spy(q, k, v, **kw):
        calls.append(q.shape)
        from minimodels.kernels.attention import attention_ref
        return attention_ref(q, k, v, **kw)

    lm = LM(5, 4, 2, mixer="attention", n_heads=2)
    with minimodels.use_backend(spy):
        lm(torch.zeros(1, 3, dtype=torch.long))
    assert len(calls) == 2  # one attention call per layer, both through the learner's function
    lm(torch.zeros(1, 3, dtype=torch.long))
    assert len(calls) == 2  # outside the block: the default backend again


def test_use_backend_nests_and_an_explicit_backend_wins(monkeypatch):
    monkeypatch.setenv("MINIMODELS_BACKEND", "ref")
    assert resolve() == "ref"
    with minimodels.use_backend("cpu"):
        assert resolve() == "cpu" and resolve("ref") == "ref"
        with minimodels.use_backend("ref"):
            assert resolve() == "ref"
        assert resolve() == "cpu"
    assert resolve() == "ref"
    with pytest.raises(BackendUnavailable, match="'tpu' is not a backend"):
        with minimodels.use_backend("tpu"):
            pass
