"""Task presets: what a manifest row must hold, default t0 list, repeats, samples and metrics.

Each task lives in its own small module (`tasks.synthesis`, `tasks.editing`,
`tasks.compositing`, `tasks.augmentation`) that declares a module-level `PRESET`. `sdedit run
--task NAME` (or a manifest's `task` column) picks these defaults; explicit flags win.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

Metric = Literal["l2_to_guide", "change_outside_mask"]

# task name -> module declaring its PRESET; one registry, no if/elif chains elsewhere.
TASK_MODULES = {
    "synthesis": "tasks.synthesis",
    "editing": "tasks.editing",
    "compositing": "tasks.compositing",
    "augmentation": "tasks.augmentation",
}


@dataclass(frozen=True)
class Preset:
    """Defaults and expectations for one task.

    `t0` values lie in (0, 1]; `requires_mask` means every manifest row must carry a `mask`
    URI (white = synthesize, black = keep the guide exactly).
    """

    name: str
    t0: tuple[float, ...]
    repeats: int
    samples: int
    requires_mask: bool
    metrics: tuple[Metric, ...] = ("l2_to_guide",)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.t0 or not all(0.0 < t <= 1.0 for t in self.t0):
            raise ValueError(f"preset {self.name!r}: t0 values must lie in (0, 1], got {self.t0}")
        if self.repeats < 1 or self.samples < 1:
            raise ValueError(f"preset {self.name!r}: repeats and samples must be >= 1")

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Manifest columns every row of this task must have."""
        return ("id", "guide", "mask") if self.requires_mask else ("id", "guide")


def task_names() -> tuple[str, ...]:
    """Names accepted by `get_preset`, in a stable order."""
    return tuple(TASK_MODULES)


def get_preset(name: str) -> Preset:
    """The preset registered under `name`; raises ValueError naming the known tasks."""
    if name not in TASK_MODULES:
        known = ", ".join(TASK_MODULES)
        raise ValueError(f"unknown task {name!r}; known tasks: {known}")
    return importlib.import_module(TASK_MODULES[name]).PRESET
