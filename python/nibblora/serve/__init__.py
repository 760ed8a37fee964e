"""nibblora.serve: one base model, many LoRA adapters in the same batch, behind an OpenAI-compatible server.

    from nibblora.serve import Engine, EngineConfig, SamplingParams
    engine = Engine(load_model("base"), EngineConfig(max_loras=8, max_cpu_loras=64))
    engine.add_adapter("sql", "adapters/sql")
    [result] = engine.generate([prompt_ids], SamplingParams(max_tokens=32, temperature=0), adapters=["sql"])

`python -m nibblora.serve --model DIR --adapter sql=adapters/sql` starts the HTTP server. See docs/serving.md.
"""

from nibblora.serve.adapter_files import AdapterWeights, LoRAModuleWeights, read_lora_folder
from nibblora.serve.adapter_store import AdapterRef, AdapterStore
from nibblora.serve.engine import Engine, EngineConfig, GenerationResult, UnknownAdapterError
from nibblora.serve.sampling import SamplingParams
from nibblora.serve.sequence import RequestOutput

__all__ = [
    "AdapterRef",
    "AdapterStore",
    "AdapterWeights",
    "Engine",
    "EngineConfig",
    "GenerationResult",
    "LoRAModuleWeights",
    "RequestOutput",
    "SamplingParams",
    "UnknownAdapterError",
    "read_lora_folder",
]
