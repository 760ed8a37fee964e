"""prepare_dataset: rows in (JSON Lines, Parquet, Python dicts), a prepared-dataset folder out.

Rendering, tokenizing, masking, packing and writing run in Rust on all cores with the GIL released; Python
only resolves files, shows progress and writes metadata.json. Parquet is read here with pyarrow, a batch at a
time, and handed to Rust as JSON rows: the Rust arrow/parquet crates would triple the native build's compile
time for one input format. Everything is written into a hidden sibling folder, renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nibblora import __version__
from nibblora.checkpoint.outdir import check_out_dir, move_into_place, temp_sibling
from nibblora.data.encoder import ConversationEncoder
from nibblora.errors import DataError, DataFileNotFoundError

TRUNCATION = ("keep-start", "drop", "error")
FORMAT_NAME = "nibblora.prepared"
FORMAT_VERSION = 1
METADATA = "metadata.json"
_PARQUET_BATCH = 4096
# Longest accepted row (bytes of JSON): rendering and tokenizing take a couple of hundred times a row's size in
# memory, so one stray huge line would otherwise exhaust it. Same default as the Rust core's.
DEFAULT_MAX_LINE_BYTES = 8 << 20


@dataclass
class PrepareSummary:
    """What a run did. tokens counts the tokens written; supervised ones are those the loss looks at."""

    out_dir: Path
    rows_in: int
    documents: int
    rows_out: int
    tokens: int
    supervised_tokens: int
    truncated: int
    dropped_too_long: int
    dropped_no_supervised: int
    skipped_bad_lines: int
    packed: bool
    seconds: float
    shard: tuple[int, int] = (0, 1)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def supervised_fraction(self) -> float:
        return self.supervised_tokens / max(self.tokens, 1)

    def format(self) -> str:
        rows = [
            ("rows in", f"{self.rows_in:,}"),
            (
                "rows out",
                f"{self.rows_out:,}" + (f" (packed from {self.documents:,} documents)" if self.packed else ""),
            ),
            ("tokens", f"{self.tokens:,}"),
            ("supervised", f"{self.supervised_tokens:,} ({100 * self.supervised_fraction:.1f}%)"),
            ("truncated", f"{self.truncated:,}"),
            (
                "dropped",
                f"{self.dropped_too_long + self.dropped_no_supervised:,} "
                f"({self.dropped_too_long:,} too long, {self.dropped_no_supervised:,} with nothing to learn)",
            ),
            ("bad lines skipped", f"{self.skipped_bad_lines:,}"),
        ]
        if self.shard != (0, 1):
            rows.insert(0, ("shard", f"{self.shard[0]}/{self.shard[1]}"))
        width = max(len(k) for k, _ in rows)
        rate = self.tokens / max(self.seconds, 1e-9)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        lines.append(f"wrote {self.out_dir} in {self.seconds:.1f} s ({rate / 1e6:.2f} M tokens/s)")
        return "\n".join(lines)


def parse_shard(text: str) -> tuple[int, int]:
    """'2/8' -> (2, 8); shards are numbered from 0."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise DataError(f"shard {text!r}: write it as i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise DataError(f"shard {text!r}: need 0 <= i < n")
    return i, n


def _json_rows(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    for row in rows:
        yield json.dumps(row, ensure_ascii=False, default=str)


def _parquet_to_jsonl(path: Path, dest: Path) -> None:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
        with open(dest, "w", encoding="utf-8") as out:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH):
                for line in _json_rows(batch.to_pylist()):
                    out.write(line + "\n")
    except OSError as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None


def _sources(inputs: Sequence[str | Path] | Sequence[dict[str, Any]], scratch: Path) -> list[tuple]:
    if inputs and all(isinstance(x, dict) for x in inputs):
        return [("rows", "input", list(_json_rows(inputs)))]  # type: ignore[arg-type]
    sources: list[tuple] = []
    for i, item in enumerate(inputs):
        if isinstance(item, dict):
            raise DataError("inputs: pass either files or rows (dicts), not both")
        path = Path(item)
        if not path.is_file():
            raise DataFileNotFoundError(f"{path}: input file does not exist")
        if path.suffix == ".parquet":
            converted = scratch / f"_input_{i}.jsonl"
            _parquet_to_jsonl(path, converted)
            sources.append(("jsonl", str(converted)))
        else:
            sources.append(("jsonl", str(path)))
    if not sources:
        raise DataError("no input given")
    return sources


