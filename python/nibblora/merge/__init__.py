"""`python -m nibblora.merge`: merge peft LoRA adapters into a Hugging Face checkpoint, streaming, in Rust.

    from nibblora.merge import merge_checkpoint
    summary = merge_checkpoint("Llama-3.2-1B", ["my-adapter"], "Llama-3.2-1B-merged")   # MergeSummary
    print(summary.format())

The output equals peft's `merge_and_unload()` + `save_pretrained()` bit for bit in float32 (and is rounded once,
not once per adapter, in 16-bit), in memory bounded by about two of the largest tensor.
"""

from nibblora.merge.adapter_source import MergeError, read_adapter
from nibblora.merge.cli import main
from nibblora.merge.methods import METHODS, combine
from nibblora.merge.tool import MergeSummary, QuantReportRow, merge_checkpoint

__all__ = ["METHODS", "MergeError", "MergeSummary", "QuantReportRow", "combine", "main", "merge_checkpoint", "read_adapter"]
