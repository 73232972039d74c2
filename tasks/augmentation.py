"""Augmentation: real images re-imagined at small t0, several samples each, labels kept.

The guide is the photo itself; small t0 keeps layout and class while changing texture and
detail. This is the scheduled-job use: append rows to the manifest and rerun.
"""

from __future__ import annotations

from tasks.presets import Preset

PRESET = Preset(
    name="augmentation",
    t0=(0.15, 0.25, 0.35),
    repeats=1,
    samples=4,
    requires_mask=False,
    metrics=("l2_to_guide",),
    description="real image -> faithful variations (labels pass through)",
)
