"""How every command reads an image: the decoding contract `sdedit run`, `edit`, `train`,
`guides`, `inspect` and `evaluate` share, so a file is accepted, rejected and converted the same
way everywhere.

Bytes come from any fsspec URI in one GET, at most `file_limit(max_pixels)` of them (a larger
file is refused before it fills memory); transient I/O errors are retried with backoff
(for http(s) URIs: no answer, timeouts, 408, 429 and 5xx; a 404 or 403 is final); a malformed
URI is its row's read error; credentials the store refuses stop the run. Guides become 8-bit
RGB: grayscale, 1-bit and palette images are expanded; 16-bit grayscale is scaled to 8 bits
(value / 257; 32-bit integer images whose values do not fit 16 bits are decode errors) and
16-bit colour keeps its high byte (Pillow's reading); CMYK and YCbCr go through Pillow's
conversion; images with transparency (RGBA, LA, premultiplied La, PA, palette with a transparent
colour, a PNG tRNS key colour in grayscale, RGB or 16-bit images) are composited over white; an
embedded ICC colour profile of an RGB or CMYK image (Display P3 and Adobe RGB photos, print
CMYK) is converted to sRGB (LittleCMS, perceptual intent), and an image without one, or with a
gray or unreadable one, is taken as sRGB; EXIF orientation is applied (EXIF that cannot be read
is ignored); other modes (32-bit float, LAB, HSV) are decode errors. Masks become 8-bit
grayscale read as [0, 1] (white = synthesize, black = keep): colour masks use their luminance,
16-bit masks are scaled like guides, alpha and colour profiles are ignored. Images larger
than `max_pixels` (width x height, default `MAX_PIXELS`) are rejected before their pixels are
decoded (decompression-bomb guard). Every failure is an `InputError` whose `stage` says where
it failed and whose message names the URI. Storage failures that are not one row's become a
`StorageError` naming what could not be used (`storage_step`). Pillow, NumPy and fsspec are
imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import errno
import functools
import io
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from PIL import Image

Stage = str  # "read" | "decode" | "validate"
T = TypeVar("T")
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
TRANSPARENT = ("RGBA", "RGBa", "LA", "La", "PA")
READ_ATTEMPTS = 4
MAX_PIXELS = 40_000_000  # default size limit (width x height) of every decoded image
# Client libraries under fsspec filesystems whose own exception types mean "the store failed".
STORAGE_CLIENTS = frozenset({"botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google",
                             "adlfs", "azure", "fsspec"})


class InputError(Exception):
    """A guide or mask cannot be used; `stage` says where it failed, the message says why."""

    def __init__(self, stage: Stage, message: str) -> None:
        super().__init__(message)
        self.stage = stage


class StorageError(RuntimeError):
    """A command could not read or write a manifest, a model, images or an OUTPUT folder (an
    unreachable endpoint, refused credentials...); the message says which and what the store
    answered. Per-row reads are `InputError`s instead."""


@contextmanager
def storage_step(failure: str) -> Iterator[None]:
    """Re-raise a storage failure inside the block, or inside a Ray task it runs, as one
    StorageError starting `failure`: OSError (what fsspec filesystems raise), an error of a
    storage client library (botocore raises connection failures as its own types), or the
    TypeError of a storage option the file system does not take (s3fs passes unknown ones on
    to botocore's session)."""
    try:
        yield
    except Exception as error:
        cause = getattr(error, "cause", None) or error  # a Ray task's error wraps the original
        client = type(cause).__module__.split(".")[0] in STORAGE_CLIENTS
        option = _option_refused(cause, error)
        if not (client or option or isinstance(cause, OSError)):
            raise
        message = without_ray_retry_note(str(cause))
        hint = "" if not option else (
            " (two storage options that set one argument?)" if "multiple values" in str(cause)
            else " (a --storage-option this file system does not take?)")
        raise StorageError(f"{failure}: {type(cause).__name__}: {message}{hint}") from error


RAY_RETRY_NOTE = re.compile(r"\nFailed to [^\n]* after \d+/\d+ attempts \(total backoff [^\n]*\)\."
                            r".*\Z", re.DOTALL)


def without_ray_retry_note(message: str) -> str:
    """A task's error message less the lines Ray Data appends to it (how many attempts it made,
    and how to configure `DataContext` retries, which a user of this CLI cannot)."""
    return RAY_RETRY_NOTE.sub("", message)


# The exception types of a store that did not answer at all (refused or dropped connections,
# timeouts), by (top-level module, class name) along an error's class hierarchy: botocore's own
# ConnectionError (EndpointConnectionError...) is no OSError, unlike Python's.
OUTAGES = frozenset({("botocore", "ConnectionError"), ("aiohttp", "ClientConnectionError"),
                     ("builtins", "ConnectionError"), ("builtins", "TimeoutError")})


def is_outage(error: BaseException) -> bool:
    """Whether `error` says the store could not be reached (this time): worth another try."""
    return any((kind.__module__.split(".")[0], kind.__name__) in OUTAGES
               for kind in type(error).__mro__)


def store_may_pass(error: BaseException) -> bool:
    """Whether a store's failure to list, write or read a file of OUTPUT may pass when tried
    again: an outage or another I/O error, not a missing file, refused permission or refused
    credentials (which s3fs raises as OSError EINVAL, as any HTTP 400)."""
    if _error_code(error) in REFUSED_CREDENTIALS:
        return False
    return is_outage(error) or (isinstance(error, OSError) and not isinstance(
        error, FileNotFoundError | PermissionError))


def with_backoff(call: Callable[[], T], attempts: int, delay: float,
                 may_pass: Callable[[Exception], bool] = store_may_pass) -> T:
    """`call()`, tried again after `delay`, 2 `delay`, 4 `delay`... seconds while what it
    raises `may_pass`; the last attempt's error is raised as it is."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:
            if attempt == attempts - 1 or not may_pass(error):
                raise
            time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")


def _option_refused(cause: BaseException, error: BaseException) -> bool:
    """Whether `cause` is the TypeError of a storage option the file system does not take: a
    keyword argument refused in a storage client's own code (s3fs hands unknown options on to
    botocore's session; `token` and `client_kwargs.aws_session_token` both name one of its
    arguments), not in this project's. Across Ray the traceback is only text, in the wrapping
    `error`'s message: its innermost file decides."""
    refusals = ("unexpected keyword argument", "got multiple values for keyword argument")
    if not (isinstance(cause, TypeError) and any(text in str(cause) for text in refusals)):
        return False
    trace = cause.__traceback__
    if trace is None:
        files = re.findall(r'File "([^"]+)"', str(error))
        return bool(files) and any(f"/{name}/" in files[-1] for name in STORAGE_CLIENTS)
    while trace.tb_next is not None:
        trace = trace.tb_next
    return trace.tb_frame.f_globals.get("__name__", "").split(".")[0] in STORAGE_CLIENTS


