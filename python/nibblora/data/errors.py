"""Errors of nibblora.data: problems with the user's input, reported as one line by the CLI (exit code 2)."""


class DataError(ValueError):
    """Bad input: a malformed row, an unknown role, a template that fails, an option that makes no sense."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A tokenizer, template or input file that does not exist."""


def reraise_native(err: Exception) -> DataError:
    """The DataError for an exception from the Rust core (ValueError, FileNotFoundError or OSError)."""
    if isinstance(err, FileNotFoundError):
        return DataFileNotFoundError(str(err))
    return DataError(str(err))
