"""The long-context arena (chapter 10): contenders at matched size, run, costs, results files."""

import json
from dataclasses import replace

import pytest
import torch

from minimodels import arena, tasks
from minimodels.models import state_numel
from minimodels.models.moe import parameter_counts

pytestmark = pytest.mark.ch10

TINY = replace(arena.QUICK, params=6_000, batch=4, eval_batch=8, pairs=(2, 4),
               depths=(0.0, 1.0), cost_lengths=(16, 32), decode_marks=(4, 12))


@pytest.mark.parametrize("name", list(arena.CONTENDERS))
def test_every_contender_builds_at_a_matched_size_and_decodes(name):
    d = arena.width_for(name, 20_000, max_len=64)
    model = arena.make(name, d, max_len=64).double()
    counts = parameter_counts(model)
    assert abs(counts["total"] - 20_000) < 0.35 * 20_000, counts  # widths step by 4
    assert counts["active"] <= counts["total"]
    assert (counts["active"] < counts["total"]) == (name == "jamba")
    x = torch.randint(0, tasks.VOCAB_SIZE, (2, 12))
    logits = model(x)
    assert logits.shape == (2, 12, tasks.VOCAB_SIZE) and torch.isfinite(logits).all()
    state, steps = None, []
    with torch.no_grad():
        for t in range(12):
            out, state = model.step(x[:, t], state)
            steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), logits.detach())
    assert state_numel(state) > 0


def test_jamba_layout_and_dense_twin():
    jamba = arena.make("jamba", 16)
    dense = arena.make("jamba_dense", 16)
    assert jamba.mixer_names == ["mamba", "mamba", "mamba", "attention"]
    moe_layers = [i for i, b in enumerate(jamba.blocks) if type(b.mlp).__name__ == "MoE"]
    assert moe_layers == [1, 3]  # every other layer
    # same width and the same active parameters (but the routers): only the extra experts differ
    routers = 2 * 16 * 4
    assert parameter_counts(dense)["total"] == parameter_counts(jamba)["active"] - routers
    assert [b.mlp.W1.out_features for b in dense.blocks] == [32, 64, 32, 64]
    assert arena.width_for("jamba_dense", 30_000) == arena.width_for("jamba", 30_000)


def test_run_rows():
    rows = arena.run(["mqar", "needle_in_haystack"], ["attention", "mamba"],
                     {"mqar": (12, 16), "needle_in_haystack": (17,)}, 2, scale=TINY,
                     progress=False)
    keys = {"task", "length", "contender", "setting", "accuracy", "d_model", "total", "active",
            "state", "steps", "seconds"}
    assert all(set(r) == keys for r in rows)
    mqar = [r for r in rows if r["task"] == "mqar"]
    # pairs that fit (3·pairs <= length): 2 and 4 at 12 and 16, for both contenders
    assert sorted({(r["length"], r["setting"]) for r in mqar}) == [
        (12, "pairs=2"), (12, "pairs=4"), (16, "pairs=2"), (16, "pairs=4")]
    needle = [r for r in rows if r["task"] == "needle_in_haystack"]
    assert sorted({r["setting"] for r in needle}) == ["depth=0", "depth=1"]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    att = {r["length"]: r["state"] for r in mqar if r["contender"] == "attention"}
    mamba = {r["length"]: r["state"] for r in mqar if r["contender"] == "mamba"}
    assert att[16] > att[12] and mamba[16] == mamba[12]  # a KV cache grows, a state does not


def test_run_is_seeded():
    a = arena.run(["induction_heads"], ["lstm"], [10], 3, scale=TINY, progress=False)
    b = arena.run(["induction_heads"], ["lstm"], [10], 3, scale=TINY, progress=False)
    assert [r["accuracy"] for r in a] == [r["accuracy"] for r in b]


def test_run_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        arena.run(["recall"], ["attention"], [16], 1, scale=TINY, progress=False)
    with pytest.raises(ValueError, match="unknown contender"):
        arena.run(["mqar"], ["transformer"], [16], 1, scale=TINY, progress=False)
    with pytest.raises(ValueError, match="budget"):
        arena.run(["mqar"], ["attention"], [16], 0, scale=TINY, progress=False)
    with pytest.raises(ValueError, match="unknown contender"):
        arena.make("gpt", 16)


