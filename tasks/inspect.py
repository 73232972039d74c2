"""Looking at results: a terminal summary and a contact sheet (PNG and self-contained HTML).

The contact sheet has one row per id and the columns guide | mask | one output per t0, so the
realism/faithfulness trade-off of SDEdit (small t0 = faithful, large t0 = free) reads left to
right. Rows show sample `sample` (0 by default) of each (id, t0).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageOps

from pipeline.manifest import READ_THREADS
from tasks.images import InputError, options_for
from tasks.outputs import (
    SHARD_SUFFIXES,
    OutputFolder,
    committed_shards,
    decode_output,
    find_value,
    load_image,
    manifest_base,
    pixel_limit,
    read_shards,
    read_summary,
    resolve_guide,
    row_label,
    shard_times,
)

PAD = 4  # pixels between cells and around the sheet
HEADER = 20  # strip with the column titles
LABEL = 16  # strip above each row with its id
BACKGROUND = (24, 24, 27)
PLACEHOLDER = (60, 60, 66)
TEXT = (230, 230, 230)
META_COLUMNS = ["id", "t0", "sample", "l2_to_guide", "guide", "mask"]
SHARD = "_shard"  # the shard path `read_rows` adds to each data row (not among META_COLUMNS)
MIME = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}


class Output(NamedTuple):
    """One output cell: the encoded image, its format, the run's L2 and which row it is (id,
    t0, sample, shard: what an undecodable image's error names)."""

    data: bytes
    image_format: str
    l2: float | None
    label: str


@dataclass(frozen=True)
class SheetRow:
    """One id's cells: guide, mask (None when absent) and, per t0, the output (None if failed)."""

    id: str
    guide: Image.Image | None
    mask: Image.Image | None
    outputs: dict[float, Output | None]  # by t0
    failed: frozenset[float] = frozenset()  # t0 values with an error row (else: not requested)
    unread: tuple[str, ...] = ()  # "guide: why" for a guide or mask named but not read

    def empty_label(self, name: str) -> str:
        """Why the guide or mask cell (`name`) is empty: none named, or named but not read."""
        unread = any(problem.startswith(f"{name}: ") for problem in self.unread)
        return f"{name} unreadable" if unread else f"no {name}"

    def missing_label(self, t0: float) -> str:
        """Why a cell has no output: an error row, or a t0 this id was not run at."""
        return "failed" if t0 in self.failed else "not run"


# -- terminal summary -------------------------------------------------------------------------


def read_rows(folder: OutputFolder) -> tuple[list[dict], list[dict]]:
    """OUTPUT's data rows (`META_COLUMNS`, no images) and error rows (id, t0, stage), read once
    for both the summary and the sheet (each read every shard before). Each data row names
    its shard under `SHARD`, so the sheet reads images from the shards of its ids alone."""
    return _shard_rows(folder, "data", META_COLUMNS), _shard_rows(folder, "errors",
                                                                   ["id", "t0", "stage"])


def _shard_rows(folder: OutputFolder, sub: str, columns: list[str]) -> list[dict]:
    try:
        shards = committed_shards(folder, sub)
    except FileNotFoundError:  # no data shard: every output failed, or none committed yet
        return []
    rows = []
    tables = read_shards(folder, shards, columns, threads=READ_THREADS)
    for path, (_, table) in zip(shards[1], tables, strict=True):
        for row in table.to_pylist():
            row[SHARD] = path
            rows.append(row)
    return rows


def summary_lines(folder: OutputFolder, read: tuple[list[dict], list[dict]] | None = None
                  ) -> list[str]:
    """Counts, errors by stage, throughput and faithfulness by t0, as table lines (`read`:
    OUTPUT's rows as `read_rows` gives them, else read here)."""
    summary = read_summary(folder)
    rows, errors = read or read_rows(folder)
    stages = Counter(row["stage"] for row in errors)
    expected = find_value(summary, ("expected_outputs", "expected"))
    lines = [
        f"output            {folder.uri}",
        f"written           {len(rows)}  ({_count(rows, 'id', 'ids')}, "
        f"{_count(rows, 't0', 't0 values')}, {_count(rows, 'sample', 'samples')})",
        f"expected          {_expected(expected, summary)}{_reconciled(summary)}",
        f"errors            {sum(stages.values())}"
        + (
            "  (" + ", ".join(f"{s}: {n}" for s, n in sorted(stages.items())) + ")"
            if stages
            else ""
        ),
        f"images/s          {_rate(summary)}",
    ]
    if uncounted := _uncounted(summary):
        lines.insert(4, f"not counted       {uncounted}")
    return lines + faithfulness_lines(rows)


