"""Tokenizers built offline from a corpus, for the tiny preset (the paper preset loads real ones).

Both are saved with `save_pretrained` and loaded back with `from_pretrained`, the same path a real
tokenizer folder takes.
"""

from __future__ import annotations

import json
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

# The MLLM's special tokens: document bounds, image bounds and the per-image placeholder whose
# embeddings the resampler output overwrites.
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IMAGE_START, IMAGE_END, IMAGE_PAD = "<image>", "</image>", "<image_pad>"
MLLM_SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE_START, IMAGE_END, IMAGE_PAD]


def train_mllm_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the MLLM's special tokens, trained on `texts`."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=MLLM_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens=[IMAGE_START, IMAGE_END, IMAGE_PAD],
    )


def train_clip_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> CLIPTokenizer:
    """A `CLIPTokenizer` (CLIP's BPE conventions: lower-case, `</w>` word ends) trained on `texts`."""
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>")
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # The trainer numbers equally frequent single characters in a per-process order; renumber so the same
    # texts always give the same ids: specials, then the other base tokens sorted, then merges in rank order.
    specials = ["<|startoftext|>", "<|endoftext|>"]
    merged = ["".join(m) for m in merges]
    base = sorted(set(model["vocab"]) - set(specials) - set(merged))
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + base + merged))}
    return CLIPTokenizer(vocab=vocab, merges=merges)
