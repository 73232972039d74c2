"""Faithfulness of SDEdit outputs to their guides, by t0.

SDEdit (Meng et al. 2021, section 4) judges faithfulness by the L2 distance between output and
guide; small t0 keeps it small. For masked tasks the sampler keeps the guide exactly outside
the mask (section 3.3), so the change there must be 0. Both are computed from the decoded
outputs against the guide (and mask) resized to the output's resolution.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tasks.images import InputError, options_for
from tasks.outputs import (
    OutputFolder,
    decode_output,
    iter_shards,
    load_image,
    manifest_base,
    pixel_limit,
    read_summary,
    resolve_guide,
    row_label,
    to_unit,
)

LOSSLESS_FORMATS = ("png", "webp")  # pipeline.encode.ENCODERS writes WebP lossless


@dataclass(frozen=True)
class Faithfulness:
    """One output against its guide: L2 in [-1,1] units; outside-mask change if masked."""

    l2_to_guide: float
    change_outside_mask: float | None  # mean squared change over kept pixels, [-1,1] units
    max_change_outside_mask: int | None  # largest kept-pixel change, in 8-bit levels


def as_prepared(image: Image.Image, size: tuple[int, int],
                resample: Image.Resampling) -> Image.Image:
    """`image` centre-cropped to `size`'s shape and resized to it, as `tasks.images.fit` does
    for the pipeline (unchanged when it already has that size)."""
    from PIL import ImageOps

    return image if image.size == size else ImageOps.fit(image, size, method=resample)


def faithfulness(
    output: Image.Image, guide: Image.Image, mask: Image.Image | None = None
) -> Faithfulness:
    """L2 to the guide and, with a mask (white = synthesize), the change where it is black.

    Guide and mask are centre-cropped and resized to the output's size as the pipeline
    prepares them (bicubic, bilinear); "outside the mask" is where the prepared mask is 0,
    the pixels the sampler keeps exactly (a resized mask's grey edge is partly synthesized).
    Means run over pixels and RGB channels, in [-1, 1] units like the pipeline's L2.
    """
    guide = as_prepared(guide.convert("RGB"), output.size, Image.Resampling.BICUBIC)
    difference = to_unit(output) - to_unit(guide)
    l2 = float(np.mean(difference**2))
    if mask is None:
        return Faithfulness(l2, None, None)
    keep = np.asarray(as_prepared(mask.convert("L"), output.size,
                                  Image.Resampling.BILINEAR)) == 0
    if not keep.any():
        return Faithfulness(l2, 0.0, 0)
    kept = difference[keep]
    levels = np.abs(np.asarray(output, np.int16) - np.asarray(guide, np.int16))[keep]
    return Faithfulness(l2, float(np.mean(kept**2)), int(levels.max()))


def score_rows(folder: OutputFolder) -> tuple[list[dict], int]:
    """Per-output scores (id, t0, sample, format, reported and recomputed faithfulness).

    Returns the scores and how many outputs had no readable guide (they are not scored). An
    output whose image cannot be decoded is a ValueError naming it (id, t0, sample, shard).
    """
    summary = read_summary(folder)
    base, limit = manifest_base(folder, summary), pixel_limit(summary)
    scores, missing = [], 0
    for shard, table in iter_shards(folder):
        for row in table.to_pylist():
            score = score_row(folder, row, shard, base, limit)
            if score is None:
                missing += 1
            else:
                scores.append(score)
    return scores, missing


def score_row(folder: OutputFolder, row: dict, shard: str, base: str | None,
              limit: int) -> dict | None:
    """One output's scores (see `score_rows`), None when its guide or mask cannot be read."""
    guide_uri = resolve_guide(row.get("guide"), base)
    if guide_uri is None:
        return None
    mask_uri = resolve_guide(row.get("mask"), base)
    try:
        guide = load_image(guide_uri, folder.storage_options, "RGB", limit)
        mask = load_image(mask_uri, folder.storage_options, "L", limit) if mask_uri else None
    except InputError:
        return None
    score = faithfulness(decode_output(row["image"], row_label(row, shard)), guide, mask)
    return ({key: row.get(key) for key in ("id", "t0", "sample", "image_format", "l2_to_guide")}
            | {"recomputed": score})


def summarize_t0(scores: list[dict]) -> dict:
    """Aggregates for the outputs of one t0 value."""
    recomputed = [score["recomputed"] for score in scores]
    reported = [s["l2_to_guide"] for s in scores if s.get("l2_to_guide") is not None]
    masked = [r for r in recomputed if r.change_outside_mask is not None]
    formats = sorted({str(s.get("image_format") or "png").lower() for s in scores})
    return {
        "t0": scores[0]["t0"],
        "outputs": len(scores),
        "l2_to_guide": float(np.mean([r.l2_to_guide for r in recomputed])),
        "l2_to_guide_reported": float(np.mean(reported)) if reported else None,
        "masked_outputs": len(masked),
        "change_outside_mask": float(np.mean([r.change_outside_mask for r in masked]))
        if masked
        else None,
        "max_change_outside_mask": max(r.max_change_outside_mask for r in masked)
        if masked
        else None,
        "image_formats": formats,
        "lossless": all(name in LOSSLESS_FORMATS for name in formats),
    }


def unlike_their_guide(scores: list[dict]) -> int:
    """How many lossless outputs' recorded `l2_to_guide` differs from the L2 to the guide as
    read now by over 1% (and 1e-4): the guide changed since the run (`sdedit guides` rerun
    into its folder), or `--manifest` names another run's. Otherwise the two agree to about
    1e-8, up to ICC conversion at full size here and at the model's size in the run."""
    changed = 0
    for score in scores:
        reported = score.get("l2_to_guide")
        if reported is None or str(score.get("image_format") or "png").lower() \
                not in LOSSLESS_FORMATS:
            continue
        changed += abs(score["recomputed"].l2_to_guide - reported) > max(1e-4, 1e-2 * reported)
    return changed


def evaluate(folder: OutputFolder) -> dict:
    """The faithfulness report for an OUTPUT folder: overall and by t0, JSON-ready. Outputs
    whose guides are not the ones they were made from are counted (None when not judged: a
    `--fast-decode` run's guides differ from a full decode by design)."""
    scores, missing = score_rows(folder)
    fast = read_summary(folder).get("config", {}).get("fast_decode")
    by_t0: dict[float, list[dict]] = defaultdict(list)
    for score in scores:
        by_t0[float(score["t0"])].append(score)
    groups = [summarize_t0(by_t0[t0]) for t0 in sorted(by_t0)]
    judged = [g for g in groups if g["masked_outputs"] and g["lossless"]]
    exact = all(g["max_change_outside_mask"] == 0 for g in judged) if judged else None
    return {
        "output": folder.uri,
        "outputs_scored": len(scores),
        "outputs_without_guide": missing,
        "outputs_unlike_their_guide": None if fast else unlike_their_guide(scores),
        "exact_keep_outside_mask": exact,
        "by_t0": groups,
    }


def format_report(report: dict) -> str:
    """The report as a plain-text table, one line per t0."""
    header = f"{'t0':>6} {'outputs':>8} {'MSE to guide':>12} {'reported':>10} {'masked':>7} "
    header += f"{'L2 outside':>11} {'max change':>11}"
    lines = [f"faithfulness of {report['output']}", header, "-" * len(header)]
    for group in report["by_t0"]:
        lines.append(
            f"{group['t0']:>6.3f} {group['outputs']:>8} {group['l2_to_guide']:>12.5f} "
            f"{_number(group['l2_to_guide_reported'], '.5f'):>10} {group['masked_outputs']:>7} "
            f"{_number(group['change_outside_mask'], '.2e'):>11} "
            f"{_number(group['max_change_outside_mask'], 'd'):>11}"
        )
    if report["outputs_without_guide"]:
        lines.append(f"{report['outputs_without_guide']} outputs had no readable guide URI "
                     "(missing or unreadable; relative paths need the run's manifest, which "
                     "OUTPUT names only while a run holds it or once one has finished: pass "
                     "--manifest MANIFEST)")
    if report.get("outputs_unlike_their_guide"):
        lines.append(f"{report['outputs_unlike_their_guide']} lossless outputs recorded an "
                     "l2_to_guide more than 1% from the L2 to their guide as read now: those "
                     "guides changed since the run, or --manifest names another run's, so the "
                     "MSE column is not the run's faithfulness for them")
    verdict = _exactness(report)
    if verdict:
        lines.append(f"guide kept exactly outside every mask: {verdict}")
    return "\n".join(lines)


def _exactness(report: dict) -> str | None:
    """The verdict on the kept pixels: judged on lossless outputs only, since a lossy format's
    compression changes them by a few levels whatever the sampler kept (None: no mask)."""
    masked = [group for group in report["by_t0"] if group["masked_outputs"]]
    lossy = sorted({name for group in masked for name in group["image_formats"]
                    if name not in LOSSLESS_FORMATS})
    note = f"lossy {', '.join(lossy)}" if lossy else ""
    if report["exact_keep_outside_mask"] is None:
        return f"n/a ({note})" if note else None
    verdict = "yes" if report["exact_keep_outside_mask"] else "NO"
    return f"{verdict} ({note} outputs not judged)" if note else verdict


def _number(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_report(report: dict, uri: str, storage_options: dict) -> None:
    """Write the report as indented JSON to `uri`."""
    import fsspec

    with fsspec.open(uri, "w", **options_for(uri, storage_options)) as file:
        json.dump(report, file, indent=2)