def is_local(uri: str) -> bool:
    """Whether a URI names the local file system (storage options do not apply to it)."""
    return "://" not in uri or uri.startswith(("file://", "local://"))


def options_for(uri: str, storage_options: Mapping) -> dict:
    """The storage options that apply to `uri`: none for a local file; for a remote one, the
    options not scoped to a protocol, then those under its protocol's name (`s3.endpoint_url=`,
    `https.headers.Authorization=`). http(s) URIs take only their scoped options: fsspec's
    http file system passes unknown options into every request, so an object store's options
    (endpoint_url, key, ...) made every http read fail, reported as a missing file. A chained
    URI (`zip://img.png::s3://bucket/a.zip`) gets each layer's options under its protocol's
    name, as fsspec hands them on: the unscoped ones to the innermost layer, the store."""
    if "::" in uri:  # outer layers: "zip://member" or a bare protocol ("simplecache")
        *outer, inner = uri.split("::")
        protocols = [layer.split("://", 1)[0].lower() for layer in outer]
        nested = {protocol: dict(_scoped(storage_options, protocol)) for protocol in protocols}
        nested[_protocol(inner)] = options_for(inner, storage_options)
        return {protocol: options for protocol, options in nested.items() if options}
    if is_local(uri):
        return {}
    protocol = _protocol(uri)
    scoped = {name for name, value in storage_options.items()
              if isinstance(value, Mapping) and name in _protocols()}
    own = dict(storage_options.get(protocol, {})) if protocol in scoped else {}
    if protocol in ("http", "https"):
        return own
    return {**{k: v for k, v in storage_options.items() if k not in scoped}, **own}


