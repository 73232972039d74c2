"""Where task inputs come from: folders, globs and manifests of images on any fsspec URI.

A source row is a dict with `id` (safe as a file name), `source` (the image's URI) and any
pass-through columns (`label` from sub-folder names, or a manifest's own extra columns).
"""

from __future__ import annotations

import functools
import hashlib
import posixpath
import sys
import unicodedata
from collections.abc import Callable
from itertools import groupby
from pathlib import Path, PurePosixPath

from tasks.images import options_for

GLOB_CHARS = "*?["
ID_PUNCTUATION = "_.-"  # kept in ids besides letters, digits and combining marks
COMBINING_MARKS = ("Mn", "Mc")  # Unicode categories of vowel signs, viramas, harakat, ...
MAX_ID_LENGTH = 200  # the longest id `sdedit run` accepts (pipeline.manifest)
# the most UTF-8 bytes an id may take: guides/<id>.png and its temporary name while it is
# written (`pipeline.writers.commit`, 42 bytes more) must fit a file name's 255 bytes
MAX_ID_BYTES = 200
ID_DIGEST_LENGTH = 16
# manifest columns a guide builder replaces rather than passes through
REPLACED_COLUMNS = ("guide", "mask", "task")
CHAINED = "::"  # fsspec reads a URI holding it as a chain (zip://a.png::s3://b/a.zip)
# what list_images says of .parquet files found where images were expected
MANIFEST_SOURCE_HINT = "a manifest SOURCE is one .parquet file"
NAMED_AT_MOST = 3  # files a note names before it only counts the rest


def is_remote(uri: str) -> bool:
    """Whether `uri` names something other than the local file system."""
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """A local path for a plain path or a file:// URI."""
    return uri.removeprefix("file://")


def last_target(uri: str) -> tuple[str, str]:
    """A URI split before its last target: ("zip://a.png::", "../a.zip") for fsspec's chained
    `zip://a.png::../a.zip`, ("", uri) for any other. The target is what resolves."""
    chain, separator, target = uri.rpartition("::")
    return chain + separator, target


def is_absolute(uri: str) -> bool:
    """Whether a URI names its file without a folder to resolve against; of a chained URI
    (fsspec's `zip://a.png::s3://b/a.zip`), whether its last target, the file itself, does."""
    target = last_target(uri)[1]
    return "://" in target or target.startswith("/")


def resolve(uri: str, base: str) -> str:
    """`uri` made absolute against the folder `base` (relative manifest paths resolve there);
    of a chained URI, its last target (`zip://a.png::../a.zip`)."""
    if is_absolute(uri):
        return uri
    chain, target = last_target(uri)
    if is_remote(base):
        return chain + in_store(posixpath.join(base.rstrip("/"), target))
    return chain + str(Path(local_path(base), target))


