"""Metrics: JSONL reading after a torn write, resumed-run series, the console line, the PNG writer."""
import json

import numpy as np
import pytest

from fusedrl.train.metrics import format_line, read_metrics, series, summary_table, write_plots
from fusedrl.train.plot import encode_png, line_plot, nice_ticks, read_png


def test_png_round_trip_is_exact(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(7, 13, 3), dtype=np.uint8)
    (tmp_path / "x.png").write_bytes(encode_png(image))
    assert np.array_equal(read_png(tmp_path / "x.png"), image)
    with pytest.raises(ValueError, match=r"image: expected an \(H, W, 3\) uint8 array"):
        encode_png(image.astype(np.float32))


def test_line_plot_draws_series_and_survives_nan(tmp_path):
    xs = np.arange(10)
    path = line_plot({"a": (xs, np.linspace(0, 1, 10)), "b": (xs, [np.nan] * 3 + list(range(7)))},
                     tmp_path / "p" / "plot.png", title="t")
    pixels = read_png(path)
    assert pixels.shape == (400, 640, 3)
    blue = np.all(pixels == (0, 114, 178), axis=2).sum()
    orange = np.all(pixels == (213, 94, 0), axis=2).sum()
    assert blue > 200 and orange > 200  # both curves (and legend marks) are drawn
    with pytest.raises(ValueError, match=r"series\['a'\]: xs and ys differ"):
        line_plot({"a": ([1, 2], [1.0])}, tmp_path / "bad.png")


def test_nice_ticks():
    assert nice_ticks(0, 1) == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert nice_ticks(3, 97) == pytest.approx([25, 50, 75])  # step: the first of 10, 20, 25, 50 >= 94 / 4
    assert nice_ticks(5, 5) == [5]


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
