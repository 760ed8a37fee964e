"""`python -m nibblora.merge`: merge peft LoRA adapters into a Hugging Face checkpoint, streaming, in Rust.

    from nibblora.merge import merge_checkpoint
    summary = merge_checkpoint("Llama-3.2-1B", ["my-adapter"], "Llama-3.2-1B-merged")   # MergeSummary
    print(summary.format())

The output equals peft's `merge_and_unload()` + `save_pretrained()` bit for bit in float32 (and is rounded once,
not once per adapter, in 16-bit), in memory bounded by about two of the largest tensor.
"""

from nibblora._lazy import lazy_exports

# The tool (torch) loads with the first of these names used; `python -m` reads its arguments first.
__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "MergeError": "nibblora.merge.adapter_source",
        "read_adapter": "nibblora.merge.adapter_source",
        "main": "nibblora.merge.cli",
        "METHODS": "nibblora.merge.methods",
        "combine": "nibblora.merge.methods",
        "MergeSummary": "nibblora.merge.tool",
        "QuantReportRow": "nibblora.merge.tool",
        "merge_checkpoint": "nibblora.merge.tool",
    },
)

__all__ = [
    "METHODS",
    "MergeError",
    "MergeSummary",
    "QuantReportRow",
    "combine",
    "main",
    "merge_checkpoint",
    "read_adapter",
]
