"""Where task inputs come from: folders, globs and manifests of images on any fsspec URI.

A source row is a dict with `id` (safe as a file name), `source` (the image's URI) and any
pass-through columns (`label` from sub-folder names, or a manifest's own extra columns).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import unicodedata
from pathlib import Path, PurePosixPath

from tasks.images import options_for

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
GLOB_CHARS = "*?["
UNSAFE_ID_CHARS = re.compile(r"[^\w.-]+")  # letters and digits of any script stay
MAX_ID_LENGTH = 200  # the longest id `sdedit run` accepts (pipeline.manifest)
# manifest columns a guide builder replaces rather than passes through
REPLACED_COLUMNS = ("guide", "mask", "task", "t0")


def is_remote(uri: str) -> bool:
    """Whether `uri` names something other than the local file system."""
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """A local path for a plain path or a file:// URI."""
    return uri.removeprefix("file://")


def resolve(uri: str, base: str) -> str:
    """`uri` made absolute against the folder `base` (relative manifest paths resolve there)."""
    if "://" in uri or uri.startswith("/"):
        return uri
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), uri)
    return str(Path(local_path(base), uri))


def relative_to(uri: str, base: str) -> str:
    """`uri` relative to the local folder `base` when it lies under it, else `uri` unchanged."""
    if is_remote(uri) or is_remote(base):
        return uri
    try:
        return (
            Path(local_path(uri)).resolve().relative_to(Path(local_path(base)).resolve()).as_posix()
        )
    except ValueError:
        return str(Path(local_path(uri)).resolve())


def image_id(relative: str) -> str:
    """A file-name-safe id from a path relative to its root: "cats/01.jpg" -> "cats__01",
    "猫/01.jpg" -> "猫__01"; one over MAX_ID_LENGTH characters is cut, with a digest of the
    whole path so that ids stay distinct."""
    stem = unicodedata.normalize("NFC", str(PurePosixPath(relative).with_suffix("")))
    name = UNSAFE_ID_CHARS.sub("_", stem.replace("/", "__"))  # NFC: macOS names come as NFD
    if len(name) <= MAX_ID_LENGTH:
        return name
    digest = hashlib.sha256(relative.encode()).hexdigest()[:16]
    return f"{name[:MAX_ID_LENGTH - 17]}-{digest}"


def list_images(location: str, storage_options: dict | None = None) -> list[tuple[str, str]]:
    """(URI, path relative to the root) of every image under a folder, glob or single file.

    Sorted by relative path so ids and seeded choices are stable across runs.
    """
    import fsspec

    fs, path = fsspec.core.url_to_fs(location, **options_for(location, storage_options or {}))
    if any(char in location for char in GLOB_CHARS):
        root = _glob_root(path)
        found = fs.glob(path)
    elif fs.isdir(path):
        root, found = path.rstrip("/"), fs.find(path)
    else:
        root, found = posixpath.dirname(path), [path]
    images = sorted(p for p in found if p.lower().endswith(IMAGE_SUFFIXES)
                    and not _hidden(_relative(p, root)))
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found at {location}")
    remote = is_remote(location)
    return [(fs.unstrip_protocol(p) if remote else p, _relative(p, root)) for p in images]


def _hidden(relative: str) -> bool:
    """Under a name starting with '.' (.thumbnails/, macOS's ._photo.jpg): not the user's
    images, and their ids would start with '.', which `sdedit run` refuses."""
    return any(part.startswith(".") for part in relative.split("/"))


def _glob_root(path: str) -> str:
    """The folder part of a glob pattern before its first wildcard."""
    first = min(path.index(char) for char in GLOB_CHARS if char in path)
    return posixpath.dirname(path[:first]).rstrip("/")


def _relative(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/") if root and path.startswith(root) else path


def folder_rows(location: str, storage_options: dict | None = None) -> list[dict]:
    """Source rows for a folder or glob: id from the relative path, label from its sub-folder.

    Rows get a `label` only when at least one image sits in a sub-folder.
    """
    rows = []
    for uri, relative in list_images(location, storage_options):
        parent = posixpath.dirname(relative)
        rows.append({"id": image_id(relative), "source": uri, "label": parent or None})
    if all(row["label"] is None for row in rows):
        for row in rows:
            del row["label"]
    check_unique_ids(rows, location)
    return rows


def check_unique_ids(rows: list[dict], location: str) -> None:
    """Raise naming the first clash when two images map to the same id."""
    seen: dict[str, str] = {}
    for row in rows:
        if row["id"] in seen:
            raise ValueError(
                f"images {seen[row['id']]} and {row['source']} under {location} both map to id "
                f"{row['id']!r}; rename one (ids come from the path without its suffix)"
            )
        seen[row["id"]] = row["source"]


def manifest_rows(location: str, storage_options: dict | None = None) -> list[dict]:
    """Source rows from a Parquet manifest: `source` (or else `guide`) is the image.

    Relative URIs resolve against the manifest's folder; `foreground` (compositing pairs) and
    `mask` resolve too. Guide-specific columns (guide, mask, task, t0) are kept under their
    names only where a builder reads them; all others pass through.
    """
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(location, "rb", **options_for(location, storage_options or {})) as file:
        table = pq.read_table(file)
    image_column = "source" if "source" in table.column_names else "guide"
    if "id" not in table.column_names or image_column not in table.column_names:
        raise ValueError(f"manifest {location} needs columns 'id' and 'source' or 'guide'")
    base = posixpath.dirname(location) if is_remote(location) else str(Path(location).parent)
    rows = []
    for record in table.to_pylist():
        row = {key: value for key, value in record.items() if key not in REPLACED_COLUMNS}
        row["source"] = resolve(str(record[image_column]), base)
        for column in ("mask", "foreground"):
            if record.get(column):
                row[column] = resolve(str(record[column]), base)
        rows.append(row)
    return rows


def source_rows(location: str, storage_options: dict | None = None) -> list[dict]:
    """Source rows for a manifest (`.parquet`) or a folder/glob of images."""
    if location.lower().endswith(".parquet"):
        return manifest_rows(location, storage_options)
    return folder_rows(location, storage_options)
