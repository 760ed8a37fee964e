"""One conversation at a time: render, tokenize, mask. The whole-dataset path is `prepare_dataset`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nibblora import _native
from nibblora.data.sources import TEMPLATE_NAMES, TemplateChoice, TokenizerFiles, choose_template, find_tokenizer
from nibblora.errors import DataError

if TYPE_CHECKING:
    import torch

TRAIN_ON = ("assistant", "all", "last")
IGNORE_INDEX = -100
# Conversations on which a named template is compared with the tokenizer's own (template_note).
_PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ],
)


class ConversationEncoder:
    """A tokenizer + chat template + policies, compiled once in Rust.

    tokenizer: a folder with tokenizer.json (and tokenizer_config.json) or the file. template: a name
    (chatml, llama-2, llama-3, mistral, alpaca), a .jinja / tokenizer_config.json file, a Jinja string, or
    None for the tokenizer's own. train_on: "assistant" (every assistant turn), "all", or "last".
    special_tokens_in_content: "text" (default: `<|im_end|>` typed in any string of a message, content,
    name or tool call, is plain text) or "special" (matched as the special token, as transformers does).
    Errors from the Rust core arrive as DataError / DataFileNotFoundError (nibblora.errors).
    """

    def __init__(
        self,
        tokenizer: str | Path,
        template: str | None = None,
        *,
        train_on: str = "assistant",
        special_tokens_in_content: str = "text",
    ) -> None:
        if special_tokens_in_content not in ("text", "special"):
            raise DataError("special_tokens_in_content must be 'text' or 'special'")
        self.tokenizer_files: TokenizerFiles = find_tokenizer(tokenizer)
        self.template: TemplateChoice = choose_template(template, self.tokenizer_files)
        self.train_on = train_on
        self.special_tokens_in_content = special_tokens_in_content
        self._native = _native.DataPipeline(
            str(self.tokenizer_files.tokenizer_json),
            self.template.source,
            list(self.template.variables.items()),
            train_on,  # converted (and checked: DataError) by the Rust binding
            special_tokens_in_content == "text",
            self.template.variables.get("eos_token"),
        )

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The text transformers' apply_chat_template(messages, tokenize=False) gives."""
        return self._native.render(json.dumps(messages), add_generation_prompt)[0]

    def loss_spans(self, messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
        """(start, end) character offsets of the rendered text the loss looks at (train_on "all": none listed)."""
        return self._native.render(json.dumps(messages), False)[1]

    def encode_arrays(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids uint32[n], loss_mask uint8[n]) of one row: {"messages"}, {"prompt", "completion"}, {"text"}."""
        return self._native.encode(json.dumps(row))

    def encode(self, row: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{"input_ids", "labels"}: int64[n] each, labels -100 where the loss must not look."""
        import torch  # only here: preparing data and the CLIs never need it

        ids, mask = self.encode_arrays(row)
        input_ids = torch.from_numpy(ids.astype(np.int64))
        labels = torch.where(torch.from_numpy(mask.astype(bool)), input_ids, IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels}

    def template_note(self) -> str | None:
        """One line for the user when a named template was chosen over the tokenizer's own chat template: which
        one is used, and whether the two render a conversation differently (which changes what is trained)."""
        if self.template.origin not in TEMPLATE_NAMES:
            return None
        own = choose_template(None, self.tokenizer_files)
        if own.source is None:
            return None
        head = (
            f"using the named template {self.template.origin!r}, not the tokenizer's own chat template ({own.origin})"
        )
        try:
            theirs = ConversationEncoder(
                self.tokenizer_files.tokenizer_json,
                own.source,
                train_on=self.train_on,
                special_tokens_in_content=self.special_tokens_in_content,
            )
            differs = [
                (self.render(m), self._trained_text(m)) != (theirs.render(m), theirs._trained_text(m))
                for m in _PROBE_CONVERSATIONS
            ]
        except DataError as err:
            return f"{head}; the tokenizer's own template could not be compared ({err})"
        if any(differs):
            return (
                f"{head}; the two render conversations differently, so different tokens are trained "
                "(omit --template to use the tokenizer's own)"
            )
        return f"{head}; both render the same text"

    def _trained_text(self, messages: list[dict[str, Any]]) -> list[str]:
        text = self.render(messages)
        return [text[a:b] for a, b in self.loss_spans(messages)]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`, as tokenizers.Tokenizer.encode(text, add_special_tokens).ids."""
        return self._native.tokenize(text, add_special_tokens)
