"""Writes the OFFLINE DEMO prompt sets of this folder from templates (deterministic: fixed seed). Run:
python prompts/make_prompts.py

These are not the official prompt sets: they let the rewards run without a download, and their numbers are not
comparable with the papers'. The official GenEval / OCR / PickScore (and DrawBench) files, which the presets name
as official:NAME, come from `awm-fast prompts fetch NAME` (awm_fast/prompt_sets.py).

geneval_{train,test}.txt + .jsonl  GenEval-style compositional prompts over the 80 COCO classes, six tags
    (single_object, two_object, counting, colors, position, color_attr) with metadata
    {"tag", "include": [{"class", "count", "color"?, "position"?: [relation, index of the reference object]}],
     "prompt"}
ocr_{train,test}.txt          scenes with the text to render in double quotes (train and test texts are disjoint)
pickscore_{train,test}.txt    general descriptive prompts (subject, setting, style)
Train and test sets never share a prompt.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
COCO = [c.replace("_", " ") for c in ("person bicycle car motorcycle airplane bus train truck boat traffic_light "
        "fire_hydrant stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack "
        "umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
        "surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli "
        "carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop computer_mouse "
        "remote computer_keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors "
        "teddy_bear hair_drier toothbrush").split()]
IRREGULAR = {"person": "people", "sheep": "sheep", "skis": "pairs of skis", "knife": "knives", "scissors":
             "pairs of scissors", "computer mouse": "computer mice", "tv": "tvs"}
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ["left of", "right of", "above", "below"]


def plural(noun: str) -> str:
    if noun in IRREGULAR:
        return IRREGULAR[noun]
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def geneval_item(tag: str, rng: random.Random) -> tuple[str, list[dict]]:
    a, b = rng.sample(COCO, 2)
    if tag == "single_object":
        return f"a photo of {article(a)} {a}", [{"class": a, "count": 1}]
    if tag == "two_object":
        return f"a photo of {article(a)} {a} and {article(b)} {b}", [{"class": a, "count": 1}, {"class": b, "count": 1}]
    if tag == "counting":
        n = rng.choice(list(NUMBERS))
        return f"a photo of {NUMBERS[n]} {plural(a)}", [{"class": a, "count": n}]
    if tag == "colors":
        c = rng.choice(COLORS)
        return f"a photo of {article(c)} {c} {a}", [{"class": a, "count": 1, "color": c}]
    if tag == "position":
        rel = rng.choice(RELATIONS)
        return (f"a photo of {article(a)} {a} {rel} {article(b)} {b}",
                [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}])
    c1, c2 = rng.sample(COLORS, 2)
    return (f"a photo of {article(c1)} {c1} {a} and {article(c2)} {c2} {b}",
            [{"class": a, "count": 1, "color": c1}, {"class": b, "count": 1, "color": c2}])


def unique(make, count: int, rng: random.Random, seen: set) -> list:
    out = []
    for _ in range(count * 1000):
        if len(out) == count:
            break
        item = make(rng)
        key = item[0] if isinstance(item, tuple) else item
        if key not in seen:
            seen.add(key)
            out.append(item)
    if len(out) < count:
        raise ValueError(f"only {len(out)} distinct prompts of {count} asked for")
    return out


def write_geneval(rng: random.Random, per_tag: dict[str, dict[str, int]]) -> None:
    seen: set = set()
    sets = {}
    for split, counts in per_tag.items():
        rows = []
        for tag, n in counts.items():
            for prompt, include in unique(lambda r: geneval_item(tag, r), n, rng, seen):
                rows.append({"tag": tag, "include": include, "prompt": prompt})
        rng.shuffle(rows)
        sets[split] = rows
    for split, rows in sets.items():
        (HERE / f"geneval_{split}.txt").write_text("".join(r["prompt"] + "\n" for r in rows))
        (HERE / f"geneval_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


OCR_TEXTS = ("OPEN|CLOSED|SALE|EXIT|STOP|Welcome Home|Fresh Bread|Coffee|Hello World|Good Morning|Big Sale|"
             "No Parking|Book Club|Jazz Night|Happy Birthday|Thank You|Ice Cream|Pizza Place|Library|Garden Party|"
             "Free Wifi|Keep Calm|Live Music|Sunset Cafe|Hot Tea|Bike Shop|Farm Market|City Park|Summer Camp|"
             "Night Owl|Lucky Star|Blue Moon|Dream Big|Stay Wild|River Road|Bakery|Flowers|Tickets|Gallery|Museum|"
             "Pharmacy|Bus Stop|Main Street|Taxi|Hotel|Cinema|Fish Market|Green Tea|Open Late|Wet Paint|"
             "Danger|Caution|Quiet Please|Push|Pull|Exit Only|Grand Opening|Best Friends|Game Over|Level Up|"
             "Winter Sale|Apple Pie|Lemonade|Tacos|Sushi Bar|Noodles|Vintage|Records|Books|Toys|Candy Shop|"
             "Pet Store|Yoga Class|Surf School|Ski Lodge|Moon Base|Star Port|Robot Repair|Time Machine|Rocket").split("|")
OCR_SCENES = ["a storefront sign that says \"{t}\"", "a neon sign reading \"{t}\" on a brick wall",
              "a chalkboard menu with the words \"{t}\"", "a wooden signpost carved with \"{t}\"",
              "a t-shirt printed with \"{t}\"", "a coffee mug with the text \"{t}\"",
              "a street banner that reads \"{t}\"", "a book cover titled \"{t}\"",
              "a birthday cake with \"{t}\" written in icing", "a poster with the headline \"{t}\"",
              "a license plate that says \"{t}\"", "graffiti on a train reading \"{t}\"",
              "a hand-written note that says \"{t}\"", "a billboard on a highway showing \"{t}\"",
              "a glowing arcade screen displaying \"{t}\"", "a paper lantern painted with \"{t}\"",
              "a road sign that reads \"{t}\"", "a cardboard box stamped \"{t}\"",
              "a sand drawing on a beach spelling \"{t}\"", "a vintage movie marquee announcing \"{t}\""]


def write_ocr(rng: random.Random, train: int, test: int) -> None:
    texts = OCR_TEXTS[:]
    rng.shuffle(texts)
    split = len(texts) * 4 // 5
    for name, pool, n in (("train", texts[:split], train), ("test", texts[split:], test)):
        combos = [s.format(t=t) for s in OCR_SCENES for t in pool]
        rng.shuffle(combos)
        (HERE / f"ocr_{name}.txt").write_text("".join(c[0].upper() + c[1:] + "\n" for c in combos[:n]))


SUBJECTS = ["an old lighthouse", "a red fox", "a steaming bowl of ramen", "a vintage motorcycle", "a snowy owl",
            "a glass greenhouse", "a sailing ship", "a hummingbird", "a stone bridge", "a cozy reading nook",
            "a mountain village", "an astronaut", "a koi pond", "a jazz musician", "a desert caravan",
            "a field of sunflowers", "a clockwork dragon", "a bowl of ripe cherries", "a sleeping cat",
            "a futuristic city", "a waterfall", "a wooden cabin", "a portrait of an elderly fisherman",
            "a bustling night market", "a humpback whale", "a castle on a cliff", "a bonsai tree", "a hot air balloon",
            "a tiger", "a violin on a chair"]
SETTINGS = ["at sunset", "in the rain", "under a starry sky", "in thick fog", "on a winter morning",
            "in golden hour light", "beside a calm lake", "in an autumn forest", "in a snowstorm", "at dawn"]
STYLES = ["highly detailed photograph", "oil painting", "watercolor illustration", "cinematic lighting",
          "studio ghibli style", "digital art, trending on artstation", "35mm film photo", "pencil sketch",
          "isometric 3d render", "impressionist painting"]


def write_pickscore(rng: random.Random, train: int, test: int) -> None:
    combos = [f"{s} {w}, {st}" for s in SUBJECTS for w in SETTINGS for st in STYLES]
    rng.shuffle(combos)
    (HERE / "pickscore_train.txt").write_text("".join(c[0].upper() + c[1:] + "\n" for c in combos[:train]))
    (HERE / "pickscore_test.txt").write_text("".join(c[0].upper() + c[1:] + "\n" for c in combos[train:train + test]))


if __name__ == "__main__":
    tags = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    write_geneval(random.Random(0), {"train": {t: 50 if t == "single_object" else 110 for t in tags},
                                     "test": {t: 10 if t == "single_object" else 20 for t in tags}})
    write_ocr(random.Random(1), train=600, test=100)
    write_pickscore(random.Random(2), train=600, test=100)
