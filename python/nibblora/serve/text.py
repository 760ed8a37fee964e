"""Text in and out for the server: prompts to token ids (Hugging Face tokenizers), chat messages rendered with
the model's own chat template by nibblora.data's Rust renderer, token ids back to text."""

from __future__ import annotations

import threading
from pathlib import Path

from nibblora.errors import DataError, InputError


class TextCodec:
    """The tokenizer of a model folder (tokenizer.json) and, on first chat request, its chat template."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"loading tokenizer: {path} does not exist; the server needs the model's tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(path))
        self._chat = None
        self._chat_lock = threading.Lock()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _encoder(self):
        from nibblora.data import ConversationEncoder

        with self._chat_lock:
            if self._chat is None:
                try:
                    encoder = ConversationEncoder(self.folder)
                except DataError as err:
                    raise InputError(
                        f"messages: this model has no usable chat template ({err}); use "
                        "/v1/completions with a prompt instead"
                    ) from None
                if encoder.template.source is None:
                    raise InputError(
                        f"messages: {self.folder} has no chat template (no chat_template.jinja, none "
                        "in tokenizer_config.json); use /v1/completions with a prompt instead"
                    )
                self._chat = encoder
            return self._chat

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render with the tokenizer's chat template, then tokenize without adding special tokens (BOS/EOS
        come from the template only)."""
        encoder = self._encoder()
        try:
            text = encoder.render(messages, add_generation_prompt=add_generation_prompt)
        except DataError as err:
            raise InputError(f"messages: the chat template could not render them ({err})") from None
        return self.encode(text, add_special_tokens=False)
