"""nibblora.data: supervised fine-tuning data, prepared in Rust.

    from nibblora.data import prepare_dataset, PreparedDataset, collate_padded
    summary = prepare_dataset(["chats.jsonl"], "prepared", tokenizer="path/to/model", template="chatml",
                              max_length=4096, pack=True)
    ds = PreparedDataset("prepared")          # ds[i] -> {"input_ids", "labels", "position_ids", ...}
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate_padded)

Chat templates (named formats or any Hugging Face Jinja template) are rendered, tokenized and masked in one
pass per conversation, on all cores. `python -m nibblora.prepare` is the command line. See docs/data.md.
"""

from nibblora._lazy import lazy_exports
from nibblora.data.sources import TEMPLATE_NAMES
from nibblora.errors import DataError, DataFileNotFoundError

# torch loads with the first heavy name used (tests/test_startup.py holds it).
__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "collate_packed": "nibblora.data.collate",
        "collate_padded": "nibblora.data.collate",
        "PreparedDataset": "nibblora.data.dataset",
        "combine_shards": "nibblora.data.dataset",
        "position_ids_for": "nibblora.data.dataset",
        "IGNORE_INDEX": "nibblora.data.encoder",
        "TRAIN_ON": "nibblora.data.encoder",
        "ConversationEncoder": "nibblora.data.encoder",
        "TRUNCATION": "nibblora.data.prepare",
        "PrepareSummary": "nibblora.data.prepare",
        "parse_shard": "nibblora.data.prepare",
        "prepare_dataset": "nibblora.data.prepare",
    },
)

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATE_NAMES",
    "TRAIN_ON",
    "TRUNCATION",
    "ConversationEncoder",
    "DataError",
    "DataFileNotFoundError",
    "PrepareSummary",
    "PreparedDataset",
    "collate_packed",
    "collate_padded",
    "combine_shards",
    "parse_shard",
    "position_ids_for",
    "prepare_dataset",
]
