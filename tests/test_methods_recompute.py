"""Every method under gradient checkpointing: the same loss and the same gradients as without it."""

import pytest
import torch
from helpers_methods import IDS, nib_model

from nibblora.methods import (
    inject_bottleneck,
    inject_dora,
    inject_ia3,
    inject_prefix_tuning,
    inject_prompt_tuning,
    trainable_parameters,
)

INJECT = {
    "prompt": lambda m: inject_prompt_tuning(m, 4, seed=0),
    "prefix": lambda m: inject_prefix_tuning(m, 4, projection_hidden=8, seed=0),
    "ia3": lambda m: inject_ia3(m),
    "dora": lambda m: inject_dora(m, ["q_proj", "down_proj"], r=2),
    "bottleneck": lambda m: inject_bottleneck(m, "houlsby", 4),
}


def _loss_and_grads(model):
    model.zero_grad()
    loss_sum, n = model(IDS, labels=IDS)
    (loss_sum / n).backward()
    return float(loss_sum.detach()), {k: p.grad.clone() for k, p in trainable_parameters(model).items()}


@pytest.mark.parametrize("method", sorted(INJECT))
def test_gradient_checkpointing_changes_nothing(tmp_path, method):
    model = nib_model(tmp_path)
    INJECT[method](model)
    model.train()
    model.gradient_checkpointing_enable()
    loss, grads = _loss_and_grads(model)
    model.gradient_checkpointing_disable()
    plain_loss, plain_grads = _loss_and_grads(model)
    assert loss == plain_loss
    # (zero-initialised up-projections / lora_B leave their partners' first gradients at zero)
    assert any(g.abs().sum() > 0 for g in grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-5, atol=1e-7)
