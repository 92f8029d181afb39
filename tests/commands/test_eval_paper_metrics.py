"""`awm-fast eval` prints GenEval in the papers' form (Overall = mean of the task accuracies), on a tiny SD3
pipeline scored by a loopback GenEval server, and keeps the numbers in metrics.json."""
import csv
import json
import logging
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from awm_fast.cli import main
from awm_fast.train.paper_metrics import GENEVAL_TASKS
from tests.models.tiny_configs import tiny_model_config
CORRECT = {0, 2, 6}  # prompt indices the fake server calls correct (strict): Overall 1/3, image mean 3/8


class FakeGenEval:
    """The GenEval reward server's protocol on loopback: an image is correct (strict) when its prompt's index
    (the number ending the prompt) is in CORRECT."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                data = pickle.loads(self.rfile.read(int(self.headers["Content-Length"])))
                strict = [float(int(m["prompt"].split()[-1]) in CORRECT) for m in data["meta_datas"]]
                reply = pickle.dumps({"scores": strict, "rewards": strict, "strict_rewards": strict,
                                      "group_rewards": {}, "group_strict_rewards": {}})
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def geneval_server():
    s = FakeGenEval()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_eval_prints_geneval_in_the_papers_form(tmp_path, monkeypatch, caplog, geneval_server):
    from awm_fast.families.tiny import build_tiny_sd3

    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    pipe = build_tiny_sd3(tmp_path / "pipe")
    tags = list(GENEVAL_TASKS) + ["counting", "colors"]
    meta = [{"tag": t, "include": [{"class": "cat", "count": 1}], "prompt": f"a photo of a cat, {t} {i}"}
            for i, t in enumerate(tags)]
    prompts = tmp_path / "geneval_demo.jsonl"
    prompts.write_text("".join(json.dumps(m) + "\n" for m in meta))
    cfg = tiny_model_config(tmp_path, "sd3", pipe, [m["prompt"] for m in meta], "model.text_tokens=16")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    caplog.set_level(logging.INFO, logger="awm_fast")
    out = tmp_path / "ev"
    assert main(["eval", "--base", "--config", str(config), "--prompts", str(prompts), "--num-prompts", str(len(tags)),
                 "--reward", f"geneval@{{url: {geneval_server.url}}}", "--out", str(out)]) == 0
    with open(out / "per_prompt.csv") as f:
        strict = [float(r["geneval_strict"]) for r in csv.DictReader(f)]
    assert 0 < sum(strict) < len(strict), strict  # some images correct, some not: the averages differ
    per_task = {GENEVAL_TASKS[t]: sum(s for s, u in zip(strict, tags) if u == t) / tags.count(t) for t in GENEVAL_TASKS}
    paper = json.loads((out / "metrics.json").read_text())["results"]["base"]["paper"]["raw"]["GenEval"]
    assert paper == pytest.approx({"Overall": sum(per_task.values()) / 6, **per_task})
    assert paper["Overall"] == pytest.approx(1 / 3) and sum(strict) / len(strict) == 3 / 8
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[paper]")]
    assert lines == [f"[paper] base (raw weights) GenEval: Overall {paper['Overall']:.4f} | "
                     + " | ".join(f"{k} {paper[k]:.4f}" for k in GENEVAL_TASKS.values())]