def in_store(uri: str) -> str:
    """A remote URI with its `.` and `..` segments resolved: object stores take them for part
    of a key (`s3://b/m/../g.png` is not `s3://b/g.png` there). Local paths keep theirs, which
    the disk resolves (through symbolic links, as text cannot)."""
    if not is_remote(uri) or not {".", ".."} & set(uri.split("/")):
        return uri
    scheme, _, rest = uri.partition("://")
    root, _, path = rest.partition("/")  # the bucket or host stays
    return f"{scheme}://{root}/{posixpath.normpath(path)}"


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
    "猫/01.jpg" -> "猫__01", "हिंदी.png" -> "हिंदी" (letters, digits and combining marks of any
    script stay; other runs become "_"); one over MAX_ID_LENGTH characters or MAX_ID_BYTES
    UTF-8 bytes is cut, with a digest of the whole path so that ids stay distinct."""
    stem = unicodedata.normalize("NFC", str(PurePosixPath(relative).with_suffix("")))
    text = stem.replace("/", "__")  # NFC: macOS names come as NFD
    name = "".join("".join(run) if safe else "_" for safe, run in groupby(text, key=_id_char))
    if len(name) <= MAX_ID_LENGTH and len(name.encode()) <= MAX_ID_BYTES:
        return name
    digest = hashlib.sha256(relative.encode()).hexdigest()[:ID_DIGEST_LENGTH]
    keep = MAX_ID_BYTES - ID_DIGEST_LENGTH - 1
    head = name[: MAX_ID_LENGTH - ID_DIGEST_LENGTH - 1].encode()[:keep].decode(errors="ignore")
    return f"{head}-{digest}"


def _id_char(char: str) -> bool:
    """Whether `char` stays in an id as it is (what `\\w` keeps, plus combining marks)."""
    return (char.isalnum() or char in ID_PUNCTUATION
            or unicodedata.category(char) in COMBINING_MARKS)


def stderr_note(line: str) -> None:
    """Tell the user `line` on stderr: what a task command left out of its inputs, and why."""
    print(f"note: {line}", file=sys.stderr)


@functools.cache
def image_suffixes() -> tuple[str, ...]:
    """The file suffixes of every format Pillow can open (.jfif, .ppm, .tga, ...), as
    `tasks.images` and `sdedit run` decode any of them; less those it identifies but cannot
    decode here: its stub formats (HDF5, GRIB, BUFR, WMF: handlers this project never
    installs), MPEG video (identified only), and EPS/PS without Ghostscript."""
    from PIL import EpsImagePlugin, Image, ImageFile

    Image.init()
    undecodable = {name for name, (factory, _) in Image.OPEN.items()
                   if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)}
    undecodable |= {"MPEG"} | (set() if EpsImagePlugin.has_ghostscript() else {"EPS"})
    return tuple(sorted(suffix for suffix, name in Image.registered_extensions().items()
                        if name in Image.OPEN and name not in undecodable))


def list_images(
    location: str,
    storage_options: dict | None = None,
    exclude: tuple[str, ...] = (),
    parquet_hint: str = MANIFEST_SOURCE_HINT,
    note: Callable[[str], None] | None = stderr_note,
) -> list[tuple[str, str]]:
    """(URI, path relative to the root) of every image under a folder, glob or single file.

    A folder or file that exists is taken as it is even when its name holds glob characters
    ("Photos [2020]"); a missing one is an error. Images under a folder of `exclude` (a masks
    folder or a guide OUTPUT inside the source) are left out silently; other files are left
    out with a `note`: those without a suffix of `image_suffixes` and those whose path holds
    "::", which no command could open. Sorted by relative path so ids and seeded choices are
    stable across runs. Finding no image raises, with `parquet_hint` where .parquet files
    were found instead.
    """
    import fsspec

    fs, path = fsspec.core.url_to_fs(location, **options_for(location, storage_options or {}))
    root, found = _find_files(fs, path, location)
    skipped = _excluded_folders(fs, root, exclude, storage_options or {}, is_remote(location))
    files = [p for p in found if not _hidden(_relative(p, root)) and not p.startswith(skipped)]
    images = sorted(p for p in files if p.lower().endswith(image_suffixes()) and CHAINED not in p)
    if note:
        for line in _left_out(files, location):
            note(line)
    if not images:
        what = "it is a .parquet file" if found == [path] else "it holds .parquet files"
        hint = f"; {what}: {parquet_hint}" * any(p.lower().endswith(".parquet") for p in found)
        raise FileNotFoundError(f"no images (files with a suffix Pillow decodes, such as .png, "
                                f".jpg, .webp or .tif) found at {location}{hint}")
    remote = is_remote(location)
    return [(fs.unstrip_protocol(p) if remote else p, _relative(p, root)) for p in images]


def _find_files(fs, path: str, location: str) -> tuple[str, list[str]]:
    """The root folder and the files of a glob, folder or single file; a glob's folders are
    not files, and a path that names nothing is an error naming `location`."""
    if any(char in location for char in GLOB_CHARS) and not fs.exists(path):
        found = fs.glob(path, detail=True)
        return _glob_root(path), [p for p, info in found.items() if info["type"] != "directory"]
    if fs.isdir(path):
        return path.rstrip("/"), fs.find(path)
    if not fs.exists(path):
        raise FileNotFoundError(f"no such file or folder: {location}")
    return posixpath.dirname(path), [path]


def _left_out(files: list[str], location: str) -> list[str]:
    """One line per kind of file `list_images` leaves out of `files` (each a path found
    under `location`): files that are no image by their suffix, and files holding "::"."""
    lines = []
    others = [p for p in files if not p.lower().endswith(image_suffixes())]
    if others:
        suffixes = sorted({PurePosixPath(p).suffix.lower() or "(no suffix)" for p in others})
        lines.append(f"left out {len(others)} file(s) at {location} with a suffix of no image "
                     f"format Pillow decodes: {', '.join(suffixes)}")
    chained = [p for p in files if CHAINED in p and p.lower().endswith(image_suffixes())]
    if chained:
        named = ", ".join(chained[:NAMED_AT_MOST])
        more = f" and {len(chained) - NAMED_AT_MOST} more" * (len(chained) > NAMED_AT_MOST)
        lines.append(f"left out {len(chained)} image(s) at {location} whose path holds "
                     f"'{CHAINED}', which fsspec reads as a chained URL, so no command can open "
                     f"them (rename them): {named}{more}")
    return lines


def _excluded_folders(
    fs, root: str, exclude: tuple[str, ...], storage_options: dict, remote: bool
) -> tuple[str, ...]:
    """The paths on `fs` of the folders in `exclude` inside `root`, each ending in "/" so that
    a sibling "out2" is not taken for "out" (`root` itself, or a folder around it, never).
    Each is written under `root` as found files are, whatever `..` or symbolic links name it."""
    import fsspec

    folders = []
    for location in exclude:
        other, path = fsspec.core.url_to_fs(location, **options_for(location, storage_options))
        below = _inside(path, root, remote) if other.protocol == fs.protocol else None
        if below:
            folders.append(f"{root.rstrip('/')}/{below}/")
    return tuple(folders)


def _inside(path: str, root: str, remote: bool) -> str | None:
    """`path` relative to the folder `root` when it lies strictly inside it, else None; `.` and
    `..` resolved (and, for local paths, symbolic links, as the disk resolves them)."""
    if remote:
        path, root = posixpath.normpath(path), posixpath.normpath(root)
    else:
        path, root = Path(path).resolve().as_posix(), Path(root).resolve().as_posix()
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else None


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


def folder_rows(
    location: str,
    storage_options: dict | None = None,
    exclude: tuple[str, ...] = (),
    parquet_hint: str = MANIFEST_SOURCE_HINT,
) -> list[dict]:
    """Source rows for a folder or glob: id from the relative path, label from its sub-folder.

    Rows get a `label` only when at least one image sits in a sub-folder; images under a
    folder of `exclude` are left out (see `list_images`, which `parquet_hint` goes to).
    """
    rows = []
    for uri, relative in list_images(location, storage_options, exclude, parquet_hint):
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

    Relative URIs resolve against the manifest's folder, to absolute ones for a local
    manifest (the guides' manifest lies elsewhere, and the current directory changes);
    `foreground` (compositing pairs) and `mask` resolve too. Guide-specific columns (guide,
    mask, task) are kept under their names only where a builder reads them; all others pass
    through (`t0` included), so none may be named as `sdedit run` names its output columns.
    Ids become strings (0 -> "0", null stays None); `tasks.guides.id_problems` judges them,
    row by row.
    """
    import fsspec

    from pipeline.writers import read_parquet

    with fsspec.open(location, "rb", **options_for(location, storage_options or {})) as file:
        table = read_parquet(file)
    image_column = "source" if "source" in table.column_names else "guide"
    if "id" not in table.column_names or image_column not in table.column_names:
        raise ValueError(f"manifest {location} needs columns 'id' and 'source' or 'guide'")
    check_pass_through(table.column_names, location)
    base = (posixpath.dirname(location) if is_remote(location)
            else str(Path(local_path(location)).absolute().parent))
    rows = []
    for record in table.to_pylist():
        row = {key: value for key, value in record.items() if key not in REPLACED_COLUMNS}
        row["id"] = None if record["id"] is None else str(record["id"])  # 0 -> "0"
        image = record[image_column]
        row["source"] = resolve(str(image), base) if image else None  # None: the row's error
        for column in ("mask", "foreground"):
            if record.get(column):
                row[column] = resolve(str(record[column]), base)
        rows.append(row)
    return rows


def check_pass_through(columns: list[str], location: str) -> None:
    """Refuse a manifest SOURCE whose pass-through columns `sdedit run` would refuse in the
    guides' manifest: the names it reserves for its output and working columns
    (`pipeline.manifest.RESERVED_COLUMNS` and its `INTERNAL` prefix)."""
    from pipeline.manifest import INTERNAL, RESERVED_COLUMNS, clashing_columns

    clashing = clashing_columns([name for name in columns if name not in REPLACED_COLUMNS])
    if clashing:
        raise ValueError(
            f"manifest {location}: column(s) {', '.join(clashing)} would pass through to the "
            "guides' manifest, and `sdedit run` refuses them there: it names its own output "
            f"columns so ({', '.join(RESERVED_COLUMNS)}, {INTERNAL}*); rename them")


def source_rows(
    location: str, storage_options: dict | None = None, exclude: tuple[str, ...] = ()
) -> list[dict]:
    """Source rows for a manifest (`.parquet`) or a folder/glob of images (less the images
    under a folder of `exclude`)."""
    if location.lower().endswith(".parquet"):
        return manifest_rows(location, storage_options)
    return folder_rows(location, storage_options, exclude)
