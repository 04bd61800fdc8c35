"""minimodels.lab: what the chapters share (simulator check, single-thread timing, decode
throughput, memory probes, claims rendered from measured values)."""

import numba
import numpy as np
import pytest
import torch
from IPython.display import Markdown

from minimodels import lab

# --- simulator_check ---------------------------------------------------------------------------


def test_simulator_check_returns_the_printed_number_and_where_it_ran():
    run = lab.simulator_check("from minimodels.backend import cuda_simulated\n"
                              "print('simulated:', int(cuda_simulated()))", timeout=120)
    assert run.ok, run.message
    assert run.value == float(run.simulated)  # no GPU here: the child ran in the simulator
    assert "ran in" in run.message


def test_simulator_check_reports_a_failure_with_its_stderr_never_a_nan():
    run = lab.simulator_check("print(0.5)\nraise ValueError('kernel went wrong')", timeout=60)
    assert not run.ok and run.returncode == 1
    assert "exit status 1" in run.message and "ValueError: kernel went wrong" in run.message
    with pytest.raises(lab.SimulatorCheckFailed, match="kernel went wrong"):
        _ = run.value


def test_simulator_check_wants_a_number_at_the_end():
    run = lab.simulator_check("print('all good')", timeout=60)
    assert run.ok
    with pytest.raises(lab.SimulatorCheckFailed, match="not a number"):
        _ = run.value


def test_simulator_check_times_out_clearly():
    run = lab.simulator_check("import time\nprint('started', flush=True)\ntime.sleep(30)",
                              timeout=1)
    assert run.timed_out and not run.ok and "timed out" in run.message
    with pytest.raises(lab.SimulatorCheckFailed, match="timed out"):
        _ = run.value


# --- single_thread -----------------------------------------------------------------------------


@pytest.fixture
def two_threads():
    """Start from 2 torch threads and Numba's most (restored after the test)."""
    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(2)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    yield 2, numba.config.NUMBA_NUM_THREADS
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


def test_single_thread_sets_one_and_restores(two_threads):
    with lab.single_thread():
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
    assert (torch.get_num_threads(), numba.get_num_threads()) == two_threads


def test_single_thread_restores_after_an_error(two_threads):
    with pytest.raises(RuntimeError, match="boom"), lab.single_thread():
        raise RuntimeError("boom")
    assert (torch.get_num_threads(), numba.get_num_threads()) == two_threads


# --- decode_throughput -------------------------------------------------------------------------


class GrowingCache(torch.nn.Module):
    """A stand-in for attention's KV cache: each step appends a (1, 4) row to the state."""

    def step(self, token, state=None):
        row = torch.full((1, 4), float(token.item()))
        cache = row if state is None else torch.cat([state[0], row])
        return torch.zeros(1, 16), (cache, len(cache))  # an int in the state counts 0


class FixedState(torch.nn.Module):
    """A stand-in for a recurrent model: a state of 6 numbers at every length."""

    def __init__(self):
        super().__init__()
        self.calls, self.threads = 0, set()

    def step(self, token, state=None):
        self.calls += 1
        self.threads.add(torch.get_num_threads())
        return torch.zeros(1, 16), [torch.zeros(2), torch.zeros(1, 4)]


def test_decode_throughput_counts_the_state_and_times_each_mark():
    sizes, seconds = lab.decode_throughput(GrowingCache(), [0, 3, 8], n=4)
    assert sizes == {0: 0, 3: 12, 8: 32}  # 4 numbers per token so far
    assert len(seconds) == 3 and all(0 < s < 1 for s in seconds)
    model = FixedState()
    result = lab.decode_throughput(model, [2, 5], n=3)
    assert result.sizes == {2: 6, 5: 6} and model.calls == 5 + 3
    assert model.threads == {1}  # stepped on one thread


def test_decode_throughput_of_real_models():
    """A KV cache grows linearly with the tokens; a recurrent state does not grow."""
    from minimodels.models import LM

    torch.manual_seed(0)
    gpt = LM(16, 16, 1, mixer="attention", n_heads=2, positions=64).eval()
    sizes, _ = lab.decode_throughput(gpt, [4, 8], n=2)
    assert 0 < sizes[4] < sizes[8] == 2 * sizes[4]
    rnn = LM(16, 16, 1, mixer="gru").eval()
    sizes, _ = lab.decode_throughput(rnn, [4, 8], n=2)
    assert sizes[4] == sizes[8] > 0


# --- memory ------------------------------------------------------------------------------------


def test_peak_memory_counts_live_temporaries_not_views_of_inputs():
    x = torch.ones(1000)
    assert lab.peak_memory(lambda: x[:10] + 0) == 40  # the view is the input's own storage
    # ones (4000 B) and its product (4000 B) live together; the sum adds 4 B once ones is gone
    assert lab.peak_memory(lambda: (torch.ones(1000) * 2).sum()) == 8000


