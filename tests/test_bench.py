"""The benchmark helpers and the plain-PyTorch peers (they must compute the same scan); every
benchmark from the command line at a tiny size, on the CPU and (in Numba's CUDA simulator) on
the ``--device cuda`` path."""

import ast
import re
from pathlib import Path

import pytest
import torch

import minimodels.benchmarks
from minimodels import bench
from minimodels.backend import cuda_simulated
from minimodels.benchmarks import scan as scan_bench
from minimodels.kernels.scan import linear_scan_ref
from minimodels.plots import fit_slope


@pytest.mark.parametrize("l", [1, 31, 70])
@pytest.mark.parametrize("peer", [scan_bench.scan_torch_chunked, scan_bench.scan_torch_associative])
def test_peers_compute_the_scan(peer, l):
    g = torch.Generator().manual_seed(l)
    a = torch.rand(2, 3, l, generator=g, dtype=torch.float64) * 0.5 + 0.5
    b, h0 = torch.randn(2, 3, l, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(peer(a, b, h0), linear_scan_ref(a, b, h0))


def test_timeit_takes_the_median_after_warmup():
    calls = []
    seconds = bench.timeit(lambda: calls.append(1), warmup=2, repeat=5)
    assert len(calls) == 7 and 0 <= seconds < 1


def test_table_reports_ratios_and_floor_multiples():
    rows = [bench.Row("ref", 0.1), bench.Row("fast", 0.01, "kernel")]
    table = bench.format_table(rows, reference="ref", floor_seconds=0.005)
    assert "| ref | 100 | 1x | 20.00 |" in table
    assert "| fast | 10 | 10x | 2.00 | kernel |" in table


def test_table_has_a_gpu_column_when_rows_have_gpu_times():
    rows = [bench.Row("ref", 0.1, gpu_seconds=0.08), bench.Row("fast", 0.01, "kernel")]
    table = bench.format_table(rows, reference="ref", floor_seconds=0.005)
    assert table.splitlines()[0] == "| implementation | ms | speed-up vs ref | x floor | GPU ms | note |"
    assert "| ref | 100 | 1x | 20.00 | 80 |  |" in table
    assert "| fast | 10 | 10x | 2.00 | - | kernel |" in table
    [(_, parsed, floor)] = bench.parse_tables("title\n\n" + table)
    assert parsed == [("ref", 100.0), ("fast", 10.0)] and floor == pytest.approx(5.0)
    plain = bench.format_table(rows[1:], reference="fast", floor_seconds=0.005)
    assert "GPU ms" not in plain


def test_convert_maps_every_tensor_of_an_example():
    from minimodels.kernels._common import Example

    ex = Example(args=(torch.ones(2), 3), kwargs={"h0": torch.zeros(1), "flag": True})
    ex64 = bench.convert(ex, torch.Tensor.double)
    assert ex64.args[0].dtype == torch.float64 and ex64.args[1] == 3
    assert ex64.kwargs["h0"].dtype == torch.float64 and ex64.kwargs["flag"] is True
    assert ex.args[0].dtype == torch.float32  # the original is left alone


def test_measure_times_and_counts_calls():
    calls = []
    row = bench.measure("x", lambda: calls.append(1), "cpu", "note", warmup=1, repeat=3)
    assert row.name == "x" and row.note == "note" and row.gpu_seconds is None
    assert len(calls) == 4 and 0 <= row.seconds < 1


def test_benchmarks_use_only_public_kernel_names():
    """Benchmarks sit above the kernels: they may use an op's public functions and constants,
    never a name starting with ``_`` from ``minimodels.kernels``."""
    folder = Path(minimodels.benchmarks.__file__).parent
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text())
        kernel_modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minimodels.kernels"):
                for alias in node.names:
                    assert not alias.name.startswith("_"), (path.name, alias.name)
                    kernel_modules.add(alias.asname or alias.name)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert ".kernels._" not in alias.name, (path.name, alias.name)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in kernel_modules):
                assert not node.attr.startswith("_"), (path.name, f"{node.value.id}.{node.attr}")


def test_kernels_folder_holds_no_gpu_check_scripts():
    """Checks are tests (tests/test_gpu.py), timings are benchmarks: kernels/ imports neither."""
    import minimodels.kernels

    folder = Path(minimodels.kernels.__file__).parent
    assert not list(folder.glob("*_gpu_check.py"))
    for path in folder.rglob("*.py"):
        text = path.read_text()
        for layer in ("minimodels.bench", "minimodels.lab", "minimodels.models", "minimodels.check"):
            assert f"import {layer}" not in text and f"from {layer}" not in text, (path, layer)


