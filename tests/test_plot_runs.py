"""bench/plot_runs.py (Koppula et al.: accuracy against total training FLOPs): on two tiny real runs it writes a PNG
and a Markdown table of the logged numbers; without matplotlib it says what to install."""

import json
import os
import subprocess
import sys

import plot_runs
import pytest
from conftest import ROOT, TINY, run_script

import common

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table_rows(text):
    """The Markdown table's rows as lists of cells, header and rule lines included."""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


def one_point_run(tmp_path):
    """A run folder whose log holds one training interval and one k-NN record."""
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"epoch": 0, "step": 4, "loss": 9.0, "flops": 4e9},
        {"epoch": 0, "step": 4, "flops": 4e9, "knn_top1": 30.0},
    ]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """SimCLR and SimCLR-abs, 2 epochs of 4 steps each with the k-NN monitor (and the online probe) after both."""
    root = tmp_path_factory.mktemp("plot")
    for name, similarity in (("cos", "cos"), ("abs", "abs")):
        flags = [*TINY, "--epochs", 2, "--knn-every", 1, "--similarity", similarity, "--out", root / name]
        run_script("simclr.py", *flags)
    return root


@pytest.mark.slow
def test_two_tiny_runs_give_a_table_of_the_logged_numbers(two_runs, tmp_path, capsys):
    (two_runs / "abs" / "eval.json").write_text(json.dumps({"knn_top1": 33.25, "linear_top1": 41.75}))
    baseline = tmp_path / "random.json"
    baseline.write_text(json.dumps({"knn_top1": 20.0, "linear_top1": 25.0}))
    plot_runs.main([str(two_runs / "cos"), str(two_runs / "abs"), "--png", "", "--baseline", f"random init={baseline}"])
    rows = table_rows(capsys.readouterr().out)
    points = [r for r in rows if len(r) == 4 and r[0] in ("cos", "abs")]
    for name in ("cos", "abs"):
        monitored = [r for r in common.read_log(two_runs / name / "log.jsonl") if "knn_top1" in r]
        assert len(monitored) == 2  # epochs 0 and 1
        want = [[name, f"{r['flops']:.3g}", f"{r['knn_top1']:.1f}", f"{r['online_top1']:.1f}"] for r in monitored]
        assert [r for r in points if r[0] == name] == want
        assert monitored[1]["flops"] == 2 * monitored[0]["flops"] > 0  # cumulative: 8 steps against 4
    summary = {r[0]: r for r in rows if len(r) == 9}
    last = [r for r in common.read_log(two_runs / "abs" / "log.jsonl") if "knn_top1" in r][-1]
    assert summary["abs"][1:5] == ["simclr", "resnet18", "8", f"{last['flops']:.3g}"]
    assert summary["abs"][5:] == [f"{last['knn_top1']:.1f}", f"{last['online_top1']:.1f}", "33.2", "41.8"]
    assert summary["cos"][7:] == ["-", "-"]  # no eval.json
    assert summary["random init"][7:] == ["20.0", "25.0"]


@pytest.mark.slow
def test_two_tiny_runs_give_a_png(two_runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # an optional dependency: skipped, not failed, where it is absent
    png = tmp_path / "figure.png"
    plot_runs.main([str(two_runs / "cos"), str(two_runs / "abs"), "--png", str(png)])
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert capsys.readouterr().out.strip().endswith(f"wrote {png}")


def test_without_matplotlib_the_table_still_prints_and_the_figure_names_the_install(tmp_path, monkeypatch, capsys):
    run = one_point_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    plot_runs.main([str(run), "--png", ""])
    assert ["run", "4e+09", "30.0", "-"] in table_rows(capsys.readouterr().out)
    with pytest.raises(common.UserError, match="pip install matplotlib"):
        plot_runs.main([str(run), "--png", str(tmp_path / "figure.png")])
    assert not (tmp_path / "figure.png").exists()
    assert ["run", "4e+09", "30.0", "-"] in table_rows(capsys.readouterr().out)  # the table comes first


def test_bad_inputs_are_user_errors(tmp_path):
    run = one_point_run(tmp_path)
    (run / "summary.json").write_text("[1, 2]")
    with pytest.raises(common.UserError, match="does not hold a JSON object"):
        plot_runs.main([str(run), "--png", ""])
    (run / "summary.json").unlink()
    with pytest.raises(common.UserError, match="expected LABEL=path"):
        plot_runs.main([str(run), "--png", "", "--baseline", "no-label-here.json"])
    (tmp_path / "other.json").write_text(json.dumps({"steps": 4}))
    with pytest.raises(common.UserError, match="is not an eval.json"):
        plot_runs.main([str(run), "--png", "", "--baseline", f"x={tmp_path / 'other.json'}"])
    pytest.importorskip("matplotlib")
    with pytest.raises(common.UserError, match="cannot write --png"):
        plot_runs.main([str(run), "--png", str(tmp_path / "no-such-folder" / "figure.png")])


def test_a_folder_without_a_log_is_one_error_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "plot_runs.py"), str(tmp_path), "--png", ""],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path} is not a run folder: it has no log.jsonl"]
