"""The MLLM tokenizer with the original Kosmos-G ids, and small tokenizers trained offline for the tiny preset.

Kosmos-G uses fairseq's dictionary over a SentencePiece model (XLM-R's): `<s>`=0, `<pad>`=1, `</s>`=2,
`<unk>`=3, the pieces, `<mask>`, then five added specials (ids 64002..64006 in the paper's vocabulary of
64007). `XLMRobertaTokenizer` reproduces that mapping from `sentencepiece.bpe.model` alone; `official_tokenizer`
adds the five specials after it. The tiny preset's tokenizer has the same layout around its own pieces, so
the processor and the model read one set of ids in both presets.

All are saved with `save_pretrained` and loaded back with `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer, PreTrainedTokenizerFast, XLMRobertaTokenizer

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
DOC_END, IMAGE_START, IMAGE_END, CHUNK_END, LINE_END = "</doc>", "<image>", "</image>", "</chunk>", "</line>"
BASE_SPECIAL_TOKENS = [BOS, PAD, EOS, UNK]
"""Ids 0..3, as in fairseq's dictionary."""
ADDED_SPECIAL_TOKENS = [DOC_END, IMAGE_START, IMAGE_END, CHUNK_END, LINE_END]
"""Added after the pieces and `<mask>` (`unilm/tasks/gpt_base.py`): ids 64002..64006 in the paper's vocabulary."""
SPM_MODEL = "sentencepiece.bpe.model"


def add_kosmos_specials(tokenizer):
    """Add the five Kosmos-G specials after the vocabulary (no-op for those already there)."""
    tokenizer.add_special_tokens({"additional_special_tokens": ADDED_SPECIAL_TOKENS})
    return tokenizer


def official_tokenizer(folder: str | Path) -> XLMRobertaTokenizer:
    """The paper's tokenizer from a folder holding the original `sentencepiece.bpe.model` (+ `dict.txt`).

    XLMRobertaTokenizer maps spm piece id i to i + 1 (fairseq's dictionary order) and puts `<mask>` last;
    the five specials follow it.
    """
    folder = Path(folder)
    if not (folder / SPM_MODEL).is_file():
        raise FileNotFoundError(f"{folder / SPM_MODEL} not found: model.llm.tokenizer_path must be a folder with "
                                f"the original Kosmos-G {SPM_MODEL} (and dict.txt), or one written by save_pretrained")
    return check_special_layout(add_kosmos_specials(XLMRobertaTokenizer.from_pretrained(str(folder))))


def check_special_layout(tokenizer):
    """Raise unless `<s> <pad> </s> <unk>` are ids 0..3 and `<image>`, `</image>` exist (the MLLM relies on
    both: pad id 1 is the decoder's padding_idx, from which positions count)."""
    got = {t: tokenizer.convert_tokens_to_ids(t) for t in BASE_SPECIAL_TOKENS}
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IMAGE_START, IMAGE_END) if t not in vocab]
    if list(got.values()) != [0, 1, 2, 3] or missing:
        raise ValueError(f"the MLLM tokenizer must have {BASE_SPECIAL_TOKENS} at ids 0..3 and the tokens "
                         f"{ADDED_SPECIAL_TOKENS}; it has {got}{', no ' + str(missing) if missing else ''}. Build it "
                         "with kosmos_g.models.tokenizers.official_tokenizer (the paper's spm model) or "
                         "train_mllm_tokenizer")
    return tokenizer


def train_mllm_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with the paper tokenizer's special-token layout:
    `<s> <pad> </s> <unk>` = 0..3, the pieces, then `<mask>` and the five Kosmos-G specials."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BASE_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    out.add_special_tokens({"mask_token": MASK})  # after the pieces, as XLM-R's `<mask>`
    return check_special_layout(add_kosmos_specials(out))


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
