"""The dataloader's chat prompt against the Hugging Face tokenizer's own chat template.

The dataloader writes Keye-VL-1.5's prompt itself (`dataloader.sequence`: per turn
``<|im_start|>{role}\\n{content}<|im_end|>\\n``, the loss on the content and ``<|im_end|>`` of
assistant turns). A model trained that way is later prompted through its tokenizer's chat
template, so the two must agree token for token. `check_chat_template` renders a few probe
conversations both ways and raises on the first difference; `assistant_token_mask` is
transformers' own assistant mask (``{% generation %}`` blocks), the reference the loss mask is
tested against.

Media are not part of the comparison: an HF chat template writes one placeholder per image or
video and the HF processor expands it, while the dataloader's media tokens are fixed by Keye's
processor (see `dataloader.sequence`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from dataloader.manifest import Record, Turn
from dataloader.sequence import IM_END, IM_START, HFTokenizer, tokenize

PROBES: tuple[Record, ...] = (
    Record("system-user-assistant", "probe", (
        Turn("system", "You are a helpful assistant."),
        Turn("user", "What is in the picture?"),
        Turn("assistant", "A cat sitting on a mat."))),
    Record("multi-turn-no-system", "probe", (
        Turn("user", "Describe the video."),
        Turn("assistant", "A dog runs across a field."),
        Turn("user", "What colour is the dog?"),
        Turn("assistant", "Brown, with a white tail."))),
    Record("newlines-and-unicode", "probe", (
        Turn("system", "Answer in two lines.\nBe brief."),
        Turn("user", "Übersetze: « 猫 » et 🐱?\nthen explain"),
        Turn("assistant", "猫 = cat — «chat».\n\nBoth mean 🐱.\n"),
        Turn("user", " leading space, tab\tand trailing newline\n"),
        Turn("assistant", "Noted: ½ ≠ 0.5?  No, ½ = 0.5."))),
)
"""Text-only conversations the template and the dataloader must render identically. No content
starts with a newline: the dataloader encodes the ``{role}\\n`` header and the content apart,
and Qwen's pre-tokenizer joins a content's leading newlines with the header's (one ``\\n\\n``
token where the dataloader has two), whatever the template."""

_CONTEXT = 8
"""Tokens shown on each side of the first difference."""
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ChatTokens:
    """A conversation as the HF tokenizer's chat template renders and tokenizes it."""

    token_ids: np.ndarray
    """int64 ``[seq_len]``."""
    assistant_mask: np.ndarray
    """bool ``[seq_len]``: transformers' mask of the tokens inside ``{% generation %}`` blocks."""


def to_messages(record: Record) -> list[dict[str, str]]:
    """``record``'s turns as chat messages (``{"role", "content"}``); ``ValueError`` for media
    or ``"text"`` turns, which have no text-only chat form."""
    if record.media:
        raise ValueError(f"record {record.id!r} has {len(record.media)} media; chat messages "
                         "here are text-only (the HF processor expands media placeholders)")
    for i, turn in enumerate(record.conversation):
        if turn.role == "text":
            raise ValueError(f"record {record.id!r}: conversation[{i}] is a 'text' "
                             "(pre-training) turn, which has no chat form")
    return [{"role": t.role, "content": t.content} for t in record.conversation]


def _hf(tokenizer: HFTokenizer) -> Any:
    if not isinstance(tokenizer, HFTokenizer):
        raise TypeError(f"a chat template needs a Hugging Face tokenizer (dataloader.sequence."
                        f"HFTokenizer), got {type(tokenizer).__name__}")
    return tokenizer._tok


def _template(tokenizer: HFTokenizer, chat_template: str | None) -> str:
    try:
        return _hf(tokenizer).get_chat_template(chat_template)
    except ValueError as exc:
        raise ValueError(f"tokenizer {tokenizer.name!r} has no chat template to check the "
                         f"dataloader's prompt against ({exc})") from exc


def _render(tokenizer: HFTokenizer, messages: list[dict[str, Any]], template: str,
            name: str, mask: bool) -> Any:
    from jinja2 import TemplateError

    try:
        return _hf(tokenizer).apply_chat_template(
            messages, chat_template=template, tokenize=True, add_generation_prompt=False,
            return_dict=True, return_assistant_tokens_mask=mask)
    except TemplateError as exc:
        raise ValueError(f"tokenizer {tokenizer.name!r}: its chat template fails on {name}: "
                         f"{type(exc).__name__}: {exc}") from exc


