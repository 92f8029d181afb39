"""Conditioning with token masks: prompts of different lengths batch by right-padding (mask False), and the
prompt cache keeps each prompt at its own length."""
import torch

from awm_fast.models.pipeline import encode_all, make_encoder
from awm_fast.models.policy import Conditioning


def _cond(length: int, seed: int, masked: bool = True) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, length, dtype=torch.bool) if masked else None
    return Conditioning(torch.randn(1, length, 4, generator=g), torch.randn(1, 3, generator=g), mask)


def test_cat_pads_shorter_prompts_and_masks_the_padding():
    a, b = _cond(2, 0), _cond(5, 1)
    c = Conditioning.cat([a, b])
    assert c.embeds.shape == (2, 5, 4) and c.mask.tolist() == [[True, True, False, False, False], [True] * 5]
    assert torch.equal(c.embeds[0, :2], a.embeds[0]) and torch.equal(c.embeds[0, 2:], torch.zeros(3, 4))
    assert torch.equal(c.embeds[1], b.embeds[0])
    sub = c[1:]
    assert sub.mask.tolist() == [[True] * 5] and torch.equal(sub.embeds, b.embeds)
    assert c.repeat(2).mask.shape == (4, 5)


def test_cat_without_masks_stays_unmasked():
    c = Conditioning.cat([_cond(3, 0, masked=False), _cond(3, 1, masked=False)])
    assert c.mask is None and c.embeds.shape == (2, 3, 4)


def test_cache_trims_padding_per_prompt(tmp_path):
    lengths = {"a cat": 2, "two dogs on a sofa": 4}

    def encode_batch(chunk):
        n = max(lengths[p] for p in chunk)
        embeds = torch.randn(len(chunk), n, 4)
        mask = torch.tensor([[i < lengths[p] for i in range(n)] for p in chunk])
        return Conditioning(embeds * mask[..., None], torch.randn(len(chunk), 3), mask)

    cache = encode_all(encode_batch, list(lengths), tmp_path)
    assert {p: c.embeds.shape[1] for p, c in cache.items()} == lengths
    again = encode_all(encode_batch, list(lengths), tmp_path)  # from disk
    assert all(torch.equal(again[p].embeds, cache[p].embeds) and again[p].mask.all() for p in lengths)
    batch = make_encoder(cache, torch.device("cpu"))(["a cat", "two dogs on a sofa"])
    assert batch.mask.sum(1).tolist() == [2, 4]