def _scoped(storage_options: Mapping, protocol: str) -> Mapping:
    value = storage_options.get(protocol)
    return value if isinstance(value, Mapping) else {}


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


@functools.cache
def _protocols() -> frozenset[str]:
    from fsspec.registry import known_implementations

    return frozenset(known_implementations)


def read_bytes(uri: str, storage_options: Mapping, attempts: int = READ_ATTEMPTS,
               max_bytes: int | None = None) -> bytes:
    """The bytes at a URI, read in one request (`_first_bytes`: a ranged GET, or a streamed one
    over http(s); no HEAD first); failures that may pass are retried with exponential backoff.
    A file larger than `max_bytes` (default: `file_limit(MAX_PIXELS)`) is refused after reading
    that much, so a huge object cannot exhaust a worker's memory. A failure of this URI is its
    row's InputError; one of the store (refused credentials, an object store that does not
    answer, a storage option its file system does not take) is raised as it is, for
    `storage_step` to stop the run with."""
    import fsspec

    max_bytes = file_limit(MAX_PIXELS) if max_bytes is None else max_bytes
    fs = None
    for attempt in range(attempts):
        try:
            # an unknown protocol or its library missing fails here, and so does the archive
            # of a chained URI (zip://member::s3://bucket/a.zip): missing, or not an archive
            fs, path = fsspec.core.url_to_fs(uri, **options_for(uri, storage_options))
            data = _first_bytes(fs, path, max_bytes + 1)
        except Exception as error:  # noqa: BLE001 (sorted by _may_pass; the rest re-raised)
            may_pass = _may_pass(error)
            if may_pass is None:  # the store's: an outage is tried again, then stops the run
                if not is_outage(error) or attempt == attempts - 1:
                    raise
            elif not may_pass:
                raise InputError("read", f"cannot read {shown(uri)}: {_reason(error, fs)}"
                                 f"{_space_hint(uri)}") from error
            last = error
        else:
            if len(data) > max_bytes:
                raise InputError("read", f"{uri} is larger than {max_bytes:,} bytes, more than "
                                 "an image within the pixel limit (--max-pixels) needs")
            return data
        if attempt == attempts - 1:
            raise InputError("read", f"cannot read {uri} after {attempts} attempts: "
                             f"{_reason(last, fs)}") from last
        time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def read_image(uri: str, storage_options: Mapping, max_pixels: int = MAX_PIXELS,
               mask: bool = False) -> Image.Image:
    """A guide as 8-bit RGB or, with `mask`, a mask as "L", read from any URI (at most
    `file_limit(max_pixels)` bytes) and decoded by this module's contract."""
    image = open_image(read_bytes(uri, storage_options, max_bytes=file_limit(max_pixels)),
                       uri, max_pixels)
    return to_mask(image, uri) if mask else to_rgb(image, uri)


def file_limit(max_pixels: int) -> int:
    """The most bytes read for an image of at most `max_pixels` pixels: 24 per pixel (no mode
    the pipeline accepts stores more than 8 uncompressed; a plain-text 16-bit PPM takes up to
    18) plus 1 MiB of headers and metadata."""
    return 24 * max_pixels + (1 << 20)


def _first_bytes(fs, path: str, length: int) -> bytes:
    """The first `length` bytes at `path` (all of a shorter file) in one GET: ranged for object
    stores and files, streamed and cut off for http(s), whose servers may ignore a Range."""
    if "http" in fs.protocol:
        return _streamed(fs, path, length)
    try:
        return fs.cat_file(path, start=0, end=length)
    except Exception as error:
        if _error_code(error) == "InvalidRange":
            return b""  # S3 refuses any range of an empty object
        raise