def test_fit_slope_recovers_a_power_law():
    x = [2.0**k for k in range(4, 10)]
    assert fit_slope(x, [3 * v**2 for v in x]) == pytest.approx(2.0)
    assert fit_slope(x, [v for v in x]) == pytest.approx(1.0)


def test_saved_tables_parse_and_plot(tmp_path):
    """--save writes each benchmark's output; parse_tables reads its tables back (rows in ms,
    the floor from the first "floor" column) and plot_results draws them into a PNG."""
    rows = [bench.Row("ref", 0.1), bench.Row("minimodels cpu kernel", 0.01, "kernel")]
    text = ("scan at (1, 2, 3) on cpu: test machine\nfloor line\n\n"
            + bench.format_table(rows, reference="ref", floor_seconds=0.005))
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "scan.md").write_text(text + "\n")
    [(title, parsed, floor)] = bench.parse_tables(text)
    assert title == "scan at (1, 2, 3) on cpu: test machine\nfloor line"
    assert parsed == [("ref", 100.0), ("minimodels cpu kernel", 10.0)]
    assert floor == pytest.approx(5.0)
    png = bench.plot_results("cpu", tmp_path)
    assert png == tmp_path / "cpu.png" and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="--save"):
        bench.plot_results("cuda", tmp_path)


@pytest.mark.parametrize("kernel, shape", [("scan", "1,2,8"), ("attention", "1,1,8,4"),
                                           ("wkv", "1,8,4"), ("s4d", "2,2,8"),
                                           ("selective_scan", "1,2,8,2")])
def test_every_benchmark_runs_from_the_command_line(kernel, shape, capsys):
    """``python -m minimodels.bench KERNEL --shape ...`` at a tiny size: every row of every
    benchmark module runs and prints a table (``make bench`` runs them all at full size)."""
    assert bench.main([kernel, "--shape", shape]) == 0
    out = capsys.readouterr().out
    assert "| implementation |" in out and "minimodels cpu kernel" in out
    assert f"{tuple(int(s) for s in shape.split(','))}" in out  # the size it was asked for
    for _, rows, floor in bench.parse_tables(out):
        assert rows and floor and all(ms > 0 for _, ms in rows)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_simulated(), reason="the --device cuda path at a tiny size runs in "
                    "Numba's CUDA simulator; on a real GPU tests/test_gpu.py runs it")
@pytest.mark.parametrize("kernel, shape, rows", [
    ("scan", "1,2,8", ["torch chunked cumprod/cumsum", "minimodels cuda kernel, preallocated out"]),
    ("attention", "1,1,8,4", ["SDPA bf16", "minimodels cuda kernel fwd+bwd (atomic dq)"]),
    ("wkv", "1,8,4", ["minimodels cuda kernel, preallocated y", "minimodels cuda kernel, backward",
                      "batch sweep"]),
    ("s4d", "2,2,8", ["ref (materialised"]),
    ("selective_scan", "1,2,8,2", ["pscan-style forward+backward"])])
def test_every_benchmark_runs_on_the_cuda_path_in_the_simulator(kernel, shape, rows, capsys):
    """``--device cuda`` under NUMBA_ENABLE_CUDASIM=1: the simulated kernels on CPU tensors,
    the GPU-only rows (SDPA bf16, backward, the batch sweep) included; no GPU time column
    (there is no GPU), and the header says the times are not measurements."""
    assert bench.main([kernel, "--device", "cuda", "--shape", shape]) == 0
    out = capsys.readouterr().out
    assert "on cuda: Numba's CUDA simulator" in out and "minimodels cuda kernel" in out
    for header in re.findall(r"^\| implementation \|.*$", out, flags=re.M):
        assert "GPU ms" not in header  # no GPU, no GPU time
    for row in rows:
        assert row in out
    assert not re.search(r"\bnan\b", out)
    if kernel != "attention":  # each row's error against float64 (attention: tests/test_gpu.py)
        assert re.search(r"(max err|rel\. error) \d", out)


def test_save_writes_tables_and_plot_per_device(tmp_path, monkeypatch, capsys):
    """``--save`` writes RESULTS/DEVICE/KERNEL.md and RESULTS/DEVICE.png (the same code path
    for --device cuda on a GPU; here on the CPU at a tiny size, into a temporary folder)."""
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    assert bench.main(["scan", "--shape", "1,2,8", "--save"]) == 0
    assert "| implementation |" in (tmp_path / "cpu" / "scan.md").read_text()
    assert (tmp_path / "cpu.png").read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {tmp_path / 'cpu.png'}" in capsys.readouterr().out


