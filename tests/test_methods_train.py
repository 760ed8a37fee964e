"""train.mode = dora | ia3 | prompt | prefix | adapter: the trainer injects the method from its section, the loss
falls, the exported folder loads with nibblora.methods.load_adapter, and a run resumes from its checkpoint."""

import pytest
import torch
from helpers_train import tiny_checkpoint, tiny_config, tiny_rows

from nibblora.errors import ConfigError
from nibblora.methods import load_adapter, method_of
from nibblora.models import load_model
from nibblora.train import train
from nibblora.train.config import config_from_dict

SECTIONS = {
    "dora": {},
    "ia3": {"ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"]}},
    "prompt": {"prompt": {"num_virtual_tokens": 4, "init": "sample_vocab"}},
    "prefix": {"prefix": {"num_virtual_tokens": 4, "projection_hidden": 16}},
    "adapter": {"adapter": {"variant": "pfeiffer", "bottleneck_size": 8}},
}
KIND = {"dora": "DORA", "ia3": "IA3", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "adapter": "BOTTLENECK"}


def _rows_loss(model, rows) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(rows)):
            row = rows[i]
            ids = torch.as_tensor(row["input_ids"]).view(1, -1)
            loss_sum, n = model(ids, labels=torch.as_tensor(row["labels"]).view(1, -1))
            total, count = total + float(loss_sum), count + n
    return total / count


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


@pytest.mark.parametrize("mode", sorted(SECTIONS))
def test_trains_exports_and_resumes(model_dir, tmp_path, mode):
    rows = tiny_rows(16)
    lr = {"ia3": 0.1, "prompt": 0.1, "prefix": 0.05}.get(mode, 2e-2)
    config = tiny_config(model_dir, tmp_path / "run", train={"mode": mode, "lr": lr, "max_steps": 4}, **SECTIONS[mode])
    result = train(config, train_dataset=rows)
    assert result.step == 4
    model = load_model(model_dir)
    before = _rows_loss(model, rows)
    load_adapter(model, result.weights_dir)
    assert method_of(model) == KIND[mode]
    assert _rows_loss(model, rows) < before  # the exported adapter learned something
    # The export ships the method's own files only; the resume copy of every trainable tensor stays in checkpoints.
    assert not (result.weights_dir / "trainable.safetensors").exists()
    assert list((tmp_path / "run" / "checkpoints").rglob("trainable.safetensors"))
    more = tiny_config(model_dir, tmp_path / "run", train={"mode": mode, "lr": lr, "max_steps": 6}, **SECTIONS[mode])
    resumed = train(more, train_dataset=rows)
    assert resumed.step == 6 and set(resumed.losses) == {5, 6}


def test_bad_combinations_name_the_key(model_dir, tmp_path):
    base = {"output_dir": str(tmp_path), "model": {"path": str(model_dir)}}
    with pytest.raises(ConfigError, match="^model.load_in_4bit: full fine-tuning"):
        config_from_dict({**base, "model": {"path": str(model_dir), "load_in_4bit": True}, "train": {"mode": "full"}})
    with pytest.raises(ConfigError, match="^prompt.init_token_ids: prompt.init = 'text' needs"):
        config_from_dict({**base, "train": {"mode": "prompt"}, "prompt": {"init": "text"}})
    with pytest.raises(ConfigError, match="^ia3.feedforward_modules"):
        config_from_dict({**base, "train": {"mode": "ia3"}, "ia3": {"target_modules": ["k_proj"]}})
    with pytest.raises(ConfigError, match=r"^prompt.init_token_ids: \[-1\] are not token ids"):
        config_from_dict({**base, "train": {"mode": "prompt"}, "prompt": {"init_token_ids": [-1]}})
    with pytest.raises(ConfigError, match="train.mode"):
        config_from_dict({**base, "train": {"mode": "adalora"}})
