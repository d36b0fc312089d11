"""TensorBoard and W&B sinks, offline: the event file and the W&B run file read back; missing extras."""
import glob
import json
import math
import struct
import sys
import time

import pytest

from fusedrl.config import ConfigError, TrainConfig
from fusedrl.train import metrics as metrics_mod
from fusedrl.train.metrics import MetricsLogger
from fusedrl.train.sinks import check_logging

STEPS = [(1, {"loss": 2.0, "lr": 0.1}), (2, {"loss": 1.5, "lr": 0.2, "grad_norm": float("nan")}),
         (3, {"loss": 1.25, "lr": 0.3})]


def _log(run_dir, cfg):
    logger = MetricsLogger(run_dir, total_steps=3, progress=False, config=cfg)
    for step, record in STEPS:
        logger.log_step(step, record)
    logger.log_eval(3, {"loss": 0.75})
    logger.close()


def test_tensorboard_sink_writes_the_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig()
    cfg.logging.tensorboard = True
    _log(tmp_path, cfg)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    # grad_norm was only ever NaN: non-finite values are left out (an inf would break the axis)
    assert sorted(events.Tags()["scalars"]) == ["eval/loss", "train/loss", "train/lr"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.0), (2, 1.5), (3, 1.25)]
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [(3, 0.75)]
    assert events.Tags()["tensors"] == ["config/text_summary"]  # the resolved config, as text


def _wandb_records(path):
    """Records of a .wandb file: a 7-byte header, then LevelDB-log framing (32 KiB blocks, 7-byte
    record headers: crc32, length, type 1 full / 2 first / 3 middle / 4 last) of Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, pos, buf, records = open(path, "rb").read(), 7, b"", []
    if len(data) < 7:
        return records
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def test_wandb_sink_offline_logs_the_history_under_the_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"run_id": "abc123def456"}))
    cfg = TrainConfig()
    cfg.logging.wandb_project, cfg.logging.wandb_mode = "fusedrl-test", "offline"
    _log(run_dir, cfg)
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*-abc123def456" / "run-abc123def456.wandb"))
    assert len(files) == 1, sorted(p.name for p in (run_dir / "wandb").iterdir())
    deadline = time.monotonic() + 30
    while True:  # wandb-core may still be flushing the file when finish() returns
        records = _wandb_records(files[0])
        kinds = [r.WhichOneof("record_type") for r in records]
        if (kinds and kinds[-1] == "exit") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "run" in kinds and kinds[-1] == "exit", kinds
    run = [r.run for r in records if r.WhichOneof("record_type") == "run"][0]
    assert (run.run_id, run.project, run.display_name) == ("abc123def456", "fusedrl-test", "run")
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            history[record.history.step.num] = {k: json.loads(v) for k, v in items.items() if not k.startswith("_")}
    assert history[1] == {"train/loss": 2.0, "train/lr": 0.1}
    assert math.isnan(history[2].pop("train/grad_norm"))  # W&B keeps NaN (its charts show the gap)
    assert history[2] == {"train/loss": 1.5, "train/lr": 0.2}
    assert history[3] == {"train/loss": 1.25, "train/lr": 0.3, "eval/loss": 0.75}


class _FakeWandbRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step):
        self.calls.append(("log", step, data))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_sink_passes_project_entity_mode_and_config(tmp_path, monkeypatch):
    calls = []
    fake = type(sys)("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or _FakeWandbRun(calls)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = TrainConfig()
    cfg.logging.wandb_project, cfg.logging.wandb_entity = "proj", "team"
    _log(tmp_path / "r", cfg)
    init = calls[0][1]
    assert (init["project"], init["entity"], init["name"], init["dir"]) == ("proj", "team", "r", str(tmp_path / "r"))
    assert "mode" not in init and "id" not in init  # "" leaves the mode to WANDB_MODE; no run.json: a new id
    assert init["config"]["logging"]["wandb_project"] == "proj" and init["config"]["optim"]["lr"] == cfg.optim.lr
    assert calls[1] == ("log", 1, {"train/loss": 2.0, "train/lr": 0.1})
    assert calls[-2] == ("log", 3, {"eval/loss": 0.75}) and calls[-1] == ("finish",)


@pytest.mark.parametrize("module, field, value", [("tensorboard", "tensorboard", True),
                                                  ("wandb", "wandb_project", "p")])
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, module, field, value):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    cfg = TrainConfig()
    setattr(cfg.logging, field, value)
    with pytest.raises(ConfigError, match=rf"^logging\.{field}: needs the '{module}' package.*"
                                          rf"pip install 'fusedrl\[{module}\]'$"):
        check_logging(cfg.logging)
    check_logging(TrainConfig().logging)  # nothing asked: nothing needed


def test_bad_wandb_mode_and_other_ranks(tmp_path, monkeypatch):
    cfg = TrainConfig()
    cfg.logging.wandb_mode = "online-ish"
    with pytest.raises(ConfigError, match="logging.wandb_mode"):
        check_logging(cfg.logging)
    cfg = TrainConfig()
    cfg.logging.tensorboard = True
    monkeypatch.setattr(metrics_mod, "is_rank0", lambda: False)
    _log(tmp_path, cfg)
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "metrics.jsonl").exists()
