"""Stable seeds: per-sample seeds derived from printable parts, the same in every process.

Torch-free, so code that only derives seeds (the pipeline's manifest expansion, on the driver
and in read tasks) does not import torch.
"""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, stable across processes (unlike `hash`)."""
    text = "\x1f".join(repr(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
