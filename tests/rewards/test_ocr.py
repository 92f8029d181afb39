"""OCR reward: the official scoring on hand cases, and the bundled engine reading PIL-rendered text."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from awm_fast.rewards.ocr import OcrReward, levenshtein, ocr_score, target_text

FONTS = ["/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]


def render(text: str, size=(512, 192)) -> Image.Image:
    """Black text, about 56 px high, on white: a system TTF when there is one, else PIL's bundled font."""
    path = next((f for f in FONTS if Path(f).is_file()), None)
    font = ImageFont.truetype(path, 56) if path else ImageFont.load_default(size=56)
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((24, size[1] // 2 - 34), text, fill="black", font=font)
    return img


@pytest.mark.parametrize("a, b, d", [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "abc", 0), ("flaw", "lawn", 2),
                                     ("ab", "ba", 2)])
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


@pytest.mark.parametrize("recognised, target, score", [
    ("Hello World", "hello world", 1.0),       # spaces and case do not matter
    ("OPEN 24 HOURS now", "24 hours", 1.0),    # contained -> 1
    ("helo", "hello", 0.8),                    # one edit in five characters
    ("", "abc", 0.0),                          # nothing read: distance 3 = len(target)
    ("xyzxyzxyzxyz", "ab", 0.0),               # distance clipped at len(target)
    ("Fresh Brad", "Fresh Bread", 0.9),        # "freshbrad" vs "freshbread": 1 edit in 10
])
def test_official_score(recognised, target, score):
    assert ocr_score(recognised, target) == pytest.approx(score)


def test_target_is_first_quoted_text():
    assert target_text('A sign that says "Open Late" and "x"') == "Open Late"
    assert target_text("no quotes", {"text": "Override"}) == "Override"
    with pytest.raises(ValueError, match="double quotes"):
        target_text('only one " quote')


@pytest.fixture(scope="module")
def reader():
    pytest.importorskip("rapidocr_onnxruntime")
    return OcrReward()


def test_engine_reads_rendered_text(reader):
    img = render("Fresh Bread")
    prompts = ['A sign that says "Fresh Bread"', 'A sign that says "Jazz Night"']
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    out = reader(torch.stack([t, t]), prompts, [{}, {}])
    assert out["reward"].shape == (2,) and out["ocr_exact"].shape == (2,)
    assert out["reward"][0] >= 0.9, reader.read([img])
    assert out["reward"][1] <= 0.4
    pil = reader([img], prompts[:1], [{}])
    assert pil["reward"][0] == out["reward"][0]


def test_blank_image_scores_zero(reader):
    out = reader([Image.new("RGB", (128, 128), "white")], ['a wall with "STOP"'], [{}])
    assert out["reward"].tolist() == [0.0] and out["ocr_exact"].tolist() == [0.0]


def test_engine_choices():
    with pytest.raises(ValueError, match="engine"):
        OcrReward(engine="tesseract")
    if importlib.util.find_spec("paddleocr") is None:
        with pytest.raises(ImportError, match="pip install"):
            OcrReward(engine="paddle")
