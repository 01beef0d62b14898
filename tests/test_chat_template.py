"""Assistant-only loss masks token by token against transformers' chat-template assistant mask,
and `check_chat_template` on matching and mismatching templates."""

from __future__ import annotations

import numpy as np
import pytest

from dataloader.manifest import MediaRef, Record, Turn
from dataloader.sequence import IMAGE_PAD, VIDEO_PAD, HFTokenizer, tokenize
from examples.keye_vl.chat_template import (
    PROBES,
    assistant_token_mask,
    check_chat_template,
    to_messages,
)
from tests.test_keye_convert import tiny_tokenizer_folder
from tests.test_keye_model import RECORDS

# Qwen's turn format with each assistant turn's content and <|im_end|> in a generation block.
# Media parts carry their frame plan, so the template itself writes Keye's vision tokens (what
# the HF processor does after rendering); the mask comes from transformers, not from our code.
MASK_TEMPLATE = (
    "{%- for m in messages -%}"
    "<|im_start|>{{ m.role }}{{ '\\n' }}"
    "{%- if m.content is string -%}{%- set text = m.content -%}"
    "{%- else -%}"
    "{%- set text = m.content | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join -%}"
    "{%- for part in m.content if part.type != 'text' -%}"
    "<|vision_start|>"
    "{%- if part.type == 'image' -%}{{ '<|image_pad|>' * part.tokens }}"
    "{%- else -%}{%- for f in part.frames -%}"
    "<|frame|>{{ '%.1f' | format(f.timestamp) }}"
    "{%- if f.fast -%}<|fast_start|>{%- endif -%}"
    "{{ '<|video_pad|>' * f.tokens }}"
    "{%- if f.fast -%}<|fast_end|>{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|vision_end|>"
    "{%- endfor -%}{%- endif -%}"
    "{%- if m.role == 'assistant' -%}"
    "{% generation %}{{ text }}<|im_end|>{% endgeneration %}"
    "{%- else -%}{{ text }}<|im_end|>{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
)

QWEN = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}")
# Qwen3's template: the last assistant turn gets an (empty) reasoning block.
QWEN3_THINK = """\
{%- for m in messages -%}
<|im_start|>{{ m.role }}
{% if m.role == 'assistant' and loop.last %}<think>

</think>

{% endif %}{{ m.content }}<|im_end|>
{% endfor -%}
"""
NO_NEWLINE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
              "{% endfor %}")
DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Keye."
                  "<|im_end|>\n{% endif %}" + QWEN)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_tokenizer_folder(tmp_path_factory.mktemp("chat") / "tok")


@pytest.fixture(scope="module")
def tok(folder):
    from examples.keye_vl.tokenizer import load_tokenizer

    return load_tokenizer(folder)


def _messages(record: Record) -> list[dict]:
    """HF multimodal messages: media parts (with their frame plans) then the text, on the first
    user turn (the dataloader's placement)."""
    roles = [t.role for t in record.conversation]
    first_user = roles.index("user")
    out = []
    for i, turn in enumerate(record.conversation):
        if i != first_user or not record.media:
            out.append({"role": turn.role, "content": turn.content})
            continue
        parts = []
        for m in record.media:
            if m.kind == "image":
                parts.append({"type": "image", "tokens": m.tokens[0]})
            else:
                parts.append({"type": "video", "frames": [
                    {"tokens": n, "fast": fast, "timestamp": ts}
                    for n, fast, ts in zip(m.tokens, m.is_fast, m.timestamps, strict=True)]})
        parts.append({"type": "text", "text": turn.content})
        out.append({"role": turn.role, "content": parts})
    return out


def _image(tokens: int) -> MediaRef:
    return MediaRef("b.png", "image", (tokens,), (28,), (28 * tokens,), (False,), (0.0,))


CHATS = [r for r in RECORDS if r.id != "text"] + [
    Record("multi-turn-image", "d", (
        Turn("system", "Tu es utile.\nRéponds brièvement."),
        Turn("user", "Qu'y a-t-il sur l'image ? 🐱"),
        Turn("assistant", "Un chat.\n\nIl dort."),
        Turn("user", "Et la couleur ?"),
        Turn("assistant", "Gris — « tigré ».\n"),
        Turn("user", "merci"),
        Turn("assistant", "De rien !")), (_image(5),)),
    *PROBES,
]


