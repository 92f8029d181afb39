"""Prompt sets: a .txt file with one prompt per line, plus optional per-prompt metadata in a JSONL file beside it
(same stem: geneval_train.txt -> geneval_train.jsonl), one JSON object per prompt line, in the same order.

A metadata line may carry "prompt"; when it does it must equal the .txt line (catches files out of sync).
A .jsonl path may also be given directly: prompts are then read from each line's "prompt".
"""
from __future__ import annotations

import json
from pathlib import Path


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def load_prompt_set(path: str | Path) -> tuple[list[str], list[dict]]:
    """(prompts, metadata): metadata[i] is the JSONL object of prompt i, or {} when there is no JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        meta = _read_jsonl(path)
        missing = [i + 1 for i, m in enumerate(meta) if not isinstance(m.get("prompt"), str)]
        if missing:
            raise ValueError(f"{path}: line {missing[0]} has no string 'prompt'")
        prompts = [m["prompt"] for m in meta]
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        side = path.with_suffix(".jsonl")
        meta = _read_jsonl(side) if side.is_file() else [{} for _ in prompts]
        if len(meta) != len(prompts):
            raise ValueError(f"{side}: {len(meta)} metadata lines for {len(prompts)} prompts in {path}")
        for i, (p, m) in enumerate(zip(prompts, meta), 1):
            if "prompt" in m and m["prompt"] != p:
                raise ValueError(f"{side}:{i}: metadata prompt {m['prompt']!r} differs from {path} line {p!r}")
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts")
    return prompts, meta