def _count(rows: list[dict], column: str, plural: str) -> str:
    distinct = len({row[column] for row in rows})
    return f"{distinct} {plural if distinct != 1 else plural.removesuffix('s').rstrip()}"


def _expected(expected: object, summary: dict) -> str:
    if expected is not None:
        return str(expected)
    return "n/a" if summary else "n/a (no summary.json yet)"


def _reconciled(summary: dict) -> str:
    """How the last run's summary.json counts its manifest's outputs. The lines around it say
    what OUTPUT holds, which need not add up to `expected`: error rows of keys written since,
    and outputs of keys the manifest no longer makes, stay in OUTPUT (`_uncounted`)."""
    written, errors = summary.get("written"), summary.get("errors")
    if not (isinstance(written, int) and isinstance(errors, int)):
        return ""
    state = "reconciled" if summary.get("reconciled") else "not reconciled"
    return f"  (the last run's manifest: {written} written + {errors} failed, {state})"


def _uncounted(summary: dict) -> str:
    outside = summary.get("outside_manifest") or {}
    parts = []
    if outside.get("written") or outside.get("errors"):
        parts.append(f"{outside.get('written', 0)} outputs and {outside.get('errors', 0)} error "
                     "rows of keys the last run's manifest no longer makes")
    if superseded := summary.get("superseded_errors"):
        parts.append(f"{superseded} error rows of keys written since")
    return "; ".join(parts)


def _rate(summary: dict) -> str:
    """The last run's throughput. A rerun that found everything committed edits nothing and
    the summary keeps no earlier run's rate, so it is said rather than shown as 0.00."""
    if summary.get("this_run", {}).get("todo") == 0:
        return "n/a (the last run had nothing to do)"
    rate = find_value(summary, ("images_per_second", "images_per_s", "throughput"))
    return f"{rate:.2f}" if isinstance(rate, int | float) else "n/a"


def faithfulness_lines(rows: list[dict]) -> list[str]:
    """Mean/min/max of the pipeline's `l2_to_guide` per t0."""
    by_t0: dict[float, list[float]] = {}
    for row in rows:
        if row.get("l2_to_guide") is not None:
            by_t0.setdefault(float(row["t0"]), []).append(float(row["l2_to_guide"]))
    if not by_t0:
        return ["faithfulness      n/a (no l2_to_guide values)"]
    lines = [
        "faithfulness (l2_to_guide: mean squared error, [-1,1] units)",
        f"{'t0':>8} {'outputs':>8} {'mean':>9} {'min':>9} {'max':>9}",
    ]
    for t0 in sorted(by_t0):
        values = by_t0[t0]
        lines.append(
            f"{t0:>8.3f} {len(values):>8} {sum(values) / len(values):>9.5f} "
            f"{min(values):>9.5f} {max(values):>9.5f}"
        )
    return lines


# -- gathering the sheet ----------------------------------------------------------------------


