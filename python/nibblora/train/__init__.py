"""Supervised fine-tuning: full, LoRA and QLoRA, in one explicit loop (`python -m nibblora.train CONFIG.toml`).

    from nibblora.train import load_config, train
    result = train(load_config("qlora.toml", overrides=["train.max_steps=100"]))
    result.losses, result.eval, result.weights_dir

Each run records itself in <output_dir>/runs.sqlite (see nibblora.runs) and checkpoints to
<output_dir>/checkpoints/; running the same config again resumes from the newest checkpoint.
"""

from nibblora._lazy import lazy_exports
from nibblora.train.config import ConfigError, TrainConfig, config_from_dict, load_config

# torch loads with the first heavy name used (tests/test_startup.py holds it).
__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "TokenizedRows": "nibblora.train.data",
        "open_dataset": "nibblora.train.data",
        "pad_collate": "nibblora.train.data",
        "step_micro_batches": "nibblora.train.data",
        "TrainResult": "nibblora.train.loop",
        "build_model": "nibblora.train.loop",
        "evaluate": "nibblora.train.loop",
        "token_loss_sum": "nibblora.train.loop",
        "train": "nibblora.train.loop",
        "PagedOptimizerStates": "nibblora.train.optim",
        "build_optimizer": "nibblora.train.optim",
        "build_scheduler": "nibblora.train.optim",
        "lr_multiplier": "nibblora.train.optim",
    },
)

__all__ = [
    "ConfigError",
    "PagedOptimizerStates",
    "TokenizedRows",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "config_from_dict",
    "evaluate",
    "load_config",
    "lr_multiplier",
    "open_dataset",
    "pad_collate",
    "step_micro_batches",
    "token_loss_sum",
    "train",
]