def _streamed(fs, url: str, length: int) -> bytes:
    """At most `length` bytes of an http(s) answer, read as they arrive (fsspec's cat_file
    would take the whole body of a server that ignores Range); failures as cat_file's."""
    from fsspec.asyn import sync
    from fsspec.implementations.http import HTTPStreamFile

    session = sync(fs.loop, fs.set_session)
    with HTTPStreamFile(fs, url, loop=fs.loop, session=session, **fs.kwargs) as stream:
        chunks, size = [], 0
        while size < length and (chunk := stream.read(length - size)):
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks)


def _error_code(error: BaseException) -> str | None:
    """The error code an object store answered (botocore's ClientError under s3fs's error;
    other libraries hang other things on `response`, e.g. huggingface_hub a requests one)."""
    response = getattr(error.__cause__, "response", None)
    detail = response.get("Error") if isinstance(response, dict) else None
    return detail.get("Code") if isinstance(detail, dict) else None


# What S3-compatible stores answer when they refuse the credentials themselves or how they
# are signed (AuthorizationHeaderMalformed: a `region` other than the bucket's), not one
# object: every row would fail alike, so the run stops instead of writing error rows.
REFUSED_CREDENTIALS = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                                 "InvalidToken", "TokenRefreshRequired", "InvalidSecurity",
                                 "AuthorizationHeaderMalformed"})


def _may_pass(error: Exception) -> bool | None:
    """Whether a failed read may succeed when tried again (no answer, a timeout, throttling:
    HTTP 408 or 429, a server error: 5xx); False when it failed for good and is this URI's
    (missing, forbidden, not a file, not a valid object name: 404, 403..., a protocol no
    library here reads, a chained URI's archive that is not one); None when it is the
    store's rather than the row's (refused credentials, an endpoint botocore cannot reach)."""
    import tarfile
    import zipfile

    status = getattr(error, "status", None)
    if isinstance(status, int):  # an http(s) answer
        return status in (408, 429) or status >= 500
    if _error_code(error) in REFUSED_CREDENTIALS:
        return None
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                          PermissionError, ValueError, ImportError, zipfile.BadZipFile,
                          tarfile.TarError)):
        return False
    if isinstance(error, OSError) and error.errno == errno.EINVAL:
        return False  # s3fs's HTTP 400 (InvalidRequest, a malformed key): the request's own
    if type(error).__name__ == "ParamValidationError":  # botocore: e.g. an invalid bucket name
        return False
    if isinstance(error, OSError) or type(error).__module__.split(".")[0] == "aiohttp":
        return True  # network and object-store hiccups, dropped connections
    return None


def shown(uri: str) -> str:
    """A URI as messages name it: quoted when whitespace or a control character would be
    invisible in it (a manifest made from a text file may keep a line's newline)."""
    visible = uri == uri.strip() and uri.isprintable()
    return uri if visible else repr(uri)


def _space_hint(uri: str) -> str:
    if uri == uri.strip():
        return ""
    return ("; the URI begins or ends with whitespace, which is kept as part of the name: "
            "strip it in the manifest if the file is named without it")


def _reason(error: BaseException, fs=None) -> str:
    status = getattr(error, "status", None)
    if isinstance(status, int):  # an HTTP answer: its status says it all
        return f"HTTP {status} {getattr(error, 'message', '')}".rstrip()
    if isinstance(error, FileNotFoundError) and fs is not None and "http" in fs.protocol:
        return "HTTP 404 Not Found"  # fsspec's http file system raises FileNotFoundError(url)
    # Pillow names the buffer it read from ("cannot identify image file <_io.BytesIO object at
    # 0x7f...>"): an address that says nothing and differs from run to run in committed errors
    text = IN_MEMORY.sub("", str(error))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


