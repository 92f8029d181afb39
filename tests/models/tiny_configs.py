"""The small training config the tiny SD3 / FLUX pipeline tests share (2 steps, 16 px, LoRA rank 4)."""
from awm_fast.config import Config, load_config


def tiny_model_config(tmp_path, kind: str, model_path, prompts: list[str], *extra: str) -> Config:
    """A config for `kind` at `model_path` training on `prompts`; runs go to tmp_path/<kind>."""
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("".join(p + "\n" for p in prompts))
    return load_config(None, [
        f"model.kind={kind}", f"model.path={model_path}", "model.resolution=16", "model.lora_rank=4",
        "model.lora_alpha=8", "reward.name=jpeg_compressibility", f"sample.prompt_file={prompt_file}",
        "sample.prompts_per_step=2", "sample.group_size=2", "sample.batch_size=4", "sample.num_steps=4",
        "sample.eval_num_steps=4", "sample.eval_prompts=2", "train.micro_batch=2", "train.num_timesteps=2",
        "train.steps=2", "run.checkpoint_every=1", "run.tensorboard=false", f"run.output_dir={tmp_path}",
        f"run.name={kind}", "run.device=cpu", *extra])  # cpu: the tests compare velocities at float32 tolerances
