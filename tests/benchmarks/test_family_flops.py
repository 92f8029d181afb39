"""The per-family FLOP table: every diffusers-family preset has a row from its family's formula, the rollout /
training budget follows the presets' steps, CFG and KL terms, and a run's MFU comes from its metrics."""
import json

import pytest
import yaml

from awm_fast.config import load_config
from awm_fast.families import PIPELINE_KINDS
from benchmarks import _models, family_flops


@pytest.fixture(scope="module")
def rows():
    return family_flops.preset_table()


def test_every_family_with_a_preset_has_its_formula(rows):
    kinds = {r["kind"] for r in rows.values()}
    assert {"sd3", "flux", "flux2", "qwen_image", "z_image", "wan"} <= kinds <= set(PIPELINE_KINDS)
    assert all(r["forward_tflop"] > 0 and r["params_b"] > 0 for r in rows.values())
    # SD3.5-M and FLUX.1-dev at the harness' full shapes: the formulas benchmarks/_models.py checks
    assert rows["geneval_sd35m"]["forward_tflop"] * 1e12 == _models.forward_flops(_models.model_spec("full"))
    assert rows["geneval_flux_dev"]["forward_tflop"] * 1e12 == _models.forward_flops(_models.model_spec("full", "flux"))
    assert 8.0 < rows["geneval_sd35l"]["params_b"] < 8.2 and 2.2 < rows["geneval_sd35m"]["params_b"] < 2.3
    assert rows["pickscore_wan"]["latent_shape"] == [16, 9, 60, 60]  # 33 frames -> 9 latent frames at 480 px
    assert rows["geneval_flux2_klein"]["latent_shape"] == [128, 32, 32]


def test_budget_follows_steps_cfg_and_kl_terms(rows):
    for name, r in rows.items():
        cfg = load_config(name)
        f = r["forward_tflop"]
        c = 2 if cfg.sample.guidance_scale != 1.0 else 1
        assert r["rollout_tflop"] == pytest.approx(cfg.sample.num_steps * c * f), name
        assert r["train_tflop"] == pytest.approx(cfg.train.num_timesteps * (r["forward_calls_per_row"] + 2) * f), name
    assert rows["pickscore_wan"]["cfg"] and not rows["geneval_sd35m"]["cfg"]
    assert rows["geneval_sd35m"]["forward_calls_per_row"] == 3  # policy, reference, EMA
    assert rows["geneval_flux2_klein"]["forward_calls_per_row"] == 2  # ema_beta 0: no EMA call


def test_mfu_of_a_run_from_its_metrics(tmp_path):
    cfg = load_config("geneval_sd35m")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "images_per_s": v}) + "\n"
                                                    for i, v in enumerate([1.0, 3.0, 2.0])))
    out = family_flops.run_mfu(tmp_path / "metrics.jsonl", 1000.0)
    assert out["images_per_s"] == 2.0 and out["mfu"] == pytest.approx(out["total_tflop"] * 2.0 / 1000.0)
    with pytest.raises(ValueError, match="must be > 0"):
        family_flops.mfu(1.0, 0.0)