def test_peak_memory_sees_materialised_attention_scores():
    from minimodels.kernels.attention import attention

    def peak(l):
        q = torch.randn(1, 1, l, 8)
        return lab.peak_memory(lambda: attention(q, q, q, backend="ref"))

    assert peak(256) >= 256 * 256 * 4  # the (l, l) float32 scores
    assert peak(512) / peak(256) == pytest.approx(4, rel=0.2)  # quadratic in l


def test_saved_for_backward_counts_what_autograd_keeps():
    x = torch.randn(100)
    assert lab.saved_for_backward(torch.exp, x) == 400  # exp saves its float32 result
    assert lab.saved_for_backward(lambda a: (a * a).sum(), x) == 800  # mul saves both operands
    assert not x.requires_grad  # the caller's tensor is left alone


# --- claims and sentences ----------------------------------------------------------------------


def test_rules_decide_from_the_value_and_say_why():
    rule = lab.above("ratio", 2, then="holds with caveats")
    assert rule({"ratio": 2.5}) == "holds with caveats"
    assert rule({"ratio": 1.5}) == "not reproducible here"
    assert rule.explain({"ratio": 1.5}) == "ratio 1.5 not > 2"
    assert lab.below("err", 1e-6)({"err": np.float32(1e-7)}) == "holds"
    graded = lab.above("x", 5, otherwise=lab.above("x", 2, then="holds with caveats"))
    assert [graded({"x": v}) for v in (6, 3, 1)] == [
        "holds", "holds with caveats", "not reproducible here"]
    assert graded.explain({"x": 3}) == "x 3 not > 5; x 3 > 2"
    slope = lab.between("slope", 0.8, 1.2, otherwise="holds with caveats")
    assert slope({"slope": 1.2}) == "holds" and slope({"slope": 1.3}) == "holds with caveats"
    with pytest.raises(KeyError, match="'ratio'"):
        rule({"other": 1})
    with pytest.raises(ValueError, match="must be a number"):
        rule({"ratio": float("nan")})


def test_claims_table_renders_markdown_from_the_numbers():
    def table(ratio):
        return lab.claims_table([
            lab.Claim("~5x higher throughput", "decode ratio {ratio:.2f} (d=64, batch 1)",
                      lab.above("ratio", 2, then="holds with caveats"), ratio=ratio),
            lab.Claim("Constant-size state", "{mamba:,} vs {gpt:,} numbers", "holds",
                      mamba=2048, gpt=65536),
            lab.Claim("a | b", "x\nspread over lines", "holds"),
        ])

    md = table(2.345)
    assert isinstance(md, Markdown)
    assert md.data.splitlines() == [
        "| claim | measured at course scale | verdict |",
        "|---|---|---|",
        "| ~5x higher throughput | decode ratio 2.35 (d=64, batch 1) | holds with caveats "
        "(ratio 2.35 > 2) |",
        "| Constant-size state | 2,048 vs 65,536 numbers | holds |",
        "| a \\| b | x spread over lines | holds |",
    ]
    assert "| not reproducible here (ratio 1.5 not > 2) |" in table(1.5).data
    assert "(ratio" not in lab.claims_table(
        [lab.Claim("c", "{ratio}", lab.above("ratio", 2), ratio=3)], show_rule=False).data


def test_claims_table_rejects_a_template_without_its_value():
    with pytest.raises(KeyError, match="speedup"):
        lab.claims_table([lab.Claim("fast", "{speedup:.1f}x", "holds", ratio=3)])
    with pytest.raises(TypeError, match="Claim"):
        lab.claims_table([("fast", "3x", "holds")])


def test_say_formats_a_sentence_and_resolves_rules():
    md = lab.say("The kernel is {x:.1f}x the reference: the claim {verdict}.", x=3.04,
                 verdict=lab.above("x", 3))
    assert isinstance(md, Markdown)
    assert md.data == "The kernel is 3.0x the reference: the claim holds."


def test_core_pulls_the_marked_lines_and_refuses_walls(tmp_path, monkeypatch):
    import importlib
    import sys

    src = tmp_path / "kmod.py"
    src.write_text("x = 0\n\n\ndef f(a):\n    # [core] step\n    b = a + 1  # one\n"
                   "    return b\n    # [/core]\n\n\n# [core] wall\n" + "y = 1\n" * 41
                   + "# [/core]\n# [core] open\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("kmod", None)
    kmod = importlib.import_module("kmod")
    md = lab.core(kmod.f, "step").data
    assert md.startswith("```python\nb = a + 1  # one\nreturn b\n```")
    assert "core 'step'" in md and "kmod.py" in md and "line" not in md
    with pytest.raises(ValueError, match="no '# \\[core\\] nope' marker"):
        lab.core(kmod, "nope")
    with pytest.raises(ValueError, match="41 lines > 40"):
        lab.core(kmod, "wall")
    with pytest.raises(ValueError, match="no closing"):
        lab.core(kmod, "open")
