"""The shipped prompt sets and the loader."""
import json
from pathlib import Path

import pytest

from awm_fast.config import list_presets, load_config
from awm_fast.prompt_sets import OFFICIAL, PROMPT_SETS
from awm_fast.rewards.ocr import target_text
from awm_fast.rewards.prompts import load_prompt_set

ROOT = Path(__file__).resolve().parents[2] / "prompts"


@pytest.mark.parametrize("task", ["geneval", "ocr", "pickscore"])
def test_shipped_sets(task):
    train, train_meta = load_prompt_set(ROOT / f"{task}_train.txt")
    test, _ = load_prompt_set(ROOT / f"{task}_test.txt")
    assert len(train) >= 300 and 90 <= len(test) <= 200
    assert len(set(train)) == len(train) and not set(train) & set(test)
    if task == "ocr":
        assert all(target_text(p) for p in train + test)
    if task == "geneval":
        assert {m["tag"] for m in train_meta} == {"single_object", "two_object", "counting", "colors", "position",
                                                  "color_attr"}
        for p, m in zip(train, train_meta):
            assert m["prompt"] == p and m["include"]
            for obj in m["include"]:
                assert obj.get("color", "") in p and (obj["class"] in p if obj["count"] == 1 else  # plural: "mice"
                                                      {2: "two", 3: "three", 4: "four"}[obj["count"]] in p)


@pytest.mark.parametrize("preset", [p for p in list_presets() if p != "digits"])
def test_presets_name_official_sets_or_shipped_files(preset):
    """Every preset's prompt files are official sets (awm_fast.prompt_sets, fetched by `awm-fast prompts fetch`)
    or files shipped here; the bundled template sets are demo data only."""
    s = load_config(preset).sample
    for value in (s.prompt_file, s.eval_prompt_file):
        if value.startswith(OFFICIAL):
            assert value.removeprefix(OFFICIAL) in PROMPT_SETS
        else:
            assert (ROOT.parent / value).is_file()


def test_loader(tmp_path):
    txt = tmp_path / "set.txt"
    txt.write_text("a cat\n\na dog\n")
    assert load_prompt_set(txt) == (["a cat", "a dog"], [{}, {}])
    (tmp_path / "set.jsonl").write_text(json.dumps({"tag": "x", "prompt": "a cat"}) + "\n" + json.dumps({"tag": "y"}))
    assert load_prompt_set(txt)[1] == [{"tag": "x", "prompt": "a cat"}, {"tag": "y"}]
    (tmp_path / "set.jsonl").write_text(json.dumps({"prompt": "a cow"}) + "\n{}\n")
    with pytest.raises(ValueError, match="differs"):
        load_prompt_set(txt)
    (tmp_path / "set.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="1 metadata lines for 2 prompts"):
        load_prompt_set(txt)
    direct = tmp_path / "direct.jsonl"
    direct.write_text(json.dumps({"prompt": "a cow", "tag": "t"}) + "\n")
    assert load_prompt_set(direct) == (["a cow"], [{"prompt": "a cow", "tag": "t"}])
    with pytest.raises(FileNotFoundError):
        load_prompt_set(tmp_path / "missing.txt")
