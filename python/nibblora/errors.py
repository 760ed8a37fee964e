"""nibblora's exceptions: one small hierarchy, exported from `nibblora`, raised by Python code and by the Rust core.

    NibbloraError                      every error nibblora raises on purpose
    ├── InputError (ValueError)        the user's input is wrong: the CLIs print one line and exit 2
    │   ├── CheckpointError            a model / adapter / checkpoint file is missing, corrupt or inconsistent
    │   │   ├── CheckpointFileNotFoundError (FileNotFoundError)
    │   │   ├── MissingTensorError (KeyError)
    │   │   ├── UnsupportedModelError  config.json describes a model nibblora cannot build
    │   │   └── AdapterError           an adapter folder (peft format) is wrong for this model or malformed
    │   ├── DataError                  a dataset row, template or tokenizer is wrong
    │   │   └── DataFileNotFoundError (FileNotFoundError)
    │   ├── ConfigError                a training / tool config value is wrong; the message names the key
    │   ├── ExportError                an offline tool (quantize, merge, verify) was given bad input or options
    │   └── RunStoreError              a run's runs.sqlite is damaged or not a run store
    └── OutputError (OSError)          writing an output failed (disk full, permissions): nothing was kept

The Rust core's errors arrive as these classes too (rust/python/src/errors.rs maps each kind in one place).
Every message starts with the phase that failed and names the file, tensor, key or row it is about.
"""

from __future__ import annotations


class NibbloraError(Exception):
    """Base of every error nibblora raises on purpose; catch it to handle them all."""


class InputError(NibbloraError, ValueError):
    """Bad input (a file, a config value, an option): nothing was written; the CLIs report it as one line, exit 2."""


class CheckpointError(InputError):
    """A checkpoint file is missing, unreadable or inconsistent. The message names the file or tensor."""


class CheckpointFileNotFoundError(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs (config.json, a weights file, a shard) does not exist."""


class MissingTensorError(CheckpointError, KeyError):
    """The checkpoint lacks a tensor the model needs."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(CheckpointError):
    """config.json describes a model nibblora cannot build (another family, or not a causal LM)."""


class AdapterError(CheckpointError):
    """An adapter folder is malformed, of an unsupported kind, or does not fit the model it is applied to."""


class DataError(InputError):
    """Bad data input: a malformed row, an unknown role, a template that fails, an option that makes no sense."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A tokenizer, template or input file that does not exist."""


class ConfigError(InputError):
    """A config file, config value or --set override is wrong; the message names the key."""


class ExportError(InputError):
    """A problem with an offline tool's input (files, config, options): reported as one line, exit code 2."""


class RunStoreError(InputError):
    """A runs.sqlite that cannot be read or written: damaged, or not a nibblora run store. `path` is the file,
    `reason` says what is wrong in words; `transient` is True when it is probably being created or briefly locked
    (read it again before reporting)."""

    def __init__(self, path, reason: str, *, transient: bool = False, phase: str = "reading runs"):
        super().__init__(f"{phase}: {path}: {reason}")
        self.path = path
        self.reason = reason
        self.transient = transient


class OutputError(NibbloraError, OSError):
    """An output could not be written (disk full, permission denied); the message names the folder, and nothing
    partial was left behind."""


__all__ = [
    "AdapterError",
    "CheckpointError",
    "CheckpointFileNotFoundError",
    "ConfigError",
    "DataError",
    "DataFileNotFoundError",
    "ExportError",
    "InputError",
    "MissingTensorError",
    "NibbloraError",
    "OutputError",
    "RunStoreError",
    "UnsupportedModelError",
]
