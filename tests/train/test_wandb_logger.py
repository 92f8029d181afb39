"""run.wandb=true in offline mode (no network): the run's per-step metrics (the values of metrics.jsonl), the
evaluations, the end-of-run images and the config reach wandb's offline run log; a resumed run continues the
same wandb run id."""
import json
import struct

import pytest

pytest.importorskip("wandb")

from awm_fast.cli import main  # noqa: E402
from tests.train.test_faults import TINY  # noqa: E402


def read_wandb_log(path):
    """The records of an offline run's run-<id>.wandb: a 7-byte file header, then 32 KiB blocks of chunks
    (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last), each record a wandb protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _history(records):
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows[row["_step"]] = row
    return rows


def test_an_offline_wandb_run_gets_the_metrics_images_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    assert main(["train", *TINY, f"run.output_dir={tmp_path}", "run.name=w", "train.steps=2", "run.wandb=true",
                 "run.wandb_project=awm-test", "run.checkpoint_every=1"]) == 0
    run_id = (tmp_path / "w" / "wandb_id.txt").read_text()
    (folder,) = (tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}")
    records = read_wandb_log(folder / f"run-{run_id}.wandb")
    history = _history(records)
    jsonl = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    for row in jsonl:  # every per-step metric, the same value at the same step
        assert {k: v for k, v in history[row["step"]].items() if k in row and k != "step"} == \
               {k: v for k, v in row.items() if k != "step"}
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert history[0]["eval/accuracy/raw"] == summary["eval_before"]["accuracy"]  # the step-0 evaluation
    assert history[2]["eval/reward/raw"] == summary["eval_after"]["reward"]
    assert history[2]["eval/reward/ema"] == summary["eval_after_ema"]["reward"]
    assert history[2]["samples_before_after/_type"] == "image-file" and history[2]["curves/_type"] == "image-file"
    assert len(list((folder / "files" / "media" / "images").glob("samples_before_after_2_*.png"))) == 1
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert run.project == "awm-test" and run.display_name == "w"
    assert config["train"]["micro_batch"] == 4 and config["run"]["wandb"] is True

    assert main(["train", "--resume", str(tmp_path / "w"), "train.steps=3"]) == 0
    assert (tmp_path / "w" / "wandb_id.txt").read_text() == run_id  # the same wandb run continues
    (again,) = [f for f in (tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}") if f != folder]
    records = read_wandb_log(again / f"run-{run_id}.wandb")
    resumed = _history(records)
    assert 3 in resumed, f"history steps {sorted(resumed)}, records {[r.WhichOneof('record_type') for r in records]}"
    after = json.loads((tmp_path / "w" / "summary.json").read_text())["eval_after"]
    assert resumed[3]["eval/reward/raw"] == after["reward"]


def test_wandb_mode_is_checked():
    from awm_fast.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="run.wandb_mode='cloud'"):
        load_config(None, ["run.wandb_mode=cloud"])


def test_online_wandb_without_a_login_stops_in_one_line_before_the_run_folder(tmp_path, monkeypatch, capsys):
    import time

    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "netrc").write_text("machine example.org login u password p\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    started = time.perf_counter()
    code = main(["train", *TINY, f"run.output_dir={tmp_path / 'runs'}", "run.name=w", "run.wandb=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "no wandb API key" in err[0] and "run.wandb_mode=offline" in err[0], err
    assert not (tmp_path / "runs").exists() and time.perf_counter() - started < 30  # before anything loads
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    from awm_fast.train.wandb_logger import has_api_key

    assert has_api_key()