def test_costs_and_exponents():
    rows = arena.costs(["attention", "mamba"], scale=TINY, progress=False)
    kinds = {(r["contender"], r["kind"]) for r in rows}
    assert {k for _, k in kinds} == {"time_per_token", "memory_per_token", "decode_seconds",
                                     "state"}
    state = {(r["contender"], r["length"]): r["value"] for r in rows if r["kind"] == "state"}
    assert state["attention", 12] > state["attention", 4]
    assert state["mamba", 12] == state["mamba", 4]
    synthetic = [{"contender": "x", "kind": "k", "length": n, "value": 3.0 * n ** 1.5}
                 for n in (64, 128, 256, 512)]
    assert arena.exponents(synthetic, "k")["x"] == pytest.approx(1.5)


def test_save_load_and_summary(tmp_path):
    rows = arena.run(["selective_copy"], ["s4d"], [12], 2, scale=TINY, progress=False)
    cost_rows = [{"contender": "s4d", "kind": "time_per_token", "length": n, "value": 1e-6}
                 for n in (16, 32)]
    path = arena.save(TINY, rows, cost_rows, 1.0, tmp_path / "tiny.json")
    data = json.loads(path.read_text())
    assert data["scores"] == rows and data["meta"]["scale"]["name"] == "quick"
    table = path.with_suffix(".md").read_text()
    assert "| s4d |" in table and "selective_copy acc" in table


def test_merge_split_runs(tmp_path):
    parts = []
    for m in ("s4d", "lstm"):
        rows = arena.run(["selective_copy"], [m], [12], 1, scale=TINY, progress=False)
        cost_rows = [{"contender": m, "kind": "time_per_token", "length": n, "value": 1e-6}
                     for n in (16, 32)]
        parts.append(arena.save(TINY, rows, cost_rows, 2.0, tmp_path / f"{m}.json"))
    assert arena.main(["--merge", *map(str, parts), "--out", str(tmp_path / "all.json")]) == 0
    data = json.loads((tmp_path / "all.json").read_text())
    assert sorted({r["contender"] for r in data["scores"]}) == ["lstm", "s4d"]
    assert data["meta"]["seconds"] == 4 and len(data["costs"]) == 4
    with pytest.raises(ValueError, match="again"):
        arena.merge([parts[0], parts[0]], tmp_path / "twice.json")


def test_rankings_and_changes():
    def rows(accs):
        return [{"task": t, "contender": m, "accuracy": a} for t, d in accs.items()
                for m, a in d.items()]
    small = rows({"mqar": {"attention": 1.0, "mamba": 0.5, "lstm": 0.4}, "needle": {"s4d": 0.2}})
    large = rows({"mqar": {"attention": 0.9, "mamba": 0.95, "lstm": 0.4}, "induction": {"x": 1}})
    assert arena.ranking_changes(small, large) == [("mqar", "attention", 1, 2),
                                                   ("mqar", "mamba", 2, 1)]
    assert arena.ranking_changes(small, small) == []
    # within `tie` of each other two contenders share a rank: swapping them is no change
    close = rows({"mqar": {"attention": 0.5, "mamba": 0.51, "lstm": 0.4}})
    assert arena.ranking_changes(close, rows({"mqar": {"attention": 0.51, "mamba": 0.5,
                                                       "lstm": 0.4}})) == []
    assert arena.ranking_changes(close, close, tie=0.0) == []
    assert arena.ranking_changes(close, rows({"mqar": {"attention": 0.51, "mamba": 0.5,
                                                       "lstm": 0.4}}), tie=0.0) == [
        ("mqar", "attention", 2, 1), ("mqar", "mamba", 1, 2)]


def test_full_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        arena.main(["--full"])
    assert "CUDA" in capsys.readouterr().err


