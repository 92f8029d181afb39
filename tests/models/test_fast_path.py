"""The fast path a device gets (models.fast_path): every GPU preset resolves to it on CUDA, the CPU default keeps
the eager path, explicit values are kept, and `auto` never reads as "on" where it was not resolved."""
import pytest
import torch

from awm_fast.config import AUTO, ConfigError, list_presets, load_config
from awm_fast.families.z_image import CUDA_GRAPHS_REFUSED
from awm_fast.models.adapt import freeze_and_adapt
from awm_fast.families import fast_path, resolve_fast_path
from awm_fast.models.fast_path import SWITCHES

GPU_PRESETS = [p for p in list_presets() if p != "digits"]
NO_GRAPHS = {"geneval_z_image": CUDA_GRAPHS_REFUSED}  # presets whose family cannot replay graphs, and why


def _get(cfg, dotted):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def test_switches_default_to_auto():
    cfg = load_config()
    assert all(_get(cfg, key) == AUTO for key in SWITCHES) and cfg.model.attention_backend == "auto"


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_every_gpu_preset_resolves_to_the_fast_path_on_cuda(preset):
    """Resolved for a CUDA device (nothing runs): regional compile, the shared batch, CUDA graphs (except a
    family that cannot replay them, which says why) and the fastest attention backend present (auto)."""
    cfg = resolve_fast_path(load_config(preset), torch.device("cuda"))
    assert cfg.model.compile is True and cfg.train.shared_batch is True
    assert cfg.model.attention_backend == "auto"
    if preset in NO_GRAPHS:
        path = fast_path(load_config(preset), "cuda")
        assert cfg.sample.cuda_graphs is False and NO_GRAPHS[preset] in path.why_off["sample.cuda_graphs"]
    else:
        assert cfg.sample.cuda_graphs is True


@pytest.mark.parametrize("preset", ["digits", *GPU_PRESETS])
def test_the_cpu_keeps_the_eager_path(preset):
    path = fast_path(load_config(preset), torch.device("cpu"))
    assert (path.compile, path.shared_batch, path.cuda_graphs) == (False, False, False)
    assert set(path.why_off) == set(SWITCHES) and "not a CUDA device" in path.summary()


def test_digits_on_cuda_gets_the_fast_path_too():
    path = fast_path(load_config("digits"), "cuda")
    assert (path.compile, path.shared_batch, path.cuda_graphs) == (True, True, True) and not path.why_off


def test_explicit_values_are_kept_on_either_device():
    cfg = load_config(None, ["model.compile=false", "train.shared_batch=true", "sample.cuda_graphs=false"])
    for device in ("cpu", "cuda"):
        resolved = resolve_fast_path(cfg, device)
        switches = resolved.model.compile, resolved.train.shared_batch, resolved.sample.cuda_graphs
        assert switches == (False, True, False)
    assert cfg.model.compile is False and cfg.sample.cuda_graphs is False  # the input config is not modified


def test_auto_stays_off_where_it_cannot_work():
    full = fast_path(load_config(None, ["train.finetune=full", "train.eval_ema=false"]), "cuda")
    assert full.compile and not full.shared_batch and not full.cuda_graphs
    assert "train.finetune=full" in full.why_off["train.shared_batch"]
    own_graphs = fast_path(load_config(None, ["model.compile_mode=reduce-overhead"]), "cuda")
    assert own_graphs.compile and not own_graphs.cuda_graphs
    assert "captures CUDA graphs of its own" in own_graphs.why_off["sample.cuda_graphs"]


@pytest.mark.parametrize("override,match", [
    ("model.compile=maybe", "model.compile: expected true, false or auto, got 'maybe'"),
    ("sample.cuda_graphs=1", "sample.cuda_graphs: expected true, false or auto, got 1"),
])
def test_a_switch_takes_true_false_or_auto(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])
    assert load_config(None, [override.split("=")[0] + "=auto"]) is not None


def test_only_an_explicit_true_is_refused_with_full_finetuning():
    load_config(None, ["train.finetune=full", "train.eval_ema=false"])  # auto switches: off there, no error
    with pytest.raises(ConfigError, match="train.shared_batch=true needs train.finetune=lora"):
        load_config(None, ["train.finetune=full", "train.eval_ema=false", "train.shared_batch=true"])


def test_auto_compile_is_not_on_for_a_cpu_model():
    """freeze_and_adapt reads the resolved switch: `auto` on the CPU leaves the blocks eager."""
    from diffusers import SD3Transformer2DModel

    from awm_fast.families.digits import tiny_transformer_config

    cfg = load_config(None, ["model.lora_rank=2", "model.lora_alpha=4"])
    model = freeze_and_adapt(SD3Transformer2DModel(**tiny_transformer_config()), cfg, torch.device("cpu"),
                             torch.float32)
    assert all("forward" not in block.__dict__ for block in model.transformer_blocks)
