"""The MLLM tokenizers: the paper's ids equal the original's (sentencepiece + fairseq dict.txt); the tiny one
has the same special-token layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm

from kosmos_g.models.tokenizers import (ADDED_SPECIAL_TOKENS, BASE_SPECIAL_TOKENS, MASK, official_tokenizer,
                                        train_mllm_tokenizer)
from kosmos_g.processor import KosmosGProcessor

OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "kosmos-g-official"
REFERENCE = OFFICIAL.parent / "kosmos-g-reference.md"

# Ordinary prompts (DreamBench-style, captions, instructions) and a Unicode set over many scripts. Left out, as
# known differences (docs/tokenizer.md): some combining marks and bidi controls, and the literal strings
# `<s>`, `</s>`, `<pad>`, `<unk>`, `<mask>` in a text, which transformers keeps as special tokens.
ORDINARY = [
    "a photo of a dog", "<i> in the jungle", "a cat wearing a red hat on the beach", "A dog, a cat & a bird!",
    "Make the sky purple.", "a cube shaped sneaker", "an oil painting of a backpack in the style of Van Gogh",
    "two people holding hands, 4k, highly detailed", "it's 3:45 p.m. -- isn't it?", "e-mail: kosmos@example.com",
    "   leading and trailing spaces   ", "tabs\tand\nnewlines", "numbers 1234567890 and 3.14159", "(brackets) [and] {braces}",
    "CamelCase and snake_case and kebab-case", "URL https://github.com/microsoft/unilm/tree/master/kosmos-g",
]
UNICODE = [
    "café naïve résumé Ærøskøbing", "Straße größer", "Ελληνικά γράμματα", "Русский текст", "中文分词测试",
    "日本語のテキストとカタカナ", "한국어 문장입니다", "العربية نص", "עברית טקסט", "हिन्दी पाठ", "ภาษาไทย",
    "emoji 🐶🐱🎉 👩‍💻", "ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ １２３", "ligature ﬁ ﬂ and ½ ² ℃ №", "“quotes” ‘single’ « guillemets » — – …",
    "tiếng Việt có dấu", "Ωmega µ ∑ ∫ √ ∞ ≠ ≤", "zero\u200bwidth space", "nbsp\u00a0here", "ǅ ǆ Ǆ ĳ",
]


@pytest.fixture(scope="module")
def official():
    if not OFFICIAL.is_dir():
        pytest.skip(f"{OFFICIAL} is not present: it holds the original sentencepiece.bpe.model and dict.txt "
                    "(../shared/kosmos-g-official next to the repository)")
    return official_tokenizer(OFFICIAL)


def fairseq_ids(sp: spm.SentencePieceProcessor, index: dict[str, int], text: str) -> list[int]:
    """What the original code feeds the decoder: spm pieces looked up in dict.txt (fairseq: line index + 4,
    unknown pieces -> `<unk>` = 3)."""
    return [index.get(piece, 3) for piece in sp.encode(text, out_type=str)]


@pytest.fixture(scope="module")
def reference():
    sp = spm.SentencePieceProcessor(model_file=str(OFFICIAL / "sentencepiece.bpe.model"))
    lines = (OFFICIAL / "dict.txt").read_text(encoding="utf-8").splitlines()
    return sp, {line.rsplit(" ", 1)[0]: i + 4 for i, line in enumerate(lines)}


def reference_strings() -> list[str]:
    """The paper-facts file's lines: ordinary English with numbers, names and punctuation."""
    if not REFERENCE.is_file():
        return []
    lines = [line.strip() for line in REFERENCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [line for line in lines if not any(t in line for t in BASE_SPECIAL_TOKENS + [MASK])]


def test_special_ids_are_the_originals(official):
    assert len(official) == 64007
    ids = official.convert_tokens_to_ids(BASE_SPECIAL_TOKENS + [MASK] + ADDED_SPECIAL_TOKENS)
    assert ids == [0, 1, 2, 3, 64001, 64002, 64003, 64004, 64005, 64006]
    assert (official.bos_token_id, official.pad_token_id, official.eos_token_id) == (0, 1, 2)


@pytest.mark.parametrize("texts", ["ordinary", "unicode"])
def test_ids_equal_sentencepiece_plus_dict(official, reference, texts):
    sp, index = reference
    strings = ORDINARY + reference_strings() if texts == "ordinary" else UNICODE
    assert len(strings) >= 20
    processor = KosmosGProcessor(official)  # its text path is what prompts go through
    mismatches = [text for text in strings if processor.text_ids(text) != fairseq_ids(sp, index, text)]
    assert not mismatches, mismatches
    # Not vacuous: the strings cover many pieces, some of them rare.
    covered = {i for text in strings for i in processor.text_ids(text)}
    assert len(covered) > 100 and max(covered) > 20000


def test_image_tokens_in_text_are_split_as_the_original_does(official, reference):
    """A prompt's text cannot forge an image block: `<image>` in text becomes pieces, as in fairseq."""
    sp, index = reference
    text = "a <image> and </image> and </doc> in text"
    ids = KosmosGProcessor(official).text_ids(text)
    assert ids == fairseq_ids(sp, index, text) and not set(ids) & set(range(64001, 64007))


def test_tiny_tokenizer_has_the_same_special_layout(tmp_path):
    tok = train_mllm_tokenizer(["a red circle next to a blue square", "a dog wearing a hat"] * 5, vocab_size=300)
    n = len(tok)
    assert tok.convert_tokens_to_ids(BASE_SPECIAL_TOKENS) == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids([MASK] + ADDED_SPECIAL_TOKENS) == list(range(n - 6, n))  # after the pieces
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.convert_tokens_to_ids(BASE_SPECIAL_TOKENS + [MASK] + ADDED_SPECIAL_TOKENS) == \
        tok.convert_tokens_to_ids(BASE_SPECIAL_TOKENS + [MASK] + ADDED_SPECIAL_TOKENS)
    assert loaded("a red <image>", add_special_tokens=False).input_ids[-1] == loaded.convert_tokens_to_ids("<image>")


def test_missing_spm_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sentencepiece.bpe.model"):
        official_tokenizer(tmp_path)


def test_config_path_loads_the_original_tokenizer_and_a_saved_copy(official, tmp_path):
    """`model.llm.tokenizer_path`: the folder with the spm model, or an MLLM tokenizer saved by save_pretrained."""
    from kosmos_g.assets import mllm_tokenizer
    from kosmos_g.config import load_config

    model = load_config(["model=paper", f"model.llm.tokenizer_path={OFFICIAL}"]).model
    tok = mllm_tokenizer(model, tmp_path, lambda: iter(()))
    text = "a photo of a dog wearing a hat"
    assert len(tok) == 64007 and tok(text).input_ids == official(text).input_ids
    tok.save_pretrained(tmp_path / "saved")
    model = load_config(["model=paper", f"model.llm.tokenizer_path={tmp_path / 'saved'}"]).model
    again = mllm_tokenizer(model, tmp_path, lambda: iter(()))
    assert len(again) == 64007 and again.get_vocab() == tok.get_vocab()