def test_committed_quick_results_cover_every_contender_and_task():
    data = arena.load("quick")
    assert data is not None, "results/arena/quick.json is missing: python -m minimodels.arena --quick"
    scale = data["meta"]["scale"]
    assert sorted({r["contender"] for r in data["scores"]}) == sorted(arena.CONTENDERS)
    assert sorted({r["task"] for r in data["scores"]}) == sorted(tasks.TASKS)
    assert sorted({r["contender"] for r in data["costs"]}) == sorted(arena.CONTENDERS)
    for r in data["scores"]:
        assert r["length"] in scale["lengths"][r["task"]]
        assert r["steps"] == scale["budget"][r["task"]]


def test_workers_give_the_same_rows():
    serial = arena.run(["induction_heads"], ["lstm", "s4d"], [10], 3, scale=TINY, progress=False)
    parallel = arena.run(["induction_heads"], ["lstm", "s4d"], [10], 3, scale=TINY, workers=2,
                         progress=False)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(parallel) == drop(serial)
    with pytest.raises(ValueError, match="workers"):
        arena.run(["mqar"], ["attention"], [16], 1, scale=TINY, workers=0, progress=False)


def test_checkpoint_resumes_a_run_cut_short(tmp_path, monkeypatch):
    """Each finished job's rows reach the checkpoint file at once; a second run with the same
    file trains only the jobs it lacks and returns the same rows; a file from another budget is
    refused."""
    path = tmp_path / "new folder" / "jobs.jsonl"
    full = arena.run(["induction_heads"], ["lstm", "s4d"], [10], 2, scale=TINY, progress=False,
                     checkpoint=path)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    path.write_text(lines[0] + "\n")  # cut short after the first job
    ran = []
    real_job = arena._job
    monkeypatch.setattr(arena, "_job", lambda *job: ran.append(job[:2]) or real_job(*job))
    resumed = arena.run(["induction_heads"], ["lstm", "s4d"], [10], 2, scale=TINY,
                        progress=False, checkpoint=path)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(resumed) == drop(full)
    assert ran == [("induction_heads", "s4d")] and len(path.read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="checkpoint"):
        arena.run(["induction_heads"], ["lstm"], [10], 3, scale=TINY, progress=False,
                  checkpoint=path)


def test_merge_scores_of_one_run_with_costs_of_another(tmp_path):
    """--measure splits a run into its scores and its costs (timed on a quiet machine); merge
    joins them, and refuses a contender's costs measured twice."""
    rows = arena.run(["selective_copy"], ["s4d"], [12], 1, scale=TINY, progress=False)
    cost_rows = [{"contender": "s4d", "kind": "time_per_token", "length": n, "value": 1e-6}
                 for n in (16, 32)]
    scores = arena.save(TINY, rows, [], 2.0, tmp_path / "scores.json")
    costs = arena.save(TINY, [], cost_rows, 1.0, tmp_path / "costs.json")
    data = json.loads(arena.merge([scores, costs], tmp_path / "all.json").read_text())
    assert data["scores"] == rows and data["costs"] == cost_rows
    assert data["meta"]["runs"] == 2 and "summed over 2 runs" in (tmp_path / "all.md").read_text()
    assert "| s4d | - | - |" in costs.with_suffix(".md").read_text()  # costs only: no size
    with pytest.raises(ValueError, match=r"s4d \(costs\) again"):
        arena.merge([costs, costs], tmp_path / "twice.json")


class _Answers(torch.nn.Module):
    """Logits that put one token on top everywhere."""

    def __init__(self, token):
        super().__init__()
        self.token = token

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full(x.shape, self.token),
                                           tasks.VOCAB_SIZE).float()


def test_constant_guesses_finds_a_collapsed_contender_and_only_it():
    from minimodels.train import evaluate

    scale = replace(TINY, eval_batch=64, depths=(0.0, 0.5, 1.0))
    word = tasks.WORDS.index("seven")
    rows = []
    for length in scale.lengths["needle_in_haystack"]:
        for setting, batch in arena._evaluations("needle_in_haystack", length, scale).items():
            acc = round(evaluate(_Answers(word), batch)["accuracy"], 4)
            assert 0 < acc < 0.5
            for m, a in (("collapsed", acc), ("noisy", acc), ("single", acc)):
                rows.append({"task": "needle_in_haystack", "length": length, "contender": m,
                             "setting": setting, "accuracy": a})
    rows[-2]["accuracy"] = 0.3333  # one cell that no single answer scores
    rows = [r for r in rows if r["contender"] != "single"] + [rows[2]]  # "single": one cell
    assert len([r for r in rows if r["contender"] == "collapsed"]) == 9
    found = arena.constant_guesses(rows, scale)
    assert found == {("needle_in_haystack", "collapsed"): word}
    assert arena.constant_guesses(rows, scale, min_cells=1)[("needle_in_haystack", "single")] \
        == word


