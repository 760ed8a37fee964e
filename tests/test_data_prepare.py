"""prepare_dataset end to end: JSONL / Parquet / rows in, the prepared folder out, read back by PreparedDataset;
packing, truncation, drops, sharding, bad input, the CLI."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from helpers_data import CONVERSATIONS, byte_level_tokenizer

from nibblora.data import (
    ConversationEncoder,
    DataError,
    PreparedDataset,
    collate_packed,
    collate_padded,
    combine_shards,
    prepare_dataset,
)
from nibblora.prepare import main as prepare_main


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return byte_level_tokenizer(tmp_path_factory.mktemp("bytebpe"))


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    convs = list(CONVERSATIONS.values())
    rows = []
    for i in range(n):
        kind = i % 5
        if kind == 3:
            rows.append({"prompt": f"Question {i}: what is {i}+{i}?", "completion": f"It is {2 * i}."})
        elif kind == 4:
            rows.append({"text": f"Plain text number {i}. " * rng.randint(1, 6)})
        else:
            rows.append({"messages": rng.choice(convs[:3] + convs[4:])})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_rows_come_back_as_encoded(tok_dir, tmp_path):
    rows = _rows(60)
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    summary = prepare_dataset([src], tmp_path / "out", tokenizer=tok_dir, template="chatml")
    ds = PreparedDataset(tmp_path / "out")
    encoder = ConversationEncoder(tok_dir, "chatml")
    assert summary.rows_in == 60 and summary.rows_out == len(ds) == 60
    for i in (0, 3, 4, 59):
        expected = encoder.encode(rows[i])
        assert torch.equal(ds[i]["input_ids"], expected["input_ids"])
        assert torch.equal(ds[i]["labels"], expected["labels"])
    meta = ds.metadata
    assert meta["tokens"] == summary.tokens == len(ds.input_ids)
    assert meta["policies"]["train_on"] == "assistant" and len(meta["tokenizer"]["sha256"]) == 64
    assert ds.input_ids.dtype == np.uint32 and ds.row_offsets.dtype == np.uint64
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left


def test_rows_and_parquet_inputs_match_jsonl(tok_dir, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"messages": CONVERSATIONS[k]} for k in ("single_turn", "multi_turn", "unicode")] * 5
    _write_jsonl(tmp_path / "in.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    prepare_dataset([tmp_path / "in.jsonl"], tmp_path / "a", tokenizer=tok_dir, template="chatml")
    prepare_dataset([tmp_path / "in.parquet"], tmp_path / "b", tokenizer=tok_dir, template="chatml")
    prepare_dataset(rows, tmp_path / "c", tokenizer=tok_dir, template="chatml")
    a, b, c = (PreparedDataset(tmp_path / x) for x in "abc")
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.input_ids, c.input_ids)
    assert np.array_equal(a.loss_mask, c.loss_mask)


def test_packing_best_fit_positions_and_first_labels(tok_dir, tmp_path):
    rows = _rows(80, seed=1)
    plain = prepare_dataset(rows, tmp_path / "plain", tokenizer=tok_dir, template="chatml", max_length=96)
    packed = prepare_dataset(rows, tmp_path / "packed", tokenizer=tok_dir, template="chatml", max_length=96, pack=True)
    ds, flat = PreparedDataset(tmp_path / "packed"), PreparedDataset(tmp_path / "plain")
    assert packed.documents == plain.rows_out and packed.tokens == plain.tokens
    assert packed.rows_out == len(ds) < plain.rows_out
    total = sum(ds.row_length(i) for i in range(len(ds)))
    assert total == plain.tokens and all(ds.row_length(i) <= 96 for i in range(len(ds)))
    # Best fit decreasing: a row is opened only for a document no earlier row had room for (rooms only shrink).
    rooms = [96 - ds.row_length(i) for i in range(len(ds))]
    for j in range(1, len(ds)):
        assert max(rooms[:j]) < int(ds.document_lengths(j)[0])
    docs = sorted(tuple(flat.arrays(i)["input_ids"].tolist()) for i in range(len(flat)))
    seen = []
    for i in range(len(ds)):
        item = ds[i]
        lengths = item["document_lengths"].tolist()
        assert sum(lengths) == len(item["input_ids"])
        starts = np.cumsum([0] + lengths[:-1])
        assert (item["position_ids"][starts] == 0).all()
        assert (item["labels"][starts] == -100).all()
        for s, n in zip(starts, lengths):
            seen.append(tuple(item["input_ids"][s : s + n].tolist()))
            assert item["position_ids"][s + n - 1] == n - 1
    assert sorted(seen) == docs


def test_truncation_policies_and_drops(tok_dir, tmp_path):
    long = {"messages": CONVERSATIONS["multi_turn"]}
    user_only = {"messages": [{"role": "user", "content": "nothing to learn"}]}
    rows = [long, user_only, {"messages": CONVERSATIONS["single_turn"]}]
    keep = prepare_dataset(rows, tmp_path / "keep", tokenizer=tok_dir, template="chatml", max_length=40)
    assert keep.truncated == 1 and keep.dropped_no_supervised == 1 and keep.rows_out == 2
    assert max(PreparedDataset(tmp_path / "keep").row_length(i) for i in range(2)) == 40
    drop = prepare_dataset(
        rows, tmp_path / "drop", tokenizer=tok_dir, template="chatml", max_length=40, truncation="drop"
    )
    assert drop.dropped_too_long == 1 and drop.rows_out == 1
    with pytest.raises(DataError, match="row 0: row has .* tokens, more than the max length 40"):
        prepare_dataset(rows, tmp_path / "err", tokenizer=tok_dir, template="chatml", max_length=40, truncation="error")
    assert not (tmp_path / "err").exists() and not list(tmp_path.glob(".err.*"))


def test_malformed_line_names_file_and_line_or_is_skipped(tok_dir, tmp_path):
    good = json.dumps({"messages": CONVERSATIONS["single_turn"]})
    src = tmp_path / "bad.jsonl"
    src.write_text(f"{good}\n\n{good}\n{{not json\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:4: malformed JSON"):
        prepare_dataset([src], tmp_path / "out", tokenizer=tok_dir, template="chatml")
    assert not (tmp_path / "out").exists()
    summary = prepare_dataset([src], tmp_path / "out", tokenizer=tok_dir, template="chatml", skip_bad_lines=True)
    assert summary.skipped_bad_lines == 1 and summary.rows_out == 3


def test_bad_rows_are_reported_with_their_location(tok_dir, tmp_path):
    src = _write_jsonl(
        tmp_path / "x.jsonl",
        [{"messages": CONVERSATIONS["single_turn"]}, {"messages": [{"role": "robot", "content": "beep"}]}],
    )
    with pytest.raises(DataError, match=r'x\.jsonl:2: message 0 has unknown role "robot"'):
        prepare_dataset([src], tmp_path / "out", tokenizer=tok_dir, template="chatml")
    src2 = _write_jsonl(tmp_path / "y.jsonl", [{"messages": []}])
    with pytest.raises(DataError, match=r"y\.jsonl:1: the conversation is empty"):
        prepare_dataset([src2], tmp_path / "out", tokenizer=tok_dir, template="chatml")
    src3 = _write_jsonl(tmp_path / "z.jsonl", [{"messages": [{"role": "user", "content": "a"}]}] * 2)
    with pytest.raises(DataError, match=r"z\.jsonl:1: the chat template raised an exception: Conversation roles"):
        prepare_dataset(
            [src3],
            tmp_path / "out",
            tokenizer=tok_dir,
            template="{{ raise_exception('Conversation roles must alternate') }}",
        )
    with pytest.raises(DataError, match="no tokenizer.json"):
        prepare_dataset([src], tmp_path / "out", tokenizer=tmp_path / "nowhere", template="chatml")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_shards_partition_the_rows_and_combine(tok_dir, tmp_path):
    rows = _rows(41, seed=2)
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    full = prepare_dataset([src], tmp_path / "full", tokenizer=tok_dir, template="chatml")
    parts = [
        prepare_dataset([src], tmp_path / f"s{i}", tokenizer=tok_dir, template="chatml", shard=f"{i}/3")
        for i in range(3)
    ]
    assert [p.rows_in for p in parts] == [14, 14, 13] and sum(p.rows_out for p in parts) == full.rows_out
    combined = combine_shards([tmp_path / f"s{i}" for i in range(3)], tmp_path / "all")
    whole = PreparedDataset(tmp_path / "full")
    key = lambda ds: sorted(tuple(ds.arrays(i)["input_ids"].tolist()) for i in range(len(ds)))  # noqa: E731
    assert key(combined) == key(whole) and combined.metadata["tokens"] == full.tokens
    s1 = PreparedDataset(tmp_path / "s1")
    assert np.array_equal(combined.arrays(14)["input_ids"], s1.arrays(0)["input_ids"])
    prepare_dataset([src], tmp_path / "other", tokenizer=tok_dir, template="llama-3")
    with pytest.raises(DataError, match="template differs"):
        combine_shards([tmp_path / "s0", tmp_path / "other"], tmp_path / "mixed")


def test_collate_padded_and_packed(tok_dir, tmp_path):
    prepare_dataset(_rows(20), tmp_path / "p", tokenizer=tok_dir, template="chatml", max_length=128, pack=True)
    ds = PreparedDataset(tmp_path / "p")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_padded)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].dtype == torch.int64
    n0 = len(ds[0]["input_ids"])
    assert batch["attention_mask"][0].sum() == n0 and (batch["labels"][0, n0:] == -100).all()
    packed = collate_packed([ds[0], ds[1]])
    assert packed["input_ids"].shape == (1, len(ds[0]["input_ids"]) + len(ds[1]["input_ids"]))
    assert packed["cu_seqlens"][-1] == packed["input_ids"].shape[1]
    assert torch.equal(packed["position_ids"][0, :n0], ds[0]["position_ids"])


def test_cli_prints_table_and_exits_2_on_user_errors(tok_dir, tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", _rows(10))
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
            "--max-length",
            "64",
            "--pack",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "rows in" in out and "supervised" in out and "truncated" in out and "dropped" in out
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
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "exists and is not empty" in err
    rc = prepare_main(
        [
            "--tokenizer",
            str(tok_dir),
            "--template",
            "chatml",
            "--input",
            str(tmp_path / "no.jsonl"),
            "--output",
            str(tmp_path / "o2"),
            "--quiet",
        ]
    )
    assert rc == 2 and "input file does not exist" in capsys.readouterr().err
    rc = prepare_main(["--combine", str(tmp_path / "out"), "--output", str(tmp_path / "comb")])
    assert rc == 0 and len(PreparedDataset(tmp_path / "comb")) == len(PreparedDataset(tmp_path / "out"))
