"""Hostile input rows for prepare (issue 13): a few hundred seeded, generated bad rows. Each must give a
DataError whose message is one line naming file:line, the CLI must print one line and exit 2, and no output
or temporary folder may be left behind."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers_data import CONVERSATIONS, byte_level_tokenizer

from nibblora.data import DataError, prepare_dataset
from nibblora.prepare import main as prepare_main

GOOD = json.dumps({"messages": CONVERSATIONS["single_turn"]})
MARKERS = ["\ufdd0", "\ufdd1", "\ufdd2", "\ufdd3"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return byte_level_tokenizer(tmp_path_factory.mktemp("bytebpe"))


def _scalar(rng: random.Random):
    return rng.choice([None, True, 0, -1, 3.5, "x", "", [], [1, "a"], {"k": 1}])


def _hostile_line(rng: random.Random, kind: str) -> bytes:
    """One line (without its newline) of the given kind, each certain to be refused."""
    if kind == "not_an_object":
        return json.dumps(_scalar(rng)).encode()
    if kind == "no_known_keys":
        return json.dumps({rng.choice(["msgs", "content", "input", "conversation"]): "hi"}).encode()
    if kind == "messages_not_a_list":
        return json.dumps({"messages": rng.choice(["hi", 3, {"role": "user"}, None, True])}).encode()
    if kind == "empty_conversation":
        return b'{"messages": []}'
    if kind == "bad_role":
        message = rng.choice(
            [
                {"content": "no role"},
                {"role": rng.choice([None, 1, ["user"], {"r": 1}]), "content": "x"},
                {"role": "".join(rng.choice("abcxyz") for _ in range(rng.randint(1, 8))) + "_", "content": "x"},
            ]
        )
        return json.dumps({"messages": [message]}).encode()
    if kind == "reserved_character":
        field = rng.choice(["content", "name", "tool"])
        text = "a" + rng.choice(MARKERS) + "b"
        message = {"role": "user", "content": "hi"}
        if field == "tool":
            message = {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": text, "arguments": {}}}],
            }
        else:
            message[field] = text
        return json.dumps({"messages": [message]}, ensure_ascii=rng.random() < 0.5).encode()
    if kind == "prompt_completion_mismatch":
        return json.dumps(
            {"prompt": rng.choice(["q", ["q"], 1]), "completion": rng.choice([None, 2, {"a": 1}])}
        ).encode()
    if kind == "text_not_a_string":
        return json.dumps({"text": rng.choice([None, True, 0, 3.5, [], ["a"], {"k": "v"}])}).encode()
    if kind == "truncated_json":
        return GOOD.encode()[: rng.randint(1, len(GOOD) - 2)]
    if kind == "deep_nesting":
        depth = rng.choice([129, 200, 1000])  # serde_json's recursion limit is 128; 100,000 deep: below
        return ('{"messages": ' + "[" * depth + "]" * depth + "}").encode()
    if kind == "not_json":
        return rng.choice([b"NaN", b"{'single': 'quotes'}", b'{"a": 1,}', b"<xml/>", b'{"a": Infinity}'])
    if kind == "invalid_utf8":
        return b'{"text": "' + bytes([rng.choice([0xFF, 0xC3, 0xED, 0x80])]) + b'"}'
    if kind == "too_long":
        return json.dumps({"text": "z" * rng.randint(3000, 9000)}).encode()
    raise AssertionError(kind)


KINDS = [
    "not_an_object",
    "no_known_keys",
    "messages_not_a_list",
    "empty_conversation",
    "bad_role",
    "reserved_character",
    "prompt_completion_mismatch",
    "text_not_a_string",
    "truncated_json",
    "deep_nesting",
    "not_json",
    "invalid_utf8",
    "too_long",
]


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((name, f".{name}")))


def test_generated_hostile_rows_are_one_line_data_errors_naming_file_and_line(tok_dir, tmp_path):
    rng = random.Random(2026)
    cases = [(kind, rng.randint(0, 2)) for kind in KINDS for _ in range(24)]  # 312 cases
    for i, (kind, good_before) in enumerate(cases):
        line = _hostile_line(rng, kind)
        src = tmp_path / f"in{i}.jsonl"
        src.write_bytes(b"".join(GOOD.encode() + b"\n" for _ in range(good_before)) + line + b"\n")
        with pytest.raises(DataError) as caught:
            prepare_dataset([src], tmp_path / "out", tokenizer=tok_dir, template="chatml", max_line_bytes=2048)
        message = str(caught.value)
        assert "\n" not in message, (kind, message)
        assert f"in{i}.jsonl:{good_before + 1}: " in message, (kind, message)
        assert message.startswith("preparing the dataset: "), (kind, message)
        assert _leftovers(tmp_path, "out") == [], kind


def test_hostile_rows_through_the_cli_exit_2_with_one_line(tok_dir, tmp_path, capsys):
    rng = random.Random(7)
    for i, kind in enumerate(KINDS):
        src = tmp_path / f"c{i}.jsonl"
        src.write_bytes(GOOD.encode() + b"\n" + _hostile_line(rng, kind) + b"\n")
        rc = prepare_main(
            [
                "--tokenizer",
                str(tok_dir),
                "--template",
                "chatml",
                "--input",
                str(src),
                "--output",
                str(tmp_path / "out"),
                "--quiet",
                "--max-line-bytes",
                "2048",
            ]
        )
        err = capsys.readouterr().err
        assert rc == 2, (kind, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nibblora.prepare: error: "), (kind, err)
        assert f"c{i}.jsonl:2: " in lines[0], (kind, err)
        assert _leftovers(tmp_path, "out") == [], kind


def test_an_over_long_row_names_its_line_and_the_option_and_rows_get_the_same_cap(tok_dir, tmp_path):
    src = tmp_path / "big.jsonl"
    src.write_text(GOOD + "\n" + json.dumps({"text": "y" * 50_000}) + "\n", encoding="utf-8")
    with pytest.raises(
        DataError,
        match=r"big\.jsonl:2: the row is 50012 bytes, over the 4096-byte limit.*"
        r"--max-line-bytes",
    ):
        prepare_dataset([src], tmp_path / "out", tokenizer=tok_dir, template="chatml", max_line_bytes=4096)
    summary = prepare_dataset([src], tmp_path / "out", tokenizer=tok_dir, template="chatml")
    assert summary.rows_out == 2, "the default cap (8 MiB) lets a 50 kB row through"
    with pytest.raises(DataError, match=r"input row 1: the row is \d+ bytes, over the 100-byte limit"):
        prepare_dataset([{"text": "a"}, {"text": "b" * 200}], tmp_path / "o2", tokenizer=tok_dir, max_line_bytes=100)
    with pytest.raises(DataError, match="max line bytes must be positive"):
        prepare_dataset([src], tmp_path / "o3", tokenizer=tok_dir, template="chatml", max_line_bytes=0)
    assert _leftovers(tmp_path, "o2") == [] and _leftovers(tmp_path, "o3") == []


def test_a_row_nested_100000_deep_is_malformed_json_not_a_crash(tok_dir, tmp_path):
    src = tmp_path / "deep.jsonl"
    src.write_text(GOOD + "\n" + '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"deep\.jsonl:2: malformed JSON \(recursion limit exceeded"):
        prepare_dataset([src], tmp_path / "out", tokenizer=tok_dir, template="chatml")
    assert _leftovers(tmp_path, "out") == []