def sheet_rows(
    folder: OutputFolder, count: int = 8, ids: list[str] | None = None, sample: int = 0,
    read: tuple[list[dict], list[dict]] | None = None, newest: bool = False,
) -> tuple[list[SheetRow], list[float]]:
    """The first `count` ids (sorted; those with outputs first, then those whose every output
    failed; with `newest`, those of the most recently written shards first, as a scheduled
    run's latest) or the given `ids`, and the sorted t0 values of the run, failed ones included
    (`read`: OUTPUT's rows as `read_rows` gives them, else read here)."""
    rows, errors = read or read_rows(folder)
    failures = [row for row in errors
                if row["id"] is not None and row["t0"] is not None and 0 < row["t0"] <= 1]
    if not rows and not failures:
        raise FileNotFoundError(f"no output shards and no error rows under {folder.uri}")
    t0s = sorted({float(row["t0"]) for row in rows + failures})
    written = sorted({row["id"] for row in rows})
    only_failed = sorted({row["id"] for row in failures} - set(written))
    check_choice(folder, written + only_failed, ids, {row["sample"] for row in rows}, sample)
    order = newest_first(folder, written + only_failed, rows + errors) if newest else \
        written + only_failed
    chosen = ids or order[:count]
    wanted = set(chosen)
    holding = {row.get(SHARD) for row in rows if row["id"] in wanted and row["sample"] == sample}
    shards = None if None in holding else holding  # rows read elsewhere: every shard
    outputs = chosen_outputs(folder, chosen, sample, shards) if holding else {}
    first = {row["id"]: row for row in rows}
    summary = read_summary(folder)
    base, limit = manifest_base(folder, summary), pixel_limit(summary)
    failed = {(row["id"], float(row["t0"])) for row in failures}
    sheet = []
    for row_id in chosen:
        named = first.get(row_id, {})
        guide, guide_problem = _optional_image("guide", named.get("guide"), base, folder, limit)
        mask, mask_problem = _optional_image("mask", named.get("mask"), base, folder, limit)
        sheet.append(SheetRow(
            id=row_id, guide=guide, mask=mask,
            outputs={t0: outputs.get((row_id, t0)) for t0 in t0s},
            failed=frozenset(t0 for t0 in t0s if (row_id, t0) in failed),
            unread=tuple(p for p in (guide_problem, mask_problem) if p),
        ))
    return sheet, t0s


def newest_first(folder: OutputFolder, ids: list[str], rows: list[dict]) -> list[str]:
    """`ids` by the time of the newest shard holding a row of theirs (data or error rows as
    `read_rows` names their shards), newest first; ties keep their order."""
    written_at = {**shard_times(folder, "data"), **shard_times(folder, "errors")}
    latest: dict[str, float] = {}
    for row in rows:
        when = written_at.get(row.get(SHARD), -math.inf)
        latest[row["id"]] = max(when, latest.get(row["id"], -math.inf))
    return sorted(ids, key=lambda row_id: -latest.get(row_id, -math.inf))


def check_choice(folder: OutputFolder, known: list[str], ids: list[str] | None,
                 samples: set[int], sample: int) -> None:
    """Refuse --id values OUTPUT has no row for and a --sample no output has, which would
    otherwise be drawn as rows and cells of "not run"."""
    unknown = sorted(set(ids or []) - set(known))
    if unknown:
        some = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
        raise ValueError(f"--id {', '.join(unknown)}: not in {folder.uri} "
                         f"(it holds {len(known)} id(s): {some})")
    if samples and sample not in samples:
        held = (f"{min(samples)}-{max(samples)}" if len(samples) == max(samples) - min(samples) + 1
                else ", ".join(map(str, sorted(samples))))
        raise ValueError(f"--sample {sample}: {folder.uri} holds samples {held}")


def chosen_outputs(
    folder: OutputFolder, ids: list[str], sample: int, shards: set[str] | None = None
) -> dict[tuple[str, float], Output]:
    """(id, t0) -> the Output of sample `sample`, reading only those ids, and only from
    `shards` (paths as `read_rows` names them) when given: ids spread over every shard made
    each shard's images read (Parquet statistics cannot rule an id out then; tars never can)."""
    columns = ["id", "t0", "sample", "image", "image_format", "l2_to_guide"]
    if shards is None:
        data_format, paths = committed_shards(folder)
    else:  # committed shards `read_rows` listed, all in one format: no listing again
        paths = sorted(shards)
        data_format = next((name for name, suffix in SHARD_SUFFIXES.items()
                            if paths and paths[0].endswith(suffix)), "parquet")
    outputs = {}
    for shard, table in read_shards(folder, (data_format, paths), columns, ids, READ_THREADS):
        for row in table.to_pylist():
            if row["sample"] == sample:
                outputs[(row["id"], float(row["t0"]))] = Output(
                    row["image"], row.get("image_format") or "png", row.get("l2_to_guide"),
                    row_label(row, shard))
    return outputs


