"""The benchmarks' numbers in the form the AWM / Flow-GRPO papers report them, from per-image reward outputs, so an
evaluation of the official test set can stand beside the paper's table (`awm-fast eval` prints them).

GenEval (the benchmark's summary rule): an image is correct when every requirement of its prompt holds (the
reward server's strict score, `geneval_strict`); a task's accuracy is the mean over its images, grouped by the
metadata tag; Overall is the mean of the task accuracies:
    Overall = mean_task mean_{i in task} correct_i
    tasks: single_object, two_object, counting, colors, position, color_attr (Single Obj., Two Obj., Counting,
    Colors, Position, Attr. Binding)
OCR accuracy: the mean OCR reward, 1 - min(edit distance, |target|) / |target| over the test prompts.
PickScore: the mean raw PickScore, exp(logit_scale) cos(image, text) = reward x divisor (the trainer's reward is
divided by 26 as the official scorer; the papers report the undivided score, ~22-24 for SD3.5-M).
"""
from __future__ import annotations

from dataclasses import dataclass, field

GENEVAL_TASKS = {"single_object": "Single Obj.", "two_object": "Two Obj.", "counting": "Counting",
                 "colors": "Colors", "position": "Position", "color_attr": "Attr. Binding"}
STRICT_KEY = "geneval_strict"
PICKSCORE_DIVISOR = 26.0


@dataclass
class PaperMetrics:
    """One benchmark's numbers: `values` in the paper's order (the headline first), `counts` the images behind
    each value."""

    benchmark: str
    values: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.benchmark}: " + " | ".join(f"{k} {v:.4f}" for k, v in self.values.items())


def _column(rows: list[dict[str, float]], key: str, benchmark: str) -> list[float]:
    missing = [i for i, r in enumerate(rows) if key not in r]
    if missing:
        raise ValueError(f"{benchmark}: image {missing[0]} has no {key!r} score (keys: {sorted(rows[missing[0]])})")
    return [float(r[key]) for r in rows]


def geneval(rows: list[dict[str, float]], metadata: list[dict], key: str = STRICT_KEY) -> PaperMetrics:
    """GenEval Overall and per task (module docstring) from per-image `rows` with the strict score under `key`."""
    if len(rows) != len(metadata) or not rows:
        raise ValueError(f"GenEval: {len(rows)} scored images for {len(metadata)} prompts")
    correct = _column(rows, key, "GenEval")
    by_task: dict[str, list[float]] = {}
    for i, (c, m) in enumerate(zip(correct, metadata)):
        tag = m.get("tag")
        if tag not in GENEVAL_TASKS:
            raise ValueError(f"GenEval: prompt {i} has tag {tag!r}, not one of {', '.join(GENEVAL_TASKS)}")
        by_task.setdefault(tag, []).append(c)
    order = [t for t in GENEVAL_TASKS if t in by_task]
    tasks = {GENEVAL_TASKS[t]: sum(by_task[t]) / len(by_task[t]) for t in order}
    counts = {GENEVAL_TASKS[t]: len(by_task[t]) for t in order}
    overall = sum(tasks.values()) / len(tasks)
    return PaperMetrics("GenEval", {"Overall": overall, **tasks}, {"Overall": len(rows), **counts})


def ocr(rows: list[dict[str, float]], key: str = "reward") -> PaperMetrics:
    scores = _column(rows, key, "OCR")
    return PaperMetrics("OCR", {"Accuracy": sum(scores) / len(scores)}, {"Accuracy": len(scores)})


def pickscore(rows: list[dict[str, float]], key: str = "reward", divisor: float = PICKSCORE_DIVISOR) -> PaperMetrics:
    scores = _column(rows, key, "PickScore")
    return PaperMetrics("PickScore", {"Mean": divisor * sum(scores) / len(scores)}, {"Mean": len(scores)})


def paper_metrics(rewards: dict[str, object], rows: list[dict[str, float]],
                  metadata: list[dict]) -> list[PaperMetrics]:
    """The paper metrics of every benchmark reward among `rewards` (name -> reward object, as `awm-fast eval`
    builds them; rows keyed "<name>/<key>" when there are several); other rewards give none."""
    out = []
    for name, reward in rewards.items():
        prefix = f"{name}/" if len(rewards) > 1 else ""
        own = [{k.removeprefix(prefix): v for k, v in r.items() if k.startswith(prefix)} for r in rows]
        if name == "geneval":
            out.append(geneval(own, metadata))
        elif name == "ocr":
            out.append(ocr(own))
        elif name == "pickscore":
            out.append(pickscore(own, divisor=float(getattr(reward, "divisor", PICKSCORE_DIVISOR))))
    return out
