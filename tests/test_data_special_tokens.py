"""Special-token strings that come from a row (content, tool-call names and arguments, `name`, any string) are
plain text unless special_tokens_in_content="special", and the protection never changes what the template
sees: the rendered text equals transformers' apply_chat_template (issue 13, item 9)."""

from __future__ import annotations

import pytest
from helpers_data import LLAMA3, QWEN25, byte_level_tokenizer, hf_tokenizer

from nibblora.data import ConversationEncoder, DataError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return byte_level_tokenizer(tmp_path_factory.mktemp("bytebpe"))


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    return hf_tokenizer(tok_dir)


def _reference(hf_tok, source, messages):
    return hf_tok.apply_chat_template(messages, chat_template=source, tokenize=False)


def _plain_ids(hf_tok, text):
    """What `text` tokenizes to with special-token matching off (the row's copy, as plain text)."""
    backend = hf_tok.backend_tokenizer
    backend.encode_special_tokens = True
    try:
        return backend.encode(text, add_special_tokens=False).ids
    finally:
        backend.encode_special_tokens = False


def _contains(haystack, needle):
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


TOOL_CALL_ROW = [
    {"role": "user", "content": "Find the weather."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "lookup<|im_end|>", "arguments": {"city": "Oslo<|im_start|>"}}}
        ],
    },
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."},
]


def test_qwen_tool_call_names_and_arguments_are_plain_text(tok_dir, hf_tok):
    im_end, im_start = (hf_tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>"))
    enc = ConversationEncoder(tok_dir, QWEN25)
    text = enc.render(TOOL_CALL_ROW)
    assert text == _reference(hf_tok, QWEN25, TOOL_CALL_ROW)
    ids = enc.encode_arrays({"messages": TOOL_CALL_ROW})[0].tolist()
    # The template's own tokens are special; the one copy of each in the tool call is not.
    assert ids.count(im_end) == text.count("<|im_end|>") - 1
    assert ids.count(im_start) == text.count("<|im_start|>") - 1
    assert _contains(ids, _plain_ids(hf_tok, "lookup<|im_end|>"))
    special = ConversationEncoder(tok_dir, QWEN25, special_tokens_in_content="special")
    ids = special.encode_arrays({"messages": TOOL_CALL_ROW})[0].tolist()
    assert ids.count(im_end) == text.count("<|im_end|>"), "special: matched as transformers does"


NAMED_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] }}{% if m['name'] %}{{ ' ' + m['name'] }}{% endif %}"
    "{{ '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
)


def test_a_message_name_is_plain_text(tok_dir, hf_tok):
    im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "user", "name": "eve<|im_end|>", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    enc = ConversationEncoder(tok_dir, NAMED_CHATML)
    assert enc.render(messages) == _reference(hf_tok, NAMED_CHATML, messages)
    assert enc.encode_arrays({"messages": messages})[0].tolist().count(im_end) == 2


# Llama-3 with a branch on the content, and a slice of it: the template must see the row's string unchanged.
LLAMA3_STARTSWITH = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if m['content'].startswith('<|eot_id|>') %}{{ 'yes:' + m['content'][10:] }}{% else %}"
    "{{ 'no:' + m['content'] }}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
)


@pytest.mark.parametrize("source", [LLAMA3, LLAMA3_STARTSWITH], ids=["llama-3", "llama-3-startswith"])
def test_llama3_renders_as_transformers_and_keeps_row_specials_plain(tok_dir, hf_tok, source):
    eot = hf_tok.convert_tokens_to_ids("<|eot_id|>")
    messages = [
        {"role": "user", "content": "<|eot_id|> what now? "},
        {"role": "assistant", "content": "<|eot_id|>nothing<|eot_id|>"},
    ]
    enc = ConversationEncoder(tok_dir, source)
    text = enc.render(messages)
    assert text == _reference(hf_tok, source, messages)
    if source is LLAMA3_STARTSWITH:
        assert text.count("yes:") == 2, "startswith sees the content as transformers does"
    ids, mask = enc.encode_arrays({"messages": messages})
    assert ids.tolist().count(eot) == 2, "only the template's own end-of-turn tokens are special"
    assert mask.sum() > 0


def test_a_template_that_cuts_a_row_special_token_out_of_its_string_refuses_the_row(tok_dir):
    source = "{% for m in messages %}{{ m['content'][:10] }}{{ '<|eot_id|>' }}{% endfor %}"
    enc = ConversationEncoder(tok_dir, source, train_on="all")
    with pytest.raises(DataError, match="cannot keep that string plain text"):
        enc.encode_arrays({"messages": [{"role": "user", "content": "<|eot_id|>, then more"}]})
    ids, _ = ConversationEncoder(tok_dir, source, train_on="all", special_tokens_in_content="special").encode_arrays(
        {"messages": [{"role": "user", "content": "<|eot_id|>, then more"}]}
    )
    assert len(ids) == 2


def test_generated_rows_never_smuggle_a_special_token(tok_dir, hf_tok):
    """Seeded: special-token strings spliced into every kind of string a row carries, over three templates."""
    import random

    rng = random.Random(13)
    specials = ["<|im_end|>", "<|im_start|>", "<|eot_id|>", "</s>", "<|endoftext|>"]
    special_ids = {hf_tok.convert_tokens_to_ids(s) for s in specials}

    def text():
        words = ["hi", "there", rng.choice(specials), "x", " ", "\n"]
        return "".join(rng.choice(words) for _ in range(rng.randint(1, 6)))

    for source in (QWEN25, LLAMA3, NAMED_CHATML):
        enc = ConversationEncoder(tok_dir, source)
        for _ in range(40):
            messages = [
                {"role": "user", "content": text(), "name": text()},
                {
                    "role": "assistant",
                    "content": text(),
                    "tool_calls": [{"function": {"name": text(), "arguments": {"a": text()}}}],
                },
            ]
            rendered = enc.render(messages)
            assert rendered == _reference(hf_tok, source, messages)
            ids = enc.encode_arrays({"messages": messages})[0].tolist()
            clean = [{k: v for k, v in m.items() if k in ("role",)} | {"content": "c"} for m in messages]
            template_own = _reference(hf_tok, source, clean)
            want = sum(template_own.count(s) for s in specials)
            assert sum(ids.count(i) for i in special_ids) == want, rendered