def prepare_dataset(
    inputs: Sequence[str | Path] | Sequence[dict[str, Any]],
    output: str | Path,
    *,
    tokenizer: str | Path,
    template: str | None = None,
    max_length: int | None = None,
    pack: bool = False,
    train_on: str = "assistant",
    truncation: str = "keep-start",
    shard: tuple[int, int] | str = (0, 1),
    skip_bad_lines: bool = False,
    special_tokens_in_content: str = "text",
    overwrite: bool = False,
    progress: bool = False,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> PrepareSummary:
    """Prepare rows for supervised fine-tuning into the folder `output`.

    inputs: JSON Lines / Parquet files, or a list of row dicts. A row is {"messages": [{"role", "content"}...]},
    {"prompt", "completion"} (strings, or lists of messages), or {"text"} (trained on every token).
    tokenizer: folder with tokenizer.json (+ tokenizer_config.json) or the file. template: see
    ConversationEncoder. max_length: longest row in tokens; truncation: "keep-start", "drop" or "error" for
    longer documents. pack: best-fit-decreasing into rows of max_length tokens. train_on: "assistant", "all",
    "last". shard: (i, n) or "i/n", keep rows whose position p (across all inputs) has p % n == i.
    skip_bad_lines: skip and count malformed JSON lines instead of stopping. output is written atomically and
    must be absent or empty unless overwrite. progress: a tqdm bar on stderr. max_line_bytes: a row longer
    than this (bytes of JSON) stops the run with a DataError naming file:line (default 8 MiB).
    When a named template is chosen over the tokenizer's own chat template, one line on stderr says so and
    whether they render differently. Errors: DataError / DataFileNotFoundError for bad input (truncation and
    train_on names are checked by the Rust binding), OutputError when the output cannot be written; nothing
    is left behind either way.
    """
    started = time.perf_counter()
    if isinstance(shard, str):
        shard = parse_shard(shard)
    if max_length is not None and max_length < 1:
        raise DataError(f"max length must be positive, got {max_length}")
    if max_line_bytes < 1:
        raise DataError(f"max line bytes must be positive, got {max_line_bytes}")
    if pack and max_length is None:
        raise DataError("packing needs --max-length (the length of a packed row)")
    encoder = ConversationEncoder(
        tokenizer, template, train_on=train_on, special_tokens_in_content=special_tokens_in_content
    )
    note = encoder.template_note()
    if note:
        print(f"nibblora.prepare: {note}", file=sys.stderr)
    out_dir = Path(output)
    input_paths = [Path(x) for x in inputs if not isinstance(x, dict)]
    check_out_dir(out_dir, overwrite, input_paths, DataError)
    tmp = temp_sibling(out_dir)
    try:
        sources = _sources(inputs, tmp)
        stats = _run(
            encoder, sources, tmp, max_length, truncation, pack, shard, skip_bad_lines, progress, max_line_bytes
        )
        for scratch in tmp.glob("_input_*.jsonl"):
            scratch.unlink()
        summary = PrepareSummary(
            out_dir=out_dir,
            packed=pack,
            seconds=time.perf_counter() - started,
            shard=shard,
            **{
                k: stats[k]
                for k in (
                    "rows_in",
                    "documents",
                    "rows_out",
                    "tokens",
                    "supervised_tokens",
                    "truncated",
                    "dropped_too_long",
                    "dropped_no_supervised",
                    "skipped_bad_lines",
                )
            },
        )
        metadata = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "created_by": f"nibblora {__version__}",
            "packed": pack,
            "max_length": max_length,
            "rows": summary.rows_out,
            "documents": summary.documents,
            "tokens": summary.tokens,
            "supervised_tokens": summary.supervised_tokens,
            "tokenizer": {
                "path": str(encoder.tokenizer_files.tokenizer_json),
                "sha256": encoder.tokenizer_files.sha256,
            },
            "template": {
                "origin": encoder.template.origin,
                "sha256": encoder.template.sha256,
                "source": encoder.template.source,
            },
            "policies": {
                "train_on": train_on,
                "truncation": truncation,
                "special_tokens_in_content": special_tokens_in_content,
            },
            "shard": list(shard),
            "counts": {k: v for k, v in stats.items() if k != "bytes_read"},
            "inputs": [str(p) for p in input_paths] or ["<rows>"],
        }
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.seconds = time.perf_counter() - started
    return summary


def _run(encoder, sources, tmp, max_length, truncation, pack, shard, skip_bad_lines, progress, max_line_bytes) -> dict:
    from tqdm.auto import tqdm

    by_bytes = all(s[0] == "jsonl" for s in sources)
    total = sum(Path(s[1]).stat().st_size for s in sources) if by_bytes else sum(len(s[2]) for s in sources)
    bar = tqdm(
        total=total,
        desc="preparing",
        unit="B" if by_bytes else "row",
        unit_scale=True,
        unit_divisor=1024 if by_bytes else 1000,
        disable=not progress,
    )

    def report(stats: dict) -> None:
        bar.update((stats["bytes_read"] if by_bytes else stats["rows_in"]) - bar.n)
        bar.set_postfix(rows=stats["rows_in"], tokens=stats["tokens"], refresh=False)

    try:
        return encoder._native.prepare(
            sources,
            str(tmp),
            max_length=max_length,
            truncation=truncation,
            pack=pack,
            shard=tuple(shard),
            skip_bad_lines=skip_bad_lines,
            progress=report,
            max_line_bytes=max_line_bytes,
        )
    finally:
        bar.close()
