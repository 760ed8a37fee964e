"""nibblora.serve: one base model, many LoRA adapters in the same batch, behind an OpenAI-compatible server.

    from nibblora.serve import Engine, EngineConfig, SamplingParams
    engine = Engine(load_model("base"), EngineConfig(max_loras=8, max_cpu_loras=64))
    engine.add_adapter("sql", "adapters/sql")
    [result] = engine.generate([prompt_ids], SamplingParams(max_tokens=32, temperature=0), adapters=["sql"])

`python -m nibblora.serve --model DIR --adapter sql=adapters/sql` starts the HTTP server. See docs/serving.md.
"""

from nibblora._lazy import lazy_exports

# Heavy (torch) names load on first use, so the dashboard can read servers' metrics without importing torch.
__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "AdapterWeights": "nibblora.serve.adapter_files",
        "LoRAModuleWeights": "nibblora.serve.adapter_files",
        "read_lora_folder": "nibblora.serve.adapter_files",
        "AdapterRef": "nibblora.serve.adapter_store",
        "AdapterStore": "nibblora.serve.adapter_store",
        "Engine": "nibblora.serve.engine",
        "EngineConfig": "nibblora.serve.engine",
        "GenerationResult": "nibblora.serve.engine",
        "UnknownAdapterError": "nibblora.serve.engine",
        "SamplingParams": "nibblora.serve.sampling",
        "RequestOutput": "nibblora.serve.sequence",
    },
)

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
