"""Convert a SentencePiece .model (e.g. Mistral's, shipped in the PyPI package mistral_common) to tokenizer.json.

    python scripts/convert_sentencepiece.py --model PATH/tokenizer.model.v1 --out DIR [--check]
    python scripts/convert_sentencepiece.py --mistral-common v1 --out DIR   # take it from mistral_common

Uses transformers' SpmConverter.build_tokenizer_from_spm_proto, which follows the model's own normalizer spec,
so the result encodes like SentencePieceProcessor.encode. Writes DIR/tokenizer.json and a
tokenizer_config.json naming BOS / EOS / UNK from the model. `--check` compares ids with sentencepiece on a few
hard strings and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CHECK_TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "multi\nline\n\ntext\twith tabs",
    "unicode: naïve café 日本語 🤖🎉 Ωμέγα",
    "numbers 3.14159 and 1,000,000",
    "[INST] What is 2+2? [/INST]",
    "",
]


def mistral_common_model(version: str) -> Path:
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / f"tokenizer.model.{version}"
    if not path.is_file():
        candidates = sorted((Path(mistral_common.__file__).parent / "data").glob(f"*.model.{version}"))
        if not candidates:
            raise SystemExit(f"no SentencePiece model {version!r} in mistral_common's data folder")
        path = candidates[0]
    return path


def convert(model: Path, out_dir: Path) -> Path:
    """Write out_dir/tokenizer.json (+ tokenizer_config.json); returns the tokenizer.json path."""
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model.read_bytes())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    # Control pieces (<s>, </s>) and <unk> become special added tokens, as in the tokenizer.json files models
    # ship: a chat template's "<s>" then maps to BOS instead of being spelled out in pieces.
    from tokenizers import AddedToken

    specials = [p.piece for p in proto.pieces if p.type in (2, 3)]  # UNKNOWN, CONTROL
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tokenizer.save(str(path))
    pieces = proto.pieces
    spec = proto.trainer_spec
    config = {
        "bos_token": pieces[spec.bos_id].piece if spec.bos_id >= 0 else None,
        "eos_token": pieces[spec.eos_id].piece if spec.eos_id >= 0 else None,
        "unk_token": pieces[spec.unk_id].piece if spec.unk_id >= 0 else None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def check(model: Path, tokenizer_json: Path, texts: list[str] = CHECK_TEXTS) -> list[str]:
    """Strings whose ids differ between sentencepiece and the converted tokenizer (empty when all agree)."""
    import sentencepiece
    from tokenizers import Tokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    tok = Tokenizer.from_file(str(tokenizer_json))
    return [t for t in texts if sp.encode(t) != tok.encode(t, add_special_tokens=False).ids]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a SentencePiece .model file")
    source.add_argument("--mistral-common", metavar="VERSION", help="a model shipped in mistral_common: v1, v3, v7")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--check", action="store_true", help="compare ids with sentencepiece")
    args = parser.parse_args()
    model = args.model or mistral_common_model(args.mistral_common)
    path = convert(model, args.out)
    print(f"wrote {path}")
    if args.check:
        bad = check(model, path)
        for text in bad:
            print(f"ids differ for {text!r}", file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
