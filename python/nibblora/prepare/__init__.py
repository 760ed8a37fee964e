"""`python -m nibblora.prepare`: chat / prompt-completion / text rows to a prepared-dataset folder.

The library function is nibblora.data.prepare_dataset; this is its command line.
"""

from nibblora.prepare.cli import main

__all__ = ["main"]
