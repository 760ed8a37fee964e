"""Finding the tokenizer, the chat template and its special-token variables, as transformers would.

transformers reads `tokenizer.json`, takes the chat template from `chat_template.jinja` or
`tokenizer_config.json["chat_template"]`, and passes the tokenizer's special tokens (bos_token, eos_token, ...)
to the template as variables.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from nibblora import _native
from nibblora.errors import DataError, DataFileNotFoundError

TEMPLATE_NAMES: tuple[str, ...] = tuple(_native.TEMPLATE_NAMES)
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# BOS / EOS a named format uses when the tokenizer's config names none.
_NAMED_DEFAULTS = {"llama-2": ("<s>", "</s>"), "mistral": ("<s>", "</s>"), "alpaca": (None, "</s>")}


@dataclass(frozen=True)
class TokenizerFiles:
    """tokenizer.json and what tokenizer_config.json says about special tokens and the chat template."""

    tokenizer_json: Path
    config: dict
    folder: Path

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.tokenizer_json.read_bytes()).hexdigest()

    def special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, ... as strings (tokenizer_config stores them as strings or {"content": ...})."""
        out = {}
        for key in _SPECIAL_TOKEN_KEYS:
            value = self.config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
        return out


def find_tokenizer(path: str | Path) -> TokenizerFiles:
    """A tokenizer folder (with tokenizer.json, maybe tokenizer_config.json) or a tokenizer.json file."""
    path = Path(path)
    if path.is_dir():
        folder, tokenizer_json = path, path / "tokenizer.json"
    else:
        folder, tokenizer_json = path.parent, path
    if not tokenizer_json.is_file():
        raise DataFileNotFoundError(
            f"{tokenizer_json}: no tokenizer.json (pass --tokenizer a folder holding one, or the file itself; "
            "a SentencePiece .model must be converted first, see scripts/convert_sentencepiece.py)"
        )
    config_path = folder / "tokenizer_config.json"
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{config_path}: not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise DataError(f"{config_path}: not a JSON object")
    return TokenizerFiles(tokenizer_json, config, folder)


@dataclass(frozen=True)
class TemplateChoice:
    """The Jinja source to render with, where it came from, and the variables it sees."""

    source: str | None
    origin: str  # "chatml", "path/to/chat_template.jinja", "tokenizer_config.json", "string", "none"
    variables: dict[str, str]

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.source.encode()).hexdigest() if self.source is not None else None


def _template_from_config(config: dict, where: str) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise DataError(f"{where}: chat_template is not a string")
    return template


def choose_template(spec: str | None, tokenizer: TokenizerFiles) -> TemplateChoice:
    """Resolve --template: a name (chatml, llama-2, llama-3, mistral, alpaca), a .jinja file, a
    tokenizer_config.json, a Jinja string, or None / "auto" for the template shipped with the tokenizer."""
    variables = tokenizer.special_tokens()
    if spec is None or spec == "auto":
        jinja = tokenizer.folder / "chat_template.jinja"
        if jinja.is_file():
            return TemplateChoice(jinja.read_text(encoding="utf-8"), str(jinja), variables)
        source = _template_from_config(tokenizer.config, "tokenizer_config.json")
        return TemplateChoice(source, "tokenizer_config.json" if source else "none", variables)
    named = _native.named_template_source(spec)
    if named is not None:
        name = (
            spec.lower().replace("_", "-").replace(".", "-").replace("llama2", "llama-2").replace("llama3", "llama-3")
        )
        bos, eos = _NAMED_DEFAULTS.get(name, (None, None))
        if bos and "bos_token" not in variables:
            variables["bos_token"] = bos
        if eos and "eos_token" not in variables:
            variables["eos_token"] = eos
        return TemplateChoice(named, name, variables)
    if "{{" in spec or "{%" in spec:
        return TemplateChoice(spec, "string", variables)
    path = Path(spec)
    if not path.is_file():
        raise DataFileNotFoundError(
            f"template {spec!r} is neither a known name ({', '.join(TEMPLATE_NAMES)}) nor a file"
        )
    if path.suffix == ".json":
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        source = _template_from_config(config if isinstance(config, dict) else {}, str(path))
        if source is None:
            raise DataError(f"{path}: holds no chat_template")
        return TemplateChoice(source, str(path), variables)
    return TemplateChoice(path.read_text(encoding="utf-8"), str(path), variables)