@pytest.mark.parametrize("record", CHATS, ids=lambda r: r.id)
def test_loss_mask_equals_transformers_assistant_mask(tok, record):
    ref = assistant_token_mask(tok, _messages(record), chat_template=MASK_TEMPLATE)
    ours = tokenize(record, 0, tok)
    np.testing.assert_array_equal(ours.token_ids, ref.token_ids)
    np.testing.assert_array_equal(ours.is_target, ref.assistant_mask)
    visual = np.isin(ref.token_ids, [tok.special_id(IMAGE_PAD), tok.special_id(VIDEO_PAD)])
    assert visual.sum() == sum(sum(m.tokens) for m in record.media)
    assert ref.assistant_mask.any() and not ref.assistant_mask.all()


def test_assistant_mask_needs_a_generation_block(tok):
    with pytest.raises(ValueError, match=r"has no \{% generation %\} block"):
        assistant_token_mask(tok, to_messages(PROBES[0]), chat_template=QWEN)


def test_tiny_tokenizer_template_matches_the_dataloader(tok):
    check_chat_template(tok)  # the tokenizer's own template
    check_chat_template(tok, chat_template=QWEN)


def test_qwen3_think_block_is_reported(tok):
    with pytest.raises(ValueError) as err:
        check_chat_template(tok, chat_template=QWEN3_THINK)
    msg = str(err.value)
    assert f"tokenizer {tok.name!r}" in msg
    assert "probe 'system-user-assistant' at token " in msg
    template_line = msg.split("template:   ")[1].split("\n")[0]
    assert "['<']" in template_line and "'think>" in template_line  # "<think>" is two tokens
    assert "reasoning block (<think>...</think>)" in msg
    # The index is the first assistant content token: after "<|im_start|>assistant\n".
    i = int(msg.split(" at token ")[1].split()[0])
    ids = tokenize(PROBES[0], 0, tok).token_ids.tolist()
    assert tok._tok.decode(ids[:i]).endswith("<|im_start|>assistant\n")
    assert tok._tok.decode(ids[i:]).startswith("A cat")


def test_missing_newline_after_im_end_is_reported(tok):
    with pytest.raises(ValueError, match=r"(?s)at token (\d+) .*does not follow <\|im_end\|> "
                                         r"with the dataloader's '\\n'") as err:
        check_chat_template(tok, chat_template=NO_NEWLINE)
    i = int(str(err.value).split(" at token ")[1].split()[0])
    ids = tokenize(PROBES[0], 0, tok).token_ids.tolist()
    assert tok._tok.convert_ids_to_tokens(ids[i - 1]) == "<|im_end|>"
    lines = str(err.value).splitlines()
    assert lines[1].startswith("  template:   ") and "['<|im_start|>']" in lines[1]
    assert lines[2].startswith("  dataloader: ") and "['\\n']" in lines[2]


def test_default_system_turn_is_reported(tok):
    with pytest.raises(ValueError, match=r"probe 'multi-turn-no-system' at token 1 .*\n.*\n.*"
                                         r"\n.*adds a default system turn"):
        check_chat_template(tok, chat_template=DEFAULT_SYSTEM)


def test_tokenizer_without_chat_template_is_refused(folder):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    hf.chat_template = None
    with pytest.raises(ValueError, match="tokenizer 'bare' has no chat template"):
        check_chat_template(HFTokenizer(hf, name="bare"))
    with pytest.raises(TypeError, match="needs a Hugging Face tokenizer .* got ByteTokenizer"):
        from dataloader.sequence import ByteTokenizer

        check_chat_template(ByteTokenizer())


def test_media_and_text_turns_have_no_text_only_messages():
    with pytest.raises(ValueError, match="record 'image' has 1 media"):
        to_messages(RECORDS[0])
    with pytest.raises(ValueError, match=r"conversation\[0\] is a 'text'"):
        to_messages(next(r for r in RECORDS if r.id == "text"))
