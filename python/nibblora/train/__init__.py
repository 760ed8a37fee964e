"""Supervised fine-tuning: full, LoRA and QLoRA, in one explicit loop (`python -m nibblora.train CONFIG.toml`).

    from nibblora.train import load_config, train
    result = train(load_config("qlora.toml", overrides=["train.max_steps=100"]))
    result.losses, result.eval, result.weights_dir

Each run records itself in <output_dir>/runs.sqlite (see nibblora.runs) and checkpoints to
<output_dir>/checkpoints/; running the same config again resumes from the newest checkpoint.
"""

from nibblora.train.config import ConfigError, TrainConfig, config_from_dict, load_config
from nibblora.train.data import TokenizedRows, open_dataset, pad_collate, step_micro_batches
from nibblora.train.loop import TrainResult, build_model, evaluate, token_loss_sum, train
from nibblora.train.optim import PagedOptimizerStates, build_optimizer, build_scheduler, lr_multiplier

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
