"""A named --template over the tokenizer's own chat template is said in one line, with whether the two render
(and so train) differently (issue 13, item 18)."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers_data import CONVERSATIONS, QWEN25, byte_level_tokenizer

from nibblora import _native
from nibblora.data import ConversationEncoder, prepare_dataset
from nibblora.prepare import main as prepare_main


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return byte_level_tokenizer(tmp_path_factory.mktemp("bytebpe"))


def _with_own_template(tok_dir, folder, source):
    shutil.copytree(tok_dir, folder)
    (folder / "chat_template.jinja").write_text(source, encoding="utf-8")
    return folder


def test_named_template_over_a_different_own_template_says_so_in_one_line(tok_dir, tmp_path, capsys):
    own = _with_own_template(tok_dir, tmp_path / "qwen", QWEN25)  # ChatML plus a default system prompt
    note = ConversationEncoder(own, "chatml").template_note()
    assert note.startswith("using the named template 'chatml', not the tokenizer's own chat template (")
    assert "render conversations differently" in note and "\n" not in note
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": CONVERSATIONS["single_turn"]}) + "\n", encoding="utf-8")
    rc = prepare_main(
        [
            "--tokenizer",
            str(own),
            "--template",
            "chatml",
            "--input",
            str(src),
            "--output",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0 and err == [f"nibblora.prepare: {note}"]


def test_same_rendering_and_no_own_template_and_no_named_template(tok_dir, tmp_path, capsys):
    same = _with_own_template(tok_dir, tmp_path / "same", _native.named_template_source("chatml"))
    assert ConversationEncoder(same, "chatml").template_note().endswith("both render the same text")
    assert ConversationEncoder(tok_dir, "chatml").template_note() is None, "the tokenizer ships no template"
    assert ConversationEncoder(same, None).template_note() is None, "its own template is used"
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": CONVERSATIONS["single_turn"]}) + "\n", encoding="utf-8")
    prepare_dataset([src], tmp_path / "out", tokenizer=tok_dir, template="chatml")
    assert capsys.readouterr().err == ""
