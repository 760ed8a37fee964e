"""The command line of `python -m nibblora.prepare`: argparse over `nibblora.data.prepare_dataset`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from nibblora.cli_errors import run_tool
from nibblora.data.encoder import TRAIN_ON
from nibblora.data.prepare import DEFAULT_MAX_LINE_BYTES, TRUNCATION, prepare_dataset
from nibblora.data.sources import TEMPLATE_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nibblora.prepare",
        description="Render chat templates, tokenize and build loss masks (and pack) in Rust, into a folder of "
        "memory-mappable arrays that nibblora.data.PreparedDataset reads.",
    )
    parser.add_argument("--tokenizer", help="folder with tokenizer.json (+ tokenizer_config.json), or the file")
    parser.add_argument(
        "--template",
        default=None,
        help=f"a name ({', '.join(TEMPLATE_NAMES)}), a .jinja file, a tokenizer_config.json, or "
        "omit for the tokenizer's own chat template",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        action="extend",
        default=[],
        metavar="FILE",
        help="JSON Lines or Parquet files: rows of messages, prompt/completion or text",
    )
    parser.add_argument("--output", required=True, help="output folder (written atomically)")
    parser.add_argument("--max-length", type=int, default=None, metavar="N", help="longest row, in tokens")
    parser.add_argument(
        "--truncation",
        default="keep-start",
        choices=TRUNCATION,
        help="for documents over --max-length (default keep-start)",
    )
    parser.add_argument("--pack", action="store_true", help="pack documents into rows of --max-length tokens")
    parser.add_argument(
        "--train-on", default="assistant", choices=TRAIN_ON, help="which turns the loss looks at (default assistant)"
    )
    parser.add_argument("--shard", default="0/1", metavar="I/N", help="prepare only rows p with p %% N == I")
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed JSON lines")
    parser.add_argument(
        "--special-tokens-in-content",
        default="text",
        choices=("text", "special"),
        help="tokenize special-token strings inside messages as plain text (default) or as the special tokens",
    )
    parser.add_argument(
        "--max-line-bytes",
        type=int,
        default=DEFAULT_MAX_LINE_BYTES,
        metavar="N",
        help="longest accepted row in bytes of JSON; a longer one stops with an error naming "
        "file:line (default 8 MiB: a row takes a couple of hundred times its size in memory)",
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        default=None,
        metavar="DIR",
        help="instead of preparing: concatenate prepared shard folders into --output",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


@dataclass(frozen=True)
class CombineSummary:
    shards: int
    output: str
    rows: int
    tokens: int

    def format(self) -> str:
        return f"combined {self.shards} shards into {self.output}: {self.rows:,} rows, {self.tokens:,} tokens"


def run(args: argparse.Namespace) -> CombineSummary | object:
    """The job behind the command line: combine shards, or prepare a dataset. Returns a summary."""
    if args.combine:
        from nibblora.data.dataset import combine_shards  # torch: only when combining

        ds = combine_shards(args.combine, args.output, overwrite=args.overwrite)
        return CombineSummary(len(args.combine), str(args.output), len(ds), len(ds.input_ids))
    return prepare_dataset(
        args.input,
        args.output,
        tokenizer=args.tokenizer,
        template=args.template,
        max_length=args.max_length,
        pack=args.pack,
        train_on=args.train_on,
        truncation=args.truncation,
        shard=args.shard,
        skip_bad_lines=args.skip_bad_lines,
        special_tokens_in_content=args.special_tokens_in_content,
        overwrite=args.overwrite,
        progress=not args.quiet,
        max_line_bytes=args.max_line_bytes,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.combine and (not args.tokenizer or not args.input):
        parser.error("--tokenizer and --input are required (or --combine DIR...)")
    # Any NibbloraError (bad data: DataError; an unwritable output: OutputError) is one line and exit 2.
    return run_tool("nibblora.prepare", lambda: run(args))
