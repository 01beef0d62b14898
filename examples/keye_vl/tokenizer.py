"""A Hugging Face tokenizer with Keye-VL-1.5's special tokens, for ``train.py --tokenizer DIR``.

The dataloader builds Keye's prompt itself (`dataloader.sequence`: the Qwen chat template's
``<|im_start|>role\\n ... <|im_end|>\\n`` turns, ``<|vision_start|>``/``<|image_pad|>``/
``<|video_pad|>``/``<|vision_end|>``, and per video frame ``<|frame|>``, the timestamp and the
Slow-Fast markers ``<|fast_start|>``/``<|fast_end|>``), so the tokenizer must know every one of
those tokens as a single id. `load_tokenizer` checks that, and that its ids fit the model's
vocabulary, before any data is read. The folder is read locally (no download).
"""

from __future__ import annotations

import logging
import os

from dataloader.sequence import PAD, SPECIAL_TOKENS, HFTokenizer

logger = logging.getLogger(__name__)

REQUIRED_TOKENS = tuple(t for t in SPECIAL_TOKENS if t != PAD)
"""The special tokens the sequence format uses (padding uses the tokenizer's own pad id)."""


def load_tokenizer(path: str | os.PathLike[str], *, vocab_size: int | None = None
                   ) -> HFTokenizer:
    """The tokenizer in ``path`` (``AutoTokenizer``, local files only) as the dataloader's
    `HFTokenizer`; ``ValueError`` naming the tokens it lacks, or its largest id when that does
    not fit ``vocab_size``."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a Hugging Face tokenizer folder ({exc})") from exc
    vocab = tok.get_vocab()
    missing = [t for t in REQUIRED_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"{path}: the tokenizer lacks Keye-VL-1.5's special tokens {missing} "
                         f"(each must be one token)")
    for t in REQUIRED_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        if ids != [vocab[t]]:
            raise ValueError(f"{path}: {t!r} encodes to {ids}, not to its single id {vocab[t]} "
                             "(add it as a special token)")
    largest = max(vocab.values())
    if vocab_size is not None and largest >= vocab_size:
        raise ValueError(f"{path}: token ids go up to {largest}, past the model's vocabulary of "
                         f"{vocab_size} (pick a model whose vocab_size > {largest})")
    if not getattr(tok, "chat_template", None):
        logger.warning("%s: the tokenizer has no chat template; the dataloader's Qwen format is "
                       "used for training, but inference tools will need one", path)
    return HFTokenizer(tok, name=f"hf:{os.path.basename(os.path.normpath(path))}:{len(vocab)}")
