"""Tiny random-weight CLIP models and processors built offline and saved with save_pretrained."""
import pytest
import torch

WORDS = ["a", "red", "cat", "dog", "photo", "of", "blue", "sky"]


def tiny_tokenizer():
    """A byte-level-BPE CLIPTokenizer over printable ASCII plus a few whole-word merges (no files, no network)."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = []
    for w in WORDS:  # merge each word left to right: ((c a) t</w>) -> cat</w>
        if len(w) < 2:
            continue
        cur = w[0]
        for k, ch in enumerate(w[1:], 1):
            right = ch + ("</w>" if k == len(w) - 1 else "")
            merges.append((cur, right))
            cur = cur + right
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges), vocab


def save_tiny_clip(folder, seed: int = 0, projection_dim: int = 16) -> None:
    """processor (tokenizer + 32 px image processor) and a 2-layer CLIPModel in one folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok, vocab = tiny_tokenizer()
    eos = vocab["<|endoftext|>"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(3.2)  # exp = 24.5, so the PickScore check does not hinge on the default 2.6592
    model.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clip")
    save_tiny_clip(folder)
    return str(folder)