def _optional_image(name: str, uri: str | None, base: str | None, folder: OutputFolder,
                    max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """A row's guide or mask (`name`) and, when it names one that cannot be read, why: the
    sheet shows an empty cell and the summary says so (a wrong --manifest drew "no guide")."""
    if not uri:
        return None, None
    resolved = resolve_guide(uri, base)
    if resolved is None:
        return None, f"{name}: {uri} is a relative path and no manifest is known to resolve it"
    try:
        return load_image(resolved, folder.storage_options, "L" if name == "mask" else "RGB",
                          max_pixels), None
    except InputError as error:  # missing or not an image
        return None, f"{name}: {error}"  # the error names the URI


def unread_note(rows: list[SheetRow]) -> list[str]:
    """A summary line for the guides and masks the sheet names but could not read."""
    unread = [problem for row in rows for problem in row.unread]
    if not unread:
        return []
    return [f"{len(unread)} guide/mask file(s) on the sheet could not be read, e.g. "
            f"{unread[0]} (relative paths resolve against the run's manifest's folder: pass "
            "--manifest MANIFEST if that is not where they are)"]


# -- the PNG sheet ----------------------------------------------------------------------------


def sheet_size(rows: int, columns: int, cell: int) -> tuple[int, int]:
    """(width, height) in pixels of a sheet with `rows` ids and `columns` image columns."""
    return PAD + columns * (cell + PAD), HEADER + rows * (LABEL + cell + PAD)


def cell_origin(row: int, column: int, cell: int) -> tuple[int, int]:
    """Top-left pixel of the cell at (row, column)."""
    return PAD + column * (cell + PAD), HEADER + row * (LABEL + cell + PAD) + LABEL


def fit_cell(image: Image.Image, cell: int) -> Image.Image:
    """`image` scaled to fit a cell x cell square, centred on the sheet's background."""
    canvas = Image.new("RGB", (cell, cell), BACKGROUND)
    thumb = ImageOps.contain(image.convert("RGB"), (cell, cell), Image.Resampling.LANCZOS)
    canvas.paste(thumb, ((cell - thumb.width) // 2, (cell - thumb.height) // 2))
    return canvas


def placeholder(text: str, cell: int) -> Image.Image:
    """A grey cell saying why there is no image."""
    canvas = Image.new("RGB", (cell, cell), PLACEHOLDER)
    ImageDraw.Draw(canvas).text((4, cell // 2 - 6), text, fill=TEXT)
    return canvas


def column_titles(t0s: list[float]) -> list[str]:
    """Titles of the sheet's columns: guide, mask, then one per t0."""
    return ["guide", "mask", *(f"t0 = {t0:g}" for t0 in t0s)]


def render_sheet(rows: list[SheetRow], t0s: list[float], cell: int = 128) -> Image.Image:
    """The contact sheet as one RGB image: guide | mask | outputs by t0, one row per id."""
    sheet = Image.new("RGB", sheet_size(len(rows), 2 + len(t0s), cell), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(column_titles(t0s)):
        draw.text((cell_origin(0, column, cell)[0], 4), title, fill=TEXT)
    for index, row in enumerate(rows):
        x, y = cell_origin(index, 0, cell)
        draw.text((x, y - LABEL + 2), row.id, fill=TEXT)
        for column, image in enumerate(_cells(row, t0s, cell)):
            sheet.paste(image, cell_origin(index, column, cell))
    return sheet


def _cells(row: SheetRow, t0s: list[float], cell: int) -> list[Image.Image]:
    cells = [
        fit_cell(row.guide, cell) if row.guide else placeholder(row.empty_label("guide"), cell),
        fit_cell(row.mask, cell) if row.mask else placeholder(row.empty_label("mask"), cell),
    ]
    for t0 in t0s:
        output = row.outputs.get(t0)
        cells.append(fit_cell(decode_output(output.data, output.label), cell) if output
                     else placeholder(row.missing_label(t0), cell))
    return cells


# -- the HTML sheet ---------------------------------------------------------------------------


def data_uri(data: bytes, image_format: str) -> str:
    """An inline `data:` URI for encoded image bytes."""
    mime = MIME.get(image_format.lower(), "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def png_uri(image: Image.Image, longest: int = 256) -> str:
    """An image as an inline PNG, scaled down so its longest side is at most `longest`."""
    image = ImageOps.contain(image, (longest, longest)) if max(image.size) > longest else image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return data_uri(buffer.getvalue(), "png")


def render_html(rows: list[SheetRow], t0s: list[float], summary: list[str]) -> str:
    """A self-contained HTML page: the summary and the sheet, every image inlined."""
    head = "".join(f"<th>{html.escape(title)}</th>" for title in ["id", *column_titles(t0s)])
    body = "".join(_html_row(row, t0s) for row in rows)
    return HTML_PAGE.format(
        summary=html.escape("\n".join(summary)), head=head, body=body, count=len(rows)
    )


def _html_row(row: SheetRow, t0s: list[float]) -> str:
    cells = [f"<td class='id'>{html.escape(row.id)}</td>"]
    for image, name in ((row.guide, "guide"), (row.mask, "mask")):
        cells.append(f"<td><img src='{png_uri(image)}'></td>" if image
                     else _empty(row.empty_label(name)))
    for t0 in t0s:
        output = row.outputs.get(t0)
        if output is None:
            cells.append(_empty(row.missing_label(t0)))
            continue
        caption = f"L2 {output.l2:.4f}" if output.l2 is not None else ""
        cells.append(f"<td><img src='{data_uri(output.data, output.image_format)}'>"
                     f"<div>{caption}</div></td>")
    return "<tr>" + "".join(cells) + "</tr>\n"


def _empty(text: str) -> str:
    return f"<td class='empty'>{html.escape(text)}</td>"


HTML_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>SDEdit contact sheet</title>
<style>
body {{ background: #18181b; color: #e4e4e7; font-family: system-ui, sans-serif; margin: 2em; }}
pre {{ background: #27272a; padding: 1em; border-radius: 6px; overflow-x: auto; }}
table {{ border-collapse: separate; border-spacing: 6px; }}
th {{ font-weight: 600; text-align: center; position: sticky; top: 0; background: #18181b; }}
td {{ text-align: center; vertical-align: top; font-size: 12px; color: #a1a1aa; }}
td img {{ width: 192px; height: 192px; object-fit: contain; image-rendering: pixelated;
          background: #27272a; border-radius: 4px; display: block; }}
td.id {{ text-align: right; vertical-align: middle; font-family: monospace; color: #e4e4e7; }}
td.empty {{ width: 192px; height: 192px; background: #3f3f46; vertical-align: middle; }}
</style></head><body>
<h1>SDEdit contact sheet</h1>
<p>{count} ids &middot; guide | mask (white = synthesized) | one output per t0
(small t0 = faithful to the guide, large t0 = free)</p>
<pre>{summary}</pre>
<table><thead><tr>{head}</tr></thead><tbody>
{body}</tbody></table>
</body></html>
"""


# -- writing ----------------------------------------------------------------------------------


def write_contact_sheet(
    folder: OutputFolder,
    destination: str,
    count: int = 8,
    ids: list[str] | None = None,
    sample: int = 0,
    cell: int = 128,
    newest: bool = False,
) -> tuple[str, str, list[str]]:
    """Write contact_sheet.png and contact_sheet.html under `destination`.

    Returns the two URIs and the summary lines (also embedded in the HTML).
    """
    import fsspec

    read = read_rows(folder)
    rows, t0s = sheet_rows(folder, count, ids, sample, read, newest)
    summary = summary_lines(folder, read) + unread_note(rows)
    png, page = (
        f"{destination.rstrip('/')}/contact_sheet.png",
        f"{destination.rstrip('/')}/contact_sheet.html",
    )
    buffer = io.BytesIO()
    render_sheet(rows, t0s, cell).save(buffer, format="PNG")  # before any file is made
    fs, root = fsspec.core.url_to_fs(destination,
                                       **options_for(destination, folder.storage_options))
    fs.makedirs(root, exist_ok=True)
    with fsspec.open(png, "wb", **options_for(png, folder.storage_options)) as file:
        file.write(buffer.getvalue())
    with fsspec.open(page, "w", encoding="utf-8",
                     **options_for(page, folder.storage_options)) as file:
        file.write(render_html(rows, t0s, summary))
    return png, page, summary
