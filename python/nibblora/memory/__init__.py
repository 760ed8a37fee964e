"""Training-memory estimates by component (`python -m nibblora.memory` prints the 1B/7B/13B/70B table).

from nibblora.memory import estimate_memory
print(estimate_memory("path/to/config.json", "qlora", r=64, batch_size=4, seq_len=1024).format())
print(estimate_method_memory("llama-2-7b", "ia3").format())   # dora, ia3, prompt, prefix, adapter (methods.py)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nibblora._lazy import lazy_exports
from nibblora.memory.estimate import (
    COMPONENTS,
    DTYPE_BYTES,
    MemoryEstimate,
    activation_bytes,
    estimate_memory,
    lesson_table,
)
from nibblora.memory.methods import METHOD_MODES, estimate_method_memory, method_trainable_params

if TYPE_CHECKING:
    from nibblora.memory.measure import MemoryMeter

# MemoryMeter reads torch.cuda and psutil; the estimates and the CLI need neither.
__getattr__, __dir__ = lazy_exports(__name__, globals(), {"MemoryMeter": "nibblora.memory.measure"})

__all__ = [
    "COMPONENTS",
    "DTYPE_BYTES",
    "METHOD_MODES",
    "MemoryEstimate",
    "MemoryMeter",
    "activation_bytes",
    "estimate_memory",
    "estimate_method_memory",
    "lesson_table",
    "main",
    "method_trainable_params",
]


def main(argv=None) -> int:
    from nibblora.memory.cli import main as cli_main

    return cli_main(argv)
