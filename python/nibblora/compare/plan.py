"""What the comparison trains: every method at a few learning rates, then a LoRA rank sweep and full fine-tuning
with each forgetting mitigation at the best rates found. Torch-free (the CLI's --help reads it).

    plan = Plan.quick() / Plan.full()
    plan.sweep()                          # phase 1: [RunSpec] every method x its learning rates
    plan.follow_ups(best_lr)              # phase 2: rank sweep and mitigations, given {method: best lr}

Every run has the same token budget: `steps` optimizer steps of `batch_size` rows (a mitigation that mixes in
general text replaces a share of those rows, it does not add any).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# Each method's row: train.mode and its section's settings. LoRA-family rows share r 16, alpha 32 (scaling 2) on
# every linear layer, the demo's recipe; the rank sweep keeps alpha = 2 r, so the scaling stays 2.
METHODS: dict[str, dict[str, Any]] = {
    "full": {"train": {"mode": "full"}},
    "lora": {"train": {"mode": "lora"}},
    "qlora": {"train": {"mode": "qlora"}},
    "dora": {"train": {"mode": "dora"}},
    "ia3": {"train": {"mode": "ia3"}},
    "prompt": {"train": {"mode": "prompt"}, "prompt": {"num_virtual_tokens": 20, "init": "sample_vocab"}},
    "prefix": {"train": {"mode": "prefix"}, "prefix": {"num_virtual_tokens": 20}},
    "adapter": {"train": {"mode": "adapter"}, "adapter": {"variant": "houlsby", "bottleneck_size": 16}},
}
LORA_RECIPE = {"r": 16, "alpha": 32.0, "dropout": 0.05, "target_modules": "all-linear"}

# Learning rates per method, lowest first: about a factor of 3 apart around what works for the 1.1 M-parameter
# base (full fine-tuning wants the smallest steps; prompt and prefix vectors the largest).
LR_GRID: dict[str, tuple[float, ...]] = {
    "full": (1e-4, 3e-4, 1e-3),
    "lora": (1e-3, 3e-3, 1e-2),
    "qlora": (1e-3, 3e-3, 1e-2),
    "dora": (1e-3, 3e-3, 1e-2),
    "ia3": (3e-3, 1e-2, 3e-2),
    "prompt": (1e-2, 3e-2, 1e-1),
    "prefix": (3e-3, 1e-2, 3e-2),
    "adapter": (1e-3, 3e-3, 1e-2),
}
RANKS = (1, 2, 4, 8, 16, 64)
# Mitigations for full fine-tuning, each [section, key, value]: replay a quarter of every step's rows from the
# pretraining text; L2-SP and EWC pull the weights towards where they started (EWC weighted by a Fisher estimate
# normalized to mean 1, so both strengths are on one scale).
MITIGATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "full + general 25%": {"data": {"general_fraction": 0.25}},
    "full + l2sp 1": {"train": {"l2sp": 1.0}},
    "full + ewc 1": {"train": {"ewc": 1.0}},
}
GROUPS = ("method", "rank", "mitigation")


@dataclass(frozen=True)
class RunSpec:
    """One training run: the table row it may become, its method (a METHODS key) and learning rate, and the
    config sections it sets beyond the shared ones."""

    row: str
    method: str
    lr: float
    group: str = "method"  # method (the lr sweep), rank (LoRA rank sweep) or mitigation (full FT + a mitigation)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False, compare=False)

    @property
    def run_id(self) -> str:
        """A folder and run-store name: the row and the rate, e.g. "lora-r4-lr3e-03"."""
        return f"{re.sub(r'[^a-z0-9.]+', '-', self.row.lower()).strip('-')}-lr{self.lr:.0e}"

    @property
    def mode(self) -> str:
        return METHODS[self.method]["train"]["mode"]


@dataclass(frozen=True)
class Plan:
    """The runs and their shared budget."""

    steps: int
    batch_size: int
    lr_count: int  # learning rates per method: 1 (the middle of LR_GRID) or all of LR_GRID
    ranks: tuple[int, ...]
    mitigations: tuple[str, ...]
    methods: tuple[str, ...] = tuple(METHODS)
    eval_every: int = 25
    timing_rounds: int = 5  # interleaved base / variant generation timings per row (nibblora.compare.inference)

    @classmethod
    def quick(cls) -> Plan:
        """One learning rate per method (the middle of its grid), ranks 1 and 64 beside the lora row's 16, one
        strength per mitigation."""
        return cls(
            steps=60,
            batch_size=16,
            lr_count=1,
            ranks=(1, 16, 64),
            mitigations=("full + general 25%", "full + l2sp 1", "full + ewc 1"),
            eval_every=20,
            timing_rounds=7,
        )

    @classmethod
    def full(cls) -> Plan:
        return cls(
            steps=120,
            batch_size=16,
            lr_count=3,
            ranks=RANKS,
            mitigations=tuple(MITIGATIONS),
            eval_every=40,
            timing_rounds=9,
        )

    def learning_rates(self, method: str) -> tuple[float, ...]:
        """The whole grid, or its middle rate alone when lr_count is 1."""
        grid = LR_GRID[method]
        return grid if self.lr_count >= len(grid) else (grid[len(grid) // 2],)

    def sweep(self) -> list[RunSpec]:
        """Phase 1: every method at each of its learning rates (LoRA-family methods with LORA_RECIPE)."""
        return [
            RunSpec(method, method, lr, "method", self.method_settings(method))
            for method in self.methods
            for lr in self.learning_rates(method)
        ]

    def follow_ups(self, best_lr: dict[str, float]) -> list[RunSpec]:
        """Phase 2, at the best rates of phase 1: LoRA at each rank (alpha = 2 r; the rank the lora row already
        has is that row, not run again) and full fine-tuning with each mitigation."""
        runs = []
        if "lora" in best_lr:
            for r in self.ranks:
                if r == LORA_RECIPE["r"]:
                    continue
                settings = self.method_settings("lora")
                settings["lora"] = {**settings["lora"], "r": r, "alpha": 2.0 * r}
                runs.append(RunSpec(f"lora r{r}", "lora", best_lr["lora"], "rank", settings))
        if "full" in best_lr:
            for name in self.mitigations:
                settings = self.method_settings("full")
                for section, values in MITIGATIONS[name].items():
                    settings[section] = {**settings.get(section, {}), **values}
                runs.append(RunSpec(name, "full", best_lr["full"], "mitigation", settings))
        return runs

    def follow_up_count(self) -> int:
        ranks = sum(r != LORA_RECIPE["r"] for r in self.ranks) if "lora" in self.methods else 0
        return ranks + (len(self.mitigations) if "full" in self.methods else 0)

    def run_count(self) -> int:
        return len(self.sweep()) + self.follow_up_count()

    @staticmethod
    def method_settings(method: str) -> dict[str, dict[str, Any]]:
        settings = {section: dict(values) for section, values in METHODS[method].items()}
        if method in ("lora", "qlora", "dora"):
            settings["lora"] = dict(LORA_RECIPE)
        return settings
