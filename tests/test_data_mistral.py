"""A real production vocabulary: Mistral's SentencePiece model from the PyPI package mistral_common, converted
to tokenizer.json by scripts/convert_sentencepiece.py; ids checked against sentencepiece itself."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from helpers_data import CONVERSATIONS, FAMILY_TEMPLATES, hf_tokenizer

from nibblora.data import ConversationEncoder, PreparedDataset, prepare_dataset

pytest.importorskip("mistral_common")
sentencepiece = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_sentencepiece.py"
TEXTS = [
    "Hello world",
    " leading space",
    "trailing space ",
    "double  space",
    "multi\nline\n\ntext\twith tabs",
    "naïve café 日本語 🤖🎉 Ωμέγα",
    "numbers 3.14159 and 1,000,000",
    "[INST] What is 2+2? [/INST]",
    "code: def f(x):\n    return {'a': [1, 2]}",
    "ALL CAPS and MiXeD case",
    "\u00a0non-breaking\u2009spaces",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math",
    "",
]


@pytest.fixture(scope="module")
def converter():
    spec = importlib.util.spec_from_file_location("convert_sentencepiece", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mistral(converter, tmp_path_factory):
    model = converter.mistral_common_model("v1")
    folder = tmp_path_factory.mktemp("mistral")
    converter.convert(model, folder)
    return model, folder


def test_converted_tokenizer_matches_sentencepiece(converter, mistral):
    model, folder = mistral
    assert converter.check(model, folder / "tokenizer.json", TEXTS) == []
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    encoder = ConversationEncoder(folder, "mistral")
    for text in TEXTS:
        assert encoder.tokenize(text) == sp.encode(text), text


def test_mistral_conversations_match_transformers_and_sentencepiece(mistral):
    model, folder = mistral
    hf = hf_tokenizer(folder)
    encoder = ConversationEncoder(folder, "mistral")
    for key in ("single_turn", "multi_turn", "unicode", "whitespace"):
        messages = CONVERSATIONS[key]
        out = hf.apply_chat_template(
            messages,
            chat_template=FAMILY_TEMPLATES["mistral-v0.1"].replace("eos_token + ' '", "eos_token"),
            tokenize=True,
            return_dict=True,
        )
        ids, mask = encoder.encode_arrays({"messages": messages})
        assert ids.tolist() == list(out["input_ids"]), key
        assert ids[0] == 1 and mask.sum() > 0  # BOS from the template; something to learn


def test_prepare_with_mistral_vocabulary(mistral, tmp_path):
    _, folder = mistral
    rows = [{"messages": CONVERSATIONS[k]} for k in ("single_turn", "multi_turn", "unicode")]
    summary = prepare_dataset(rows, tmp_path / "out", tokenizer=folder, template="mistral", max_length=512, pack=True)
    ds = PreparedDataset(tmp_path / "out")
    assert len(ds) == 1 and summary.documents == 3
    assert ds[0]["input_ids"].tolist().count(2) == 4  # one EOS per assistant turn, each trained