def assistant_token_mask(tokenizer: HFTokenizer, messages: list[dict[str, Any]], *,
                         chat_template: str | None = None) -> ChatTokens:
    """``messages`` rendered by the tokenizer's chat template (or ``chat_template``) with
    transformers' ``return_assistant_tokens_mask``: the token ids and, per token, whether it
    overlaps a ``{% generation %}`` block. ``ValueError`` when the template has no such block
    (transformers would return an all-zero mask)."""
    template = _template(tokenizer, chat_template)
    if not _GENERATION.search(template):
        raise ValueError(f"tokenizer {tokenizer.name!r}: the chat template has no "
                         "{% generation %} block, so transformers cannot mark assistant tokens")
    out = _render(tokenizer, messages, template, "the conversation", mask=True)
    ids = np.asarray(out["input_ids"], dtype=np.int64)
    mask = np.asarray(out["assistant_masks"], dtype=bool)
    assert ids.shape == mask.shape, (ids.shape, mask.shape)
    return ChatTokens(token_ids=ids, assistant_mask=mask)


def _around(tokenizer: HFTokenizer, ids: list[int], i: int) -> str:
    decode = _hf(tokenizer).decode
    at = repr(decode(ids[i:i + 1])) if i < len(ids) else "(end)"
    return (f"{decode(ids[max(0, i - _CONTEXT):i])!r} [{at}] "
            f"{decode(ids[i + 1:i + 1 + _CONTEXT])!r}")


def _hint(tokenizer: HFTokenizer, probe: Record, hf: list[int], ours: list[int], i: int) -> str:
    decode = _hf(tokenizer).decode
    ahead = decode(hf[i:i + 4 * _CONTEXT])
    if "<think>" in ahead or "</think>" in ahead:
        return ("the template writes a reasoning block (<think>...</think>) into the assistant "
                "turn, as Qwen3's does in the last one; the dataloader trains on the assistant "
                "content exactly as the manifest holds it, so either put the block into the "
                "records' assistant content or use a template without it")
    has_system = any(t.role == "system" for t in probe.conversation)
    if i <= 1 and not has_system and decode(hf).startswith(f"{IM_START}system"):
        return ("the template adds a default system turn to a conversation without one; the "
                "dataloader does not, so put that system turn into the records")
    im_end = tokenizer.special_id(IM_END)
    if i > 0 and ours[i - 1] == im_end and hf[i - 1] == im_end:
        return (f"the template does not follow {IM_END} with the dataloader's '\\n' (the "
                f"dataloader ends every turn with {IM_END} and a newline)")
    return (f"the dataloader writes each turn as {IM_START}{{role}}\\n{{content}}{IM_END}\\n "
            "(dataloader/sequence.py); a model trained on that and prompted through this "
            "template sees another format")


def check_chat_template(tokenizer: HFTokenizer, *, chat_template: str | None = None) -> None:
    """Raise ``ValueError`` unless the HF chat template (the tokenizer's own, or
    ``chat_template``) renders every conversation of `PROBES` to the token ids the dataloader's
    `dataloader.sequence.tokenize` builds for it. The message names the tokenizer, the probe,
    the first differing token index, the decoded text around it on both sides and a hint.

    Rendering is without a generation prompt. Media are not compared (module docstring)."""
    template = _template(tokenizer, chat_template)
    for probe in PROBES:
        name = f"probe {probe.id!r}"
        hf = [int(t) for t in _render(tokenizer, to_messages(probe), template, name,
                                      mask=False)["input_ids"]]
        ours = tokenize(probe, 0, tokenizer).token_ids.tolist()
        if hf == ours:
            continue
        shorter = min(len(hf), len(ours))
        i = next((k for k in range(shorter) if hf[k] != ours[k]), shorter)
        raise ValueError(
            f"tokenizer {tokenizer.name!r}: the chat template and the dataloader's prompt differ "
            f"on {name} at token {i} (template: {len(hf)} tokens, dataloader: {len(ours)})\n"
            f"  template:   {_around(tokenizer, hf, i)}\n"
            f"  dataloader: {_around(tokenizer, ours, i)}\n"
            f"hint: {_hint(tokenizer, probe, hf, ours, i)}")
