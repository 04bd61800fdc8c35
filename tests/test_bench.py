"""The benchmark helpers and the plain-PyTorch peers (they must compute the same scan)."""

import pytest
import torch

from minimodels import bench
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