def test_a_cuda_table_with_gpu_times_plots(tmp_path):
    rows = [bench.Row("SDPA", 0.05, gpu_seconds=0.049), bench.Row("minimodels cuda kernel", 0.09,
                                                                  "tiled", 0.088)]
    (tmp_path / "cuda").mkdir()
    (tmp_path / "cuda" / "attention.md").write_text(
        "attention on cuda: H200\n\n" + bench.format_table(rows, reference="SDPA",
                                                             floor_seconds=0.03) + "\n")
    assert bench.plot_results("cuda", tmp_path).read_bytes()[:4] == b"\x89PNG"


def test_save_refuses_simulated_cuda_times(monkeypatch, capsys):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    if not bench.cuda_available():
        pytest.skip("numba.cuda cannot be imported")
    with pytest.raises(SystemExit):
        bench.main(["scan", "--device", "cuda", "--save"])
    assert "simulated" in capsys.readouterr().err


def test_mambapy_peer_computes_the_selective_scan():
    """The benchmark's mambapy row runs mambapy's own pscan on the same inputs: it must compute
    the same selective scan as the reference (float64), or its speed means nothing."""
    pytest.importorskip("mambapy")
    from minimodels.benchmarks.selective_scan import selective_scan_mambapy
    from minimodels.kernels import selective_scan as ss

    ex = ss.example_inputs((2, 3, 13, 4), dtype=torch.float64, seed=3)
    torch.testing.assert_close(ex.call(selective_scan_mambapy),
                               ex.call(ss.selective_scan, backend="ref"))


RESULTS = Path(__file__).resolve().parents[1] / "kernels" / "results" / "cuda"
GPU_TABLES = {"linear_scan": "scan", "attention": "attention", "wkv": "wkv", "s4d_kernel": "s4d",
              "selective_scan": "selective_scan", "monarch_multiply": "monarch",
              "causal_conv": "long_conv", "neighborhood_attention_2d": "natten"}


def _table_numbers(text: str) -> set[float]:
    """Every number in a cell of the Markdown tables of a saved results file."""
    cells = (c.strip() for line in text.splitlines() if line.startswith("|")
             for c in line.split("|"))
    return {float(c) for c in cells if re.fullmatch(r"-?\d+(\.\d+)?(e[+-]\d+)?", c)}


def test_readme_gpu_table_quotes_the_saved_results():
    """The README's GPU table is checked against ``kernels/results/cuda/`` (written by
    ``python -m minimodels.bench all --device cuda --save``): every time it gives as "N ms GPU"
    is a cell of that kernel's saved table, to the digits the README shows. A re-run that
    changes a table without the README (or the reverse) fails here."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### GPU", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "no GPU table in the README"
    checked = 0
    for row in rows:
        op = re.match(r"\| `(\w+)`", row).group(1)
        assert op in GPU_TABLES, f"README GPU row for {op}: no results table known"
        saved = _table_numbers((RESULTS / f"{GPU_TABLES[op]}.md").read_text())
        for quoted in re.findall(r"(\d+(?:\.\d+)?) ms GPU", row):
            digits = len(quoted.split(".")[1]) if "." in quoted else 0
            assert any(round(x, digits) == float(quoted) for x in saved), (
                f"README: {op} {quoted} ms GPU is not in kernels/results/cuda/"
                f"{GPU_TABLES[op]}.md")
            checked += 1
    assert checked >= 8


def test_plot_redraws_the_saved_tables_without_the_device(tmp_path, monkeypatch, capsys):
    """``python -m minimodels.bench plot --device cuda`` only reads the saved tables: it runs on
    a machine without a GPU (the tables come back from a lent one)."""
    (tmp_path / "cuda").mkdir()
    (tmp_path / "cuda" / "natten.md").write_text((bench.RESULTS / "cuda" / "natten.md").read_text())
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "cuda_available", lambda: False)
    assert bench.main(["plot", "--device", "cuda"]) == 0
    assert (tmp_path / "cuda.png").read_bytes()[:4] == b"\x89PNG"
    assert "cuda.png" in capsys.readouterr().out


def test_spread_and_verdict_say_when_noise_could_flip_a_target():
    runs = [0.49e-3, 0.47e-3, 0.48e-3]
    assert bench.spread(runs) == "0.480 ms (median of 3, 0.470-0.490)"
    assert bench.spread([1.0e-3, 1.004e-3, 1.01e-3]) == "1.00 ms (median of 3, 1.00-1.01)"
    assert bench.spread([0.1, 0.2, 0.3]) == "200 ms (median of 3, 100-300)"
    assert bench.verdict(runs, 0.5e-3) == "met"
    assert bench.verdict(runs, 0.46e-3) == "missed"
    assert bench.verdict(runs, 0.485e-3) == "within the spread"
