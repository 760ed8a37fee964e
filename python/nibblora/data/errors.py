"""Errors of nibblora.data: problems with the user's input, reported as one line by the CLI (exit code 2)."""


from nibblora.errors import DataError, DataFileNotFoundError


def reraise_native(err: Exception) -> DataError:
    """The DataError for an exception from the Rust core (ValueError, FileNotFoundError or OSError)."""
    if isinstance(err, FileNotFoundError):
        return DataFileNotFoundError(str(err))
    return DataError(str(err))
