"""The official prompt sets: download, verification, caching and naming (awm_fast.prompt_sets), against a loopback
HTTP server serving small fixture files (no internet)."""
from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from awm_fast import prompt_sets
from awm_fast.cli import main
from awm_fast.config import load_config
from awm_fast.prompt_sets import (DownloadError, OfficialFile, PromptSetMissing, fetch, git_blob_id,
                                  resolve_prompt_files)

GOOD = b'{"tag": "counting", "include": [{"class": "cup", "count": 2}], "prompt": "a photo of two cups"}\n'


class FixtureServer:
    """Serves `files` (URL path -> bytes); `fail_first` requests get HTTP 500 first; `short` sends a Content-Length
    larger than the body, then closes (an interrupted transfer)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.fail_first, self.short, self.requests = 0, False, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests += 1
                if server.requests <= server.fail_first:
                    self.send_error(500, "fixture failure")
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (1000 if server.short else 0)))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FixtureServer()
    yield s
    s.close()


@pytest.fixture
def fixture_set(monkeypatch, tmp_path, server):
    """One fixture set 'demo_test' (GOOD, its git blob id and sha256) served by `server`; the cache in tmp_path."""
    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(prompt_sets.BASE_URL_ENV, server.url)
    entry = OfficialFile("demo_test", "owner/repo", "a" * 40, "dataset/demo/test_metadata.jsonl", git_blob_id(GOOD),
                         hashlib.sha256(GOOD).hexdigest(), "fixture")
    monkeypatch.setitem(prompt_sets.PROMPT_SETS, "demo_test", entry)
    server.files[f"/owner/repo/{'a' * 40}/dataset/demo/test_metadata.jsonl"] = GOOD
    return entry


def _cached_files(tmp_path):
    folder = tmp_path / "cache" / "prompts"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_good_download_is_verified_cached_and_not_fetched_again(fixture_set, server, tmp_path):
    path = fetch("demo_test", wait_s=0)
    assert path == tmp_path / "cache" / "prompts" / f"demo_test@{'a' * 10}.jsonl" and path.read_bytes() == GOOD
    assert fetch("demo_test", wait_s=0) == path and server.requests == 1  # a verified copy is not fetched again
    assert resolve_prompt_files("official:demo_test", "plain.txt") == [str(path), "plain.txt"]
    from awm_fast.rewards.prompts import load_prompt_set

    assert load_prompt_set(path) == (["a photo of two cups"], [{"tag": "counting", "include": [
        {"class": "cup", "count": 2}], "prompt": "a photo of two cups"}])


def test_wrong_checksum_is_refused_and_nothing_is_cached(fixture_set, server, tmp_path):
    server.files[next(iter(server.files))] = GOOD.replace(b"two", b"six")
    with pytest.raises(DownloadError, match="git blob id .* expected .*nothing was cached") as info:
        fetch("demo_test", wait_s=0)
    assert "\n" not in str(info.value) and _cached_files(tmp_path) == []
    assert server.requests == 1  # a complete body that does not verify is not retried


def test_sha256_is_checked_too(fixture_set, monkeypatch):
    monkeypatch.setitem(prompt_sets.PROMPT_SETS, "demo_test",
                        dataclasses.replace(fixture_set, sha256="0" * 64))
    with pytest.raises(DownloadError, match="sha256"):
        fetch("demo_test", wait_s=0)


def test_server_errors_are_retried_then_one_line(fixture_set, server, tmp_path):
    server.fail_first = 2
    assert fetch("demo_test", retries=3, wait_s=0).read_bytes() == GOOD and server.requests == 3
    (tmp_path / "cache" / "prompts" / fixture_set.filename).unlink()
    server.fail_first, server.requests = 100, 0
    with pytest.raises(DownloadError, match=r"could not download .* after 3 tries: HTTP Error 500") as info:
        fetch("demo_test", retries=2, wait_s=0)
    assert server.requests == 3 and "\n" not in str(info.value) and _cached_files(tmp_path) == []


def test_missing_file_is_not_retried(fixture_set, server, monkeypatch):
    monkeypatch.setitem(prompt_sets.PROMPT_SETS, "demo_test", dataclasses.replace(fixture_set, path="x"))
    with pytest.raises(DownloadError, match="HTTP Error 404"):
        fetch("demo_test", retries=3, wait_s=0)
    assert server.requests == 1


def test_interrupted_download_leaves_no_partial_file(fixture_set, server, tmp_path, monkeypatch):
    server.short = True  # the body stops 1000 bytes before its Content-Length
    with pytest.raises(DownloadError, match="after 2 tries"):
        fetch("demo_test", retries=1, wait_s=0)
    assert server.requests == 2 and _cached_files(tmp_path) == []
    server.short = False

    def interrupted(src, dst):  # Ctrl-C while the verified file is being put in place
        raise KeyboardInterrupt

    monkeypatch.setattr(prompt_sets.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch("demo_test", wait_s=0)
    assert _cached_files(tmp_path) == []  # neither the target nor its temporary file


def test_a_missing_set_stops_with_the_fetch_command(fixture_set, tmp_path):
    with pytest.raises(PromptSetMissing) as info:
        resolve_prompt_files("official:demo_test", "official:geneval_test", "official:demo_test")
    message = str(info.value)
    assert "`awm-fast prompts fetch demo_test geneval_test`" in message and "\n" not in message
    with pytest.raises(ValueError, match="no official prompt set 'nope'"):
        resolve_prompt_files("official:nope")


def test_training_stops_before_loading_a_model_when_a_set_is_missing(fixture_set, tmp_path):
    from awm_fast.train.task import build_task
    from tests.models.tiny_configs import tiny_model_config

    cfg = tiny_model_config(tmp_path, "sd3", tmp_path / "no_model_here", ["a cat"],
                            "sample.prompt_file=official:demo_test", "sample.eval_prompt_file=official:demo_test")
    with pytest.raises(PromptSetMissing, match=r"run `awm-fast prompts fetch demo_test`"):
        build_task(cfg, __import__("torch").device("cpu"))


def test_train_stops_with_one_line_before_making_a_run_folder(fixture_set, tmp_path):
    from awm_fast.train.trainer import train
    from tests.models.tiny_configs import tiny_model_config

    cfg = tiny_model_config(tmp_path, "sd3", tmp_path / "no_model_here", ["a cat"],
                            "sample.prompt_file=official:demo_test", "sample.eval_prompt_file=official:demo_test")
    with pytest.raises(PromptSetMissing, match=r"run `awm-fast prompts fetch demo_test`"):
        train(cfg)
    assert not (tmp_path / "sd3").exists()


def test_cli_fetch_and_list(fixture_set, server, tmp_path, capsys):
    assert main(["prompts", "fetch", "demo_test", "--base-url", server.url]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"demo_test: {tmp_path / 'cache' / 'prompts' / fixture_set.filename}"
    assert main(["prompts", "list"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"demo_test .*\[.*demo_test@a{10}\.jsonl\]", listing) and "geneval_train" in listing
    assert main(["prompts", "fetch", "nope"]) == 2
    assert "no official prompt set 'nope'" in capsys.readouterr().err
    server.fail_first, server.requests = 100, 0
    assert main(["prompts", "fetch", "demo_test", "--force", "--retries", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("awm-fast: error: demo_test: could not download") and "\n" not in err


def test_the_pinned_official_files_are_well_formed():
    for name, entry in prompt_sets.PROMPT_SETS.items():
        assert entry.name == name and re.fullmatch(r"[0-9a-f]{40}", entry.commit)
        assert re.fullmatch(r"[0-9a-f]{40}", entry.git_blob)
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
    assert prompt_sets.PROMPT_SETS["geneval_test"].url(prompt_sets.DEFAULT_BASE_URL) == (
        "https://raw.githubusercontent.com/scxue/advantage_weighted_matching/be5137232e33a21b449ed65a533211d0deb97ed8/"
        "advantage_weighted_matching/dataset/geneval/test_metadata.jsonl")


@pytest.mark.parametrize("preset,task", [("geneval_sd35m", "geneval"), ("ocr_sd35m", "ocr"),
                                         ("pickscore_sd35m", "pickscore"), ("geneval_sd35m_flow_grpo_fast", "geneval")])
def test_official_presets_name_the_official_sets(preset, task):
    s = load_config(preset).sample
    assert (s.prompt_file, s.eval_prompt_file) == (f"official:{task}_train", f"official:{task}_test")


# Files of the official repositories the preset headers cite (checked in the pinned trees with git ls-tree):
# scxue/advantage_weighted_matching@be51372 advantage_weighted_matching/{config/dgx_awm.py, config/base_awm.py,
# scripts/train_sd3_awm.py}; yifan123/flow_grpo@74db691 {config/grpo.py, config/base.py, scripts/train_sd3_fast.py};
# diffusers examples/advanced_diffusion_training... train_dreambooth_lora_flux2_klein.py (diffusers' own script).
OFFICIAL_CITED = {"advantage_weighted_matching/config/dgx_awm.py", "config/dgx_awm.py", "config/base_awm.py", "scripts/train_sd3_awm.py", "config/grpo.py",
                  "config/base.py", "base.py", "scripts/train_sd3_fast.py", "train_sd3_fast.py",
                  "train_dreambooth_lora_flux2_klein.py"}


def test_preset_headers_cite_only_files_that_exist():
    from pathlib import Path

    import awm_fast
    from awm_fast.config import list_presets

    package = Path(awm_fast.__file__).parent
    for preset in list_presets():
        header = "".join(line for line in (package / "configs" / f"{preset}.yaml").read_text().splitlines(True)
                         if line.startswith("#"))
        for cited in re.findall(r"[A-Za-z0-9_./-]+\.(?:py|md|yaml|txt|jsonl)\b", header):
            ours = [package.parent / cited, package / cited, package / "configs" / cited]
            assert cited in OFFICIAL_CITED or any(p.is_file() for p in ours), (preset, cited)