def test_scale_of_rebuilds_the_scale_a_results_file_was_measured_at():
    from dataclasses import asdict

    for scale in (arena.QUICK, arena.FULL, TINY):
        assert arena.scale_of(json.loads(json.dumps({"scale": asdict(scale)}))) == scale


def test_length_probe_trains_on_each_length_alone_and_on_all_and_keeps_loss_per_length():
    from minimodels.train import train

    scale = replace(TINY, budget={**TINY.budget, "needle_in_haystack": 12})
    found = arena.length_probe(["attention"], (32, 64), scale=scale, every=5)
    max_len = max(max(v) for v in scale.lengths.values())  # the whole scale's model
    d = arena.width_for("attention", scale.params, n_layers=scale.n_layers, max_len=max_len)
    trainings = [[32], [64], [32, 64]]
    assert sorted({tuple(r["trained_on"]) for r in found["scores"]}) == sorted(map(tuple, trainings))
    for r in found["scores"]:
        assert r["length"] in r["trained_on"] and r["d_model"] == d and r["steps"] == 12
    assert len([r for r in found["scores"] if r["trained_on"] == [32]]) == len(scale.depths)
    # the curves against one training replayed here: its losses and the length of each batch
    for on in trainings:
        lengths_drawn = []
        batch_fn = arena._batches("needle_in_haystack", on, scale)

        def recorded(generator, batch_fn=batch_fn, lengths_drawn=lengths_drawn):
            batch = batch_fn(generator=generator)
            lengths_drawn.append(batch.x.shape[1])
            return batch

        arena.seed_everything(0)
        model = arena.make("attention", d, n_layers=scale.n_layers, max_len=max_len)
        losses = train(model, recorded, 12, lr=scale.lr, seed=0, progress=False).loss
        for n in on:
            curve = [(r["step"], r["loss"]) for r in found["curves"]
                     if r["trained_on"] == on and r["length"] == n]
            want = []
            for start in (0, 5, 10):
                w = [x for x, m in zip(losses[start:start + 5], lengths_drawn[start:start + 5],
                                       strict=True) if m == n]
                if w:
                    want.append((min(start + 5, 12), round(sum(w) / len(w), 4)))
            assert [s for s, _ in curve] == [s for s, _ in want], (on, n)
            assert [x for _, x in curve] == pytest.approx([x for _, x in want], abs=2e-4)
        if len(on) > 1:
            assert set(lengths_drawn) == set(on)  # both lengths were drawn


def test_length_probe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown contender"):
        arena.length_probe(["transformer"], (32,), scale=TINY)
    with pytest.raises(ValueError, match="workers must be"):
        arena.length_probe(["attention"], (32,), scale=TINY, workers=0)
    for lengths in ((), (0,), (32.0,)):
        with pytest.raises(ValueError, match="lengths must be"):
            arena.length_probe(["attention"], lengths, scale=TINY)


def test_probe_command_writes_its_results_with_the_scale(tmp_path, monkeypatch):
    seen = {}

    def fake(contenders, lengths, *, workers):  # the training itself is tested above
        seen.update(contenders=contenders, lengths=lengths, workers=workers)
        return {"scores": [{"contender": "hyena"}], "curves": [{"step": 25}]}

    monkeypatch.setattr(arena, "length_probe", fake)
    out = tmp_path / "probe.json"
    assert arena.main(["--probe", "hyena", "--lengths", "32", "64", "--workers", "1",
                       "--out", str(out)]) == 0
    assert seen == {"contenders": ["hyena"], "lengths": [32, 64], "workers": 1}
    data = json.loads(out.read_text())
    assert arena.scale_of(data["meta"]) == arena.PROBE
    assert data["scores"] == [{"contender": "hyena"}] and data["curves"] == [{"step": 25}]
