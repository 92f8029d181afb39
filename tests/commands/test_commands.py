"""`awm-fast eval / sample / export` on a digits run and on tiny SD3 / FLUX runs: outputs, exactness against the
trainer's own evaluation, the merged export's faithfulness, and one-line errors with exit code 2."""
import csv
import json

import pytest
import torch

from awm_fast.cli import main
from awm_fast.train.trainer import train
from tests.models.tiny_configs import tiny_model_config
from tests.train.test_faults import TINY

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 2-step digits run with a checkpoint after each step (10 evaluation prompts)."""
    out = tmp_path_factory.mktemp("digits")
    code = main(["train", *TINY, f"run.output_dir={out}", "run.name=d", "train.steps=2", "train.lr=0.01",
                 "run.checkpoint_every=1", "digits.eval_per_digit=1"])
    assert code == 0
    return out / "d"


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def test_eval_of_every_checkpoint_reproduces_the_trainers_evaluation(digits_run, tmp_path):
    out = tmp_path / "ev"
    assert main(["eval", str(digits_run), "--all-checkpoints", "--out", str(out)]) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert set(results) == {"d/step_000001", "d/step_000002"}
    summary = _summary(digits_run)
    assert results["d/step_000002"]["raw"] == summary["eval_after"]  # same seeds, prompts, batches: exact
    assert results["d/step_000002"]["ema"] == summary["eval_after_ema"]
    assert results["d/step_000001"]["raw"] != results["d/step_000002"]["raw"]
    rows = list(csv.DictReader(open(out / "per_prompt.csv")))
    assert len(rows) == 2 * 2 * 10  # checkpoints x weights x prompts
    last = [float(r["reward"]) for r in rows if r["source"] == "d/step_000002" and r["weights"] == "raw"]
    assert sum(last) / len(last) == pytest.approx(summary["eval_after"]["reward"], rel=1e-12)
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| source | step | weights | reward | accuracy |" and len(table) == 2 + 4
    assert [r["step"] for r in csv.DictReader(open(out / "table.csv"))] == ["1", "1", "2", "2"]
    for name in ("reward_vs_step.png", "grid_d_step_000002_raw.png", "grid_d_step_000001_ema.png"):
        assert (out / name).stat().st_size > 0


def test_eval_of_the_base_model_with_two_rewards(digits_run, tmp_path):
    out = tmp_path / "base"
    assert main(["eval", "--base", *TINY, "digits.eval_per_digit=1", "--reward", "digits", "--reward",
                 "jpeg_compressibility@{quality: 90}", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["results"]["base"]["raw"]
    assert metrics["digits/reward"] == _summary(digits_run)["eval_before"]["reward"]  # the untrained model
    assert metrics["reward"] == metrics["digits/reward"] and metrics["jpeg_compressibility/reward"] < 0
    header = next(csv.reader(open(out / "per_prompt.csv")))
    assert {"digits/accuracy", "jpeg_compressibility/jpeg_kb"} <= set(header)


def test_sample_writes_deterministic_pngs_and_a_grid(digits_run, tmp_path):
    from PIL import Image

    args = ["sample", str(digits_run), "--prompt", "3", "--prompt", "7", "--num-per-prompt", "3", "--seed", "5",
            "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    info = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert [r["prompt"] for r in info["images"]] == ["3"] * 3 + ["7"] * 3 and info["sampler"] == "ode"
    for r in info["images"]:
        a, b = (Image.open(tmp_path / d / r["file"]) for d in "ab")
        assert a.size == (8, 8) and a.tobytes() == b.tobytes()
    assert Image.open(tmp_path / "a" / "grid.png").size[0] > 3 * 8
    assert main([*args, "--sampler", "sa_solver", "--weights", "ema", "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "0000.png").read_bytes() != (tmp_path / "a" / "0000.png").read_bytes()


def test_export_writes_the_lora_and_a_faithful_merged_transformer(digits_run, tmp_path):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    out = tmp_path / "x"
    assert main(["export", str(digits_run), "--out", str(out), "--merged"]) == 0
    info = json.loads((out / "export.json").read_text())
    assert info["max_rel_diff"] <= info["tolerance"] == 1e-4
    assert info["adapter_effect"] > 100 * info["max_abs_diff"]  # the check sees the LoRA, not a no-op
    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    saved = load_file(str(digits_run / "checkpoints" / "step_000002" / "default" / "pytorch_lora_weights.safetensors"))
    assert lora.keys() == saved.keys() and all(torch.equal(lora[k], saved[k]) for k in lora)
    merged = SD3Transformer2DModel.from_pretrained(out / "merged" / "transformer")
    assert not [n for n, _ in merged.named_parameters() if "lora" in n]
    assert main(["export", str(digits_run), "--out", str(tmp_path / "e"), "--weights", "ema"]) == 0
    ema = load_file(str(tmp_path / "e" / "lora" / "pytorch_lora_weights.safetensors"))
    assert ema.keys() == lora.keys() and any(not torch.equal(ema[k], lora[k]) for k in lora)


@pytest.mark.parametrize("argv, message", [
    (["eval", "/no/such/run", "--out", "OUT"], "no such run or checkpoint folder: /no/such/run"),
    (["eval", "RUN", "--reward", "nope", "--out", "OUT"], "unknown reward 'nope'"),
    (["eval", "RUN", "train.nope=1", "--out", "OUT"], "unknown config key 'train.nope'"),
    (["eval", "RUN", "--config", "digits", "--out", "OUT"], "the run's own config is used"),
    (["eval", "--out", "OUT"], "give a run or checkpoint folder, or --base"),
    (["sample", "RUN", "--prompt", "cat", "--out", "OUT"], "prompt 'cat': the digits model knows"),
    (["sample", "RUN", "--out", "OUT"], "no prompts"),
    (["sample", "RUN", "--prompt", "1", "--sampler", "heun", "--out", "OUT"], "--sampler 'heun'"),
    (["sample", "--base", "--prompt", "1", "--weights", "ema", "--out", "OUT"], "no evaluation EMA"),
    (["export", "/no/such/ckpt", "--out", "OUT"], "no such run or checkpoint folder"),
    (["serve-reward", "nope", "--port", "0"], "unknown reward 'nope'"),
])
def test_bad_input_is_one_line_and_exit_code_2(digits_run, tmp_path, capsys, argv, message):
    argv = [str(digits_run) if a == "RUN" else str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("awm-fast: error: ") and message in err[0], err


@pytest.mark.parametrize("command", ["eval", "sample", "export", "serve-reward", "prompts", "train"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0 and f"usage: awm-fast {command}" in capsys.readouterr().out


PROMPTS = ["a red cube", "two green balls", "a photo of a cat", 'the word "hi" on a sign']


@pytest.fixture(scope="module", params=["sd3", "flux"])
def trained_tiny_pipeline(request, tmp_path_factory):
    """A 2-step LoRA run on a tiny random-weight SD3 or FLUX pipeline (its own prompt-embedding cache)."""
    from awm_fast.families.tiny import build_tiny_flux, build_tiny_sd3

    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    mp = pytest.MonkeyPatch()
    mp.setenv("AWM_FAST_CACHE", str(root / "cache"))
    pipe = (build_tiny_sd3 if kind == "sd3" else build_tiny_flux)(root / "pipe")
    cfg = tiny_model_config(root, kind, pipe, PROMPTS, "train.lr=0.05")
    train(cfg)
    yield kind, root / kind, pipe
    mp.undo()


def test_tiny_pipelines_export_merged_eval_and_sample(trained_tiny_pipeline, tmp_path):
    from diffusers import DiffusionPipeline

    kind, run, _ = trained_tiny_pipeline
    out = tmp_path / "x"
    assert main(["export", str(run), "--out", str(out), "--merged"]) == 0
    info = json.loads((out / "export.json").read_text())
    assert info["max_rel_diff"] <= 1e-4 and info["adapter_effect"] > 100 * info["max_abs_diff"]
    absent = {k: None for k, v in json.loads((out / "merged" / "model_index.json").read_text()).items()
              if v == [None, None]}
    pipe = DiffusionPipeline.from_pretrained(out / "merged", **absent)  # a plain pipeline: no LoRA layer left
    assert all(f"{k}=None" in info["load"] for k in absent)  # the load line the export prints says so
    assert type(pipe).__name__ == ("StableDiffusion3Pipeline" if kind == "sd3" else "FluxPipeline")
    assert not [n for n, _ in pipe.transformer.named_parameters() if "lora" in n]

    ev = tmp_path / "ev"
    assert main(["eval", str(run), "--out", str(ev), "--reward", "jpeg_compressibility"]) == 0
    results = json.loads((ev / "metrics.json").read_text())["results"][f"{kind}/step_000002"]
    assert results["raw"] == json.loads((run / "summary.json").read_text())["eval_after"]
    sm = tmp_path / "s"
    assert main(["sample", str(run), "--prompt", "a red cube", "--num-per-prompt", "2", "--steps", "3",
                 "--out", str(sm)]) == 0
    assert len(json.loads((sm / "samples.json").read_text())["images"]) == 2 and (sm / "grid.png").is_file()


def test_export_both_weights_a_non_empty_folder_and_overwrite(digits_run, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "both"
    assert main(["export", str(digits_run), "--out", str(out), "--weights", "both"]) == 0
    raw, ema = (load_file(str(out / w / "lora" / "pytorch_lora_weights.safetensors")) for w in ("raw", "ema"))
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert json.loads((out / "ema" / "export.json").read_text())["weights"] == "ema"
    capsys.readouterr()
    # a second export into the same folder: refused (no stale files beside new ones) unless --overwrite
    assert main(["export", str(digits_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty" in err[0] and "--overwrite" in err[0]
    assert main(["export", str(digits_run), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "lora"]  # raw/ and ema/ are gone
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(digits_run), "--out", str(out), "--overwrite"]) == 2
    assert (out / "notes.txt").read_text() == "mine" and "notes.txt" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "sample", "export"])
def test_weights_outside_the_choices_is_refused_in_one_line(digits_run, tmp_path, capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, str(digits_run), "--weights", "latest", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "invalid choice: 'latest'" in err[0], err
    assert not (tmp_path / "o").exists()
