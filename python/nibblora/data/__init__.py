"""nibblora.data: supervised fine-tuning data, prepared in Rust.

    from nibblora.data import prepare_dataset, PreparedDataset, collate_padded
    summary = prepare_dataset(["chats.jsonl"], "prepared", tokenizer="path/to/model", template="chatml",
                              max_length=4096, pack=True)
    ds = PreparedDataset("prepared")          # ds[i] -> {"input_ids", "labels", "position_ids", ...}
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate_padded)

Chat templates (named formats or any Hugging Face Jinja template) are rendered, tokenized and masked in one
pass per conversation, on all cores. `python -m nibblora.prepare` is the command line. See docs/data.md.
"""

from nibblora.data.collate import collate_packed, collate_padded
from nibblora.data.dataset import PreparedDataset, combine_shards, position_ids_for
from nibblora.data.encoder import IGNORE_INDEX, TRAIN_ON, ConversationEncoder
from nibblora.errors import DataError, DataFileNotFoundError
from nibblora.data.prepare import TRUNCATION, PrepareSummary, parse_shard, prepare_dataset
from nibblora.data.sources import TEMPLATE_NAMES

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