IN_MEMORY = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def open_image(data: bytes, uri: str, max_pixels: int, draft_to: int | None = None
               ) -> Image.Image:
    """Decode an image, refusing oversized and truncated files. With `draft_to`, a JPEG decodes
    at the smallest of libjpeg's DCT scales (1/2, 1/4, 1/8) whose shorter side is still at
    least `draft_to` pixels; other formats decode fully."""
    from PIL import Image

    # --max-pixels governs, not Pillow's own limit (about 179M pixels, which it would refuse
    # first); Pillow still refuses twice the limit before reading any pixel.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, max_pixels)
    try:
        with warnings.catch_warnings():  # Pillow's warning about a size the guard below refuses
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise InputError("decode", f"{uri} is {width}x{height} = {width * height} pixels, "
                             f"over the limit of {max_pixels} (decompression-bomb guard; "
                             "raise --max-pixels to allow it, and for a rerun of sdedit run "
                             "add --retry-errors decode)")
        if draft_to and image.format == "JPEG":
            scale = draft_to / min(width, height)
            image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
        image.load()
        return upright(image)
    except InputError:
        raise
    except Image.DecompressionBombError as error:
        raise InputError("decode", f"{uri} is too large to decode safely: {error}") from error
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError("decode", f"cannot decode {uri} as an image ({_reason(error)}); "
                         "expected a complete PNG, JPEG, WebP or other Pillow format") from error
    except Exception as error:  # bytes in memory only: whatever a decoder raises is this row's
        raise InputError("decode", f"cannot decode {uri} as an image ({_reason(error)})"
                         ) from error


# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose)
_UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
            6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says. Unlike `ImageOps.exif_transpose` the EXIF
    block is not rewritten, so EXIF that Pillow can read but not write (a tag of the wrong
    type) does not fail an image that decodes."""
    from PIL import Image

    method = _UPRIGHT.get(exif_orientation(image))
    return image.transpose(getattr(Image.Transpose, method)) if method else image


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 = as stored); 1 as well when the EXIF block cannot be read."""
    from PIL import ExifTags

    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # corrupt EXIF: the pixels are still the image, as stored
        return 1


def oriented_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image that `open_image` decoded in full, read from its header:
    swapped when its EXIF orientation turns it by 90 degrees."""
    return _header(data)[0]


def _header(data: bytes) -> tuple[tuple[int, int], int]:
    """(`oriented_size`, EXIF orientation) of an image's bytes, from its header."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        orientation = exif_orientation(image)
    return ((height, width) if orientation in (5, 6, 7, 8) else (width, height)), orientation


def drafted_box(data: bytes, drafted: tuple[int, int]) -> tuple[float, ...] | None:
    """Where the image lies in its upright decode at a DCT scale (`open_image` with `draft_to`),
    as (left, top, right, bottom); None when it decoded in full.

    libjpeg rounds each side of a 1/s decode up to whole pixels, so for sides that s does not
    divide the last column and row reach past the image's edge: the image spans `size / s`
    pixels from the stored top-left corner, which EXIF orientation turns to another corner.
    Cropping as if the whole decode were the image shifted and stretched the guide against its
    mask (up to 131 grey levels apart from a full decode at 777x777; 1.5 when s divides).
    """
    (width, height), orientation = _header(data)
    if drafted == (width, height):
        return None
    scale = next((s for s in (2, 4, 8)
                  if (math.ceil(width / s), math.ceil(height / s)) == drafted), None)
    if scale is None:  # not a size libjpeg's scaling gives: take the decode as the image
        return None
    right, bottom = width / scale, height / scale
    left = drafted[0] - right if orientation in (2, 3, 6, 7) else 0.0  # stored right edge
    top = drafted[1] - bottom if orientation in (3, 4, 7, 8) else 0.0  # stored bottom edge
    return (left, top, left + right, top + bottom)


def to_rgb(image: Image.Image, uri: str, deferred: bool = False) -> Image.Image:
    """8-bit sRGB following the conversions in the module docstring. With `deferred`, an RGB
    image's colour profile is left for the caller to apply once it has resized the image
    (`in_srgb` with the decoded image's `icc_profile`: 1 ms at 256x256, 240 ms for a
    12-megapixel photo); CMYK converts here either way."""
    try:
        rgb = _to_rgb(image, uri)
    except InputError:
        raise
    except Exception as error:  # pixels in memory: whatever a conversion raises is this row's
        raise InputError("decode", f"cannot convert {uri} (mode {image.mode!r}) to RGB "
                         f"({_reason(error)})") from error
    profile = image.info.get("icc_profile")
    if image.mode == "CMYK":
        return in_srgb(image, profile, rgb)
    return rgb if deferred else in_srgb(rgb, profile)


