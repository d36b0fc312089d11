"""Metrics: JSONL reading after a torn write, resumed-run series, the console line, the matplotlib plots."""
import json

import numpy as np
import pytest

from fusedrl.train.metrics import format_line, read_metrics, series, summary_table, write_plots
from fusedrl.train.plot import PALETTE, ema, is_noisy, line_plot, read_png, stage_figure


def _colour_pixels(pixels, rgb, tol=40):
    return int((np.abs(pixels.astype(int) - np.array(rgb)).sum(axis=2) < tol).sum())


def test_line_plot_draws_series_and_survives_nan(tmp_path):
    xs = np.arange(10)
    path = line_plot({"a": (xs, np.linspace(0, 1, 10)), "b": (xs, [np.nan] * 3 + [0, 1, 2, np.inf, 4, 5, 6])},
                     tmp_path / "p" / "plot.png", title="t")
    pixels = read_png(path)
    assert pixels.shape == (400, 640, 3)
    assert _colour_pixels(pixels, PALETTE[0]) > 200 and _colour_pixels(pixels, PALETTE[1]) > 200  # both curves
    with pytest.raises(ValueError, match=r"series\['a'\]: xs and ys differ"):
        line_plot({"a": ([1, 2], [1.0])}, tmp_path / "bad.png")
    (tmp_path / "not.png").write_text("x")
    with pytest.raises(ValueError, match="not a PNG"):
        read_png(tmp_path / "not.png")


def test_ema_is_debiased_and_skips_nan():
    values = [1.0, 3.0, float("nan"), 2.0]
    out = ema(values, 0.5)
    # avg1 = 0.5, /0.5 -> 1; avg2 = 0.25 + 1.5 = 1.75, /0.75; nan stays; avg3 = 0.875 + 1 = 1.875, /0.875
    assert out[0] == pytest.approx(1.0) and out[1] == pytest.approx(1.75 / 0.75)
    assert np.isnan(out[2]) and out[3] == pytest.approx(1.875 / 0.875)
    assert np.allclose(ema([2.0] * 7, 0.9), 2.0)  # a constant stays constant (no pull towards 0)
    with pytest.raises(ValueError, match="weight"):
        ema([1.0], 1.0)


def test_noisy_series_are_smoothed_and_trends_are_not(tmp_path):
    rng = np.random.default_rng(0)
    noisy = np.linspace(0, 1, 60) + rng.normal(0, 0.5, 60)
    assert is_noisy(noisy) and not is_noisy(np.linspace(3, 1, 60)) and not is_noisy(noisy[:5])
    raw = read_png(line_plot({"r": (np.arange(60), noisy)}, tmp_path / "r.png", smooth=False))
    smoothed = read_png(line_plot({"r": (np.arange(60), noisy)}, tmp_path / "s.png"))
    # the smoothed plot adds a faint copy (blended with white) of the raw curve behind the EMA
    faint = tuple(int(round(255 - 0.25 * (255 - c))) for c in PALETTE[0])
    assert _colour_pixels(smoothed, faint, 20) > 3 * max(_colour_pixels(raw, faint, 20), 1)


def test_stage_figure_has_a_panel_per_metric(tmp_path):
    xs = np.arange(20)
    panels = {f"m{i}": {"train": (xs, np.sin(xs + i))} for i in range(4)}
    one = read_png(stage_figure({"m0": panels["m0"]}, tmp_path / "one.png"))
    four = read_png(stage_figure(panels, tmp_path / "four.png", title="sft", columns=3))
    assert four.shape[1] == 3 * one.shape[1] and four.shape[0] > 1.5 * one.shape[0]  # 3 columns, 2 rows
    with pytest.raises(ValueError, match="panels"):
        stage_figure({}, tmp_path / "none.png")


def test_resumed_logs_keep_the_last_record_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s, "loss": float(s)} for s in (1, 2, 3)]
    rows += [{"kind": "train", "step": 3, "loss": 30.0}, {"kind": "eval", "step": 3, "eval/loss": 9.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st')  # torn last line
    records = read_metrics(path)
    assert len(records) == 5
    assert series(records, "loss") == ([1, 2, 3], [1.0, 2.0, 30.0])
    written = write_plots(records, tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png"]  # train and eval loss share one plot
    assert (tmp_path / "plots" / "overview.png").is_file()
    assert "| loss | 1 (step 1) | 30 (step 3) |" in summary_table(records)


def test_console_line_puts_the_main_numbers_first():
    line = format_line(3, 10, {"zeta": 1.0, "lr": 1e-5, "loss": 2.5, "grad_norm": 0.25})
    assert line == "step 3/10 | loss 2.5 | grad_norm 0.25 | lr 1.000e-05 | zeta 1"


def test_report_shows_the_time_split(tmp_path):
    from fusedrl.train.metrics import time_split_table, write_report

    records = [{"step": 1, "time_generate": 3.0, "time_update": 1.0, "loss": 0.5},
               {"step": 2, "time_generate": 5.0, "time_update": 1.0, "time_score": float("nan")}]
    table = time_split_table(records)
    lines = table.splitlines()
    assert lines[2].startswith("| generate | 4") and lines[2].endswith("| 80% |")  # mean 4 s of 5 s
    assert lines[3].startswith("| update | 1") and lines[3].endswith("| 20% |")
    assert "score" not in table  # non-finite values are not averaged
    assert time_split_table([{"step": 1, "loss": 1.0}]) == ""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:1]))
    report = write_report(tmp_path, title="t").read_text()
    assert "## Where a step's time goes" in report and "| generate |" in report


def test_report_shows_the_overview_figure_and_links_each_plot(tmp_path):
    from fusedrl.train.metrics import write_report

    records = [{"kind": "train", "step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_plots(records, tmp_path / "plots", title="sft")
    report = write_report(tmp_path, title="t").read_text()
    assert "![overview](plots/overview.png)" in report
    assert "[loss](plots/loss.png)" in report and "[lr](plots/lr.png)" in report
    assert "![loss]" not in report  # one figure per stage; the per-metric plots are links


def test_deferred_plots_are_written_by_the_end_of_the_block_and_the_report_lists_them(tmp_path):
    from fusedrl.train.metrics import deferred_plots, write_report

    records = [{"kind": "train", "step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with deferred_plots():
        written = write_plots(records, tmp_path / "plots", title="sft")
        write_report(tmp_path, title="t")
    assert all(p.is_file() for p in written) and (tmp_path / "plots" / "overview.png").is_file()
    assert read_png(written[0]).shape == read_png(write_plots(records, tmp_path / "now")[0]).shape
    report = (tmp_path / "report.md").read_text()
    assert "![overview](plots/overview.png)" in report and "[loss](plots/loss.png)" in report
    with pytest.raises(ValueError, match="xs and ys differ"):
        with deferred_plots():  # a drawing's error surfaces when the block ends
            from fusedrl.train import metrics
            metrics._deferred["futures"].append(metrics._deferred["pool"].submit(
                stage_figure, {"m": {"m": ([1, 2], [1.0])}}, tmp_path / "bad.png"))
