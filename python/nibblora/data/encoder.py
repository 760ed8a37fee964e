"""One conversation at a time: render, tokenize, mask. The whole-dataset path is `prepare_dataset`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nibblora import _native
from nibblora.data.errors import DataError, reraise_native
from nibblora.data.sources import TemplateChoice, TokenizerFiles, choose_template, find_tokenizer

TRAIN_ON = ("assistant", "all", "last")
IGNORE_INDEX = -100


class ConversationEncoder:
    """A tokenizer + chat template + policies, compiled once in Rust.

    tokenizer: a folder with tokenizer.json (and tokenizer_config.json) or the file. template: a name
    (chatml, llama-2, llama-3, mistral, alpaca), a .jinja / tokenizer_config.json file, a Jinja string, or
    None for the tokenizer's own. train_on: "assistant" (every assistant turn), "all", or "last".
    special_tokens_in_content: "text" (default: `<|im_end|>` typed inside a message is plain text) or
    "special" (matched as the special token, as transformers does).
    """

    def __init__(
        self,
        tokenizer: str | Path,
        template: str | None = None,
        *,
        train_on: str = "assistant",
        special_tokens_in_content: str = "text",
    ) -> None:
        if train_on not in TRAIN_ON:
            raise DataError(f"train-on policy {train_on!r} is not known: use assistant, all or last")
        if special_tokens_in_content not in ("text", "special"):
            raise DataError("special_tokens_in_content must be 'text' or 'special'")
        self.tokenizer_files: TokenizerFiles = find_tokenizer(tokenizer)
        self.template: TemplateChoice = choose_template(template, self.tokenizer_files)
        self.train_on = train_on
        self.special_tokens_in_content = special_tokens_in_content
        try:
            self._native = _native.DataPipeline(
                str(self.tokenizer_files.tokenizer_json),
                self.template.source,
                list(self.template.variables.items()),
                train_on,
                special_tokens_in_content == "text",
                self.template.variables.get("eos_token"),
            )
        except (ValueError, OSError) as err:
            raise reraise_native(err) from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The text transformers' apply_chat_template(messages, tokenize=False) gives."""
        try:
            return self._native.render(json.dumps(messages), add_generation_prompt)[0]
        except ValueError as err:
            raise reraise_native(err) from None

    def loss_spans(self, messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
        """(start, end) character offsets of the rendered text the loss looks at (train_on "all": none listed)."""
        try:
            return self._native.render(json.dumps(messages), False)[1]
        except ValueError as err:
            raise reraise_native(err) from None

    def encode_arrays(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids uint32[n], loss_mask uint8[n]) of one row: {"messages"}, {"prompt", "completion"}, {"text"}."""
        try:
            return self._native.encode(json.dumps(row))
        except ValueError as err:
            raise reraise_native(err) from None

    def encode(self, row: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{"input_ids", "labels"}: int64[n] each, labels -100 where the loss must not look."""
        ids, mask = self.encode_arrays(row)
        input_ids = torch.from_numpy(ids.astype(np.int64))
        labels = torch.where(torch.from_numpy(mask.astype(bool)), input_ids, IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels}

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`, as tokenizers.Tokenizer.encode(text, add_special_tokens).ids."""
        return self._native.tokenize(text, add_special_tokens)