def _to_rgb(image: Image.Image, uri: str) -> Image.Image:
    import numpy as np
    from PIL import Image

    if image.mode in SIXTEEN_BIT:
        key = image.info.get("transparency")
        opaque = np.asarray(image) != key if isinstance(key, int) else None
        image = _sixteen_to_eight(image, uri)
        if opaque is not None:  # a PNG tRNS key: pixels of that value are transparent
            image = image.convert("LA")
            image.putalpha(Image.fromarray(opaque.astype(np.uint8) * 255, "L"))
    if image.mode == "La":  # premultiplied (a TIFF's associated alpha): Pillow goes via LA only
        image = image.convert("LA")
    if image.mode in TRANSPARENT or "transparency" in image.info:  # alpha, or a tRNS key
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in ("RGB", "L", "1", "P", "CMYK", "YCbCr"):
        return image.convert("RGB")
    raise InputError("decode", f"{uri} has unsupported image mode {image.mode!r}; expected RGB, "
                     "grayscale, palette, 16-bit, CMYK or images with alpha")


def in_srgb(image: Image.Image, profile: bytes | None, otherwise: Image.Image | None = None
             ) -> Image.Image:
    """`image` (RGB or CMYK) converted from its embedded ICC `profile` to 8-bit sRGB RGB. Without
    a profile, or one that cannot be read or describes another colour space (a gray profile, a
    CMYK one on an image already RGB, a damaged one), the values are taken as stored: `image`
    itself, or `otherwise`."""
    transform = _srgb_transform(profile, image.mode) if profile else None
    if transform is None:
        return image if otherwise is None else otherwise
    return transform.apply(image)


@functools.lru_cache(maxsize=16)  # a dataset's photos share a few profiles (a camera's, P3)
def _srgb_transform(profile: bytes, mode: str):
    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if source.profile.xcolor_space.strip() != mode:
            return None
        # no one-pixel cache: one transform may serve several threads (inspect's reads)
        return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), mode, "RGB",
                                       flags=ImageCms.Flags.NOCACHE)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def to_mask(image: Image.Image, uri: str) -> Image.Image:
    """8-bit grayscale mask (white = synthesize); colour profiles do not apply to masks."""
    if image.mode in SIXTEEN_BIT:
        image = _sixteen_to_eight(image, uri)
    if image.mode in ("F", "LAB", "HSV"):
        raise InputError("decode", f"mask {uri} has unsupported mode {image.mode!r}")
    try:
        return (image.convert("LA") if image.mode == "La" else image).convert("L")  # luminance
    except Exception as error:  # as in to_rgb
        raise InputError("decode", f"cannot convert mask {uri} (mode {image.mode!r}) to "
                         f"grayscale ({_reason(error)})") from error


def _sixteen_to_eight(image: Image.Image, uri: str) -> Image.Image:
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    if values.size and (values.min() < 0 or values.max() > 65535):  # mode I: 32-bit integers
        raise InputError("decode", f"{uri} is a 32-bit integer image with values from "
                         f"{values.min():.0f} to {values.max():.0f}; expected 8-bit or 16-bit "
                         "values (0-65535)")
    return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), "L")


def fit(image: Image.Image, resolution: int, resample: int,
        box: tuple[float, ...] | None = None) -> Image.Image:
    """Center-crop to a square and resize to resolution x resolution; with `box` (left, top,
    right, bottom: `drafted_box`), the square is centred in that part of the image."""
    from PIL import ImageOps

    if box is None:
        return ImageOps.fit(image, (resolution, resolution), method=resample)
    left, top, right, bottom = box
    side = min(right - left, bottom - top)  # as ImageOps.fit crops, in the box
    left, top = left + (right - left - side) / 2, top + (bottom - top - side) / 2
    return image.resize((resolution, resolution), resample, box=(left, top, left + side,
                                                                 top + side))
