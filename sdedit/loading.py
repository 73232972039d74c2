"""Load diffusion priors: diffusers-format pixel models from a folder, any fsspec URI or the hub.

A prior folder holds a UNet2DModel (config.json + weights) and a scheduler config, either side
by side at the root or in `unet/` and `scheduler/` subfolders (a pipeline folder). DDPM and DDIM
schedulers give a VP schedule, ScoreSdeVe gives a VE schedule. Weights load from safetensors
only, unless the caller opts in to pickle checkpoints. torch and diffusers are imported where a
network or schedule is built: `describe` of a folder reads its configs and the safetensors
header of its weights and hashes the weights file, and refuses what `load` would refuse where
that shows without building anything. Remote folders are copied into a local cache keyed by
the versions (ETag, Last-Modified, ...) their store reports; failures name the URI with its
credentials masked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:
    import torch

    from sdedit.models import Prior
    from sdedit.schedules import Schedule

PRIORS_DIR = Path(__file__).parent / "priors"
SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS = "diffusion_pytorch_model.bin"
VP_SCHEDULERS = {"DDPMScheduler", "DDIMScheduler"}
VE_SCHEDULERS = {"ScoreSdeVeScheduler"}
# What a prior is loaded from, flat or in unet/ and scheduler/ (`_folder_parts`): all that is
# copied from a remote folder or the hub.
MODEL_FILES = frozenset({"model_index.json"} | {
    f"{folder}{name}" for folder in ("", "unet/", "scheduler/")
    for name in ("config.json", "scheduler_config.json", SAFE_WEIGHTS, PICKLE_WEIGHTS)})
_LEGACY_NAME = re.compile(r"[0-9a-f]{32}")  # model cache folder names of earlier releases
DAY_SECONDS = 24 * 3600


# userinfo up to the authority's last '@' (a password may hold an unencoded one), or, for a
# password with a '/' (common in AWS secret keys) and not a port and path (host:80/a@2x.png),
# up to its first '@'
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@\s:?#]*)"
                       r"(?P<password>:(?:[^/\s?#]*|(?!\d+/)[^@\s?#]*))?@")
_ECHOED = 8  # secrets this long are also masked where a message repeats them outside a URI
# a value ends where the URI does; a ':' right before the end is the message's, not the value's
_SECRET_QUERY = re.compile(r"(?P<name>[?&;][^=&\s#]*(?:token|sig|secret|pass|key|credential|auth|"
                           r"session)[^=&\s#]*=)(?P<value>[^&\s#'\"]*?)(?=:?(?:[\s&#'\"]|$))",
                           re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the credentials URIs in it may carry masked: the password of
    `scheme://user:password@` (a lone userinfo, often a token, entirely) and the values of
    secret-looking query parameters (token, sig, X-Amz-Signature, key, ...). Passwords and
    such values of _ECHOED characters or more are also masked where the rest of the text
    repeats them as a whole word, as written or decoded (a store's error quoting
    `"key:secret@bucket"` as a bucket name), so a message should name the URI it is about."""
    secrets = set()

    def userinfo(match: re.Match) -> str:
        if match["password"] is not None:
            secrets.add(match["password"][1:])
        user = f"{match['user']}:***" if match["password"] is not None else "***"
        return f"{match['scheme']}{user}@"

    def query(match: re.Match) -> str:
        secrets.add(match["value"])
        return f"{match['name']}***"

    masked = _SECRET_QUERY.sub(query, _USERINFO.sub(userinfo, text))
    echoed = {form for secret in secrets for form in (secret, unquote(secret))
              if len(form) >= _ECHOED}
    for secret in sorted(echoed, key=len, reverse=True):
        masked = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "***", masked)
    return masked


class ModelLoadError(RuntimeError):
    """A prior could not be loaded; the message says which URI and what was expected."""


class ModelFetchError(ModelLoadError, OSError):
    """A remote model folder could not be listed or copied (an unreachable store, refused
    credentials, a file the server does not serve). Also an OSError, so callers that tell
    storage failures from other errors (`sdedit run`, through `tasks.images.storage_step`)
    still see a storage failure. The message names the URI with its credentials masked."""


def load(
    uri: str | os.PathLike | None = "default",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    storage_options: dict | None = None,
) -> Prior:
    """Load a prior from "default", "builtin:tiny[-ve]", a folder, an fsspec URI or a hub id."""
    import torch

    from sdedit.models import Prior, UNetAdapter, resolve_dtype
    from sdedit.schedules import VESchedule

    uri = "default" if uri is None else str(uri)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype)
    if uri.startswith("builtin:"):
        from sdedit.builtin import build_builtin

        unet, schedule = build_builtin(uri.removeprefix("builtin:"))
        name, digest = uri, _state_digest(unet)
    else:
        folder = _local_folder(uri, storage_options or {}, allow_pickle)
        unet, schedule, digest = _load_folder(folder, redact(uri), allow_pickle)
        name = redact(uri)
    unit_range = isinstance(schedule, VESchedule)  # see UNetAdapter
    if unit_range:
        schedule = VESchedule(2 * schedule.sigma_min, 2 * schedule.sigma_max)
    adapter = UNetAdapter(unet.to(device), torch_dtype, channels_last, compile, unit_range)
    config = unet.config
    return Prior(adapter, schedule, int(_resolution(config)), int(config.in_channels), name,
                 digest, device)


@dataclass(frozen=True)
class PriorInfo:
    """What a prior is, without its network: name, weights digest and image shape."""

    name: str
    digest: str
    resolution: int
    channels: int
    config_digest: str | None = None  # of the UNet and scheduler configs; None for builtins


def describe(
    uri: str | os.PathLike | None = "default",
    allow_pickle: bool = False,
    storage_options: dict | None = None,
) -> PriorInfo:
    """The name, digest and image shape `load(uri)` would give, read from the folder's configs
    and a hash of its weights file, without building the network (builtin models are built,
    as their digest is that of their weights). Raises the same ModelLoadError as `load`."""
    uri = "default" if uri is None else str(uri)
    if uri.startswith("builtin:"):
        prior = load(uri, device="cpu")
        return PriorInfo(prior.name, prior.digest, prior.resolution, prior.channels)
    parts = _folder_parts(_local_folder(uri, storage_options or {}, allow_pickle), redact(uri),
                          allow_pickle)
    return PriorInfo(redact(uri), _file_digest(parts.weights), int(_resolution(parts.unet_config)),
                     int(parts.unet_config.get("in_channels", 3)),
                     config_digest(parts.unet_config, parts.scheduler_config))


def _resolution(config) -> int:
    size = config["sample_size"] if isinstance(config, dict) else config.sample_size
    return size[0] if isinstance(size, list | tuple) else size


def _local_folder(uri: str, storage_options: dict, allow_pickle: bool) -> Path:
    if uri == "default":
        folder = PRIORS_DIR / "default"
        if not (folder / "config.json").exists() and not (folder / "unet").exists():
            raise ModelLoadError(f"the bundled default prior is missing from {folder}; "
                                 "reinstall the package or pass --model")
        return folder
    if "://" in uri and not uri.startswith("file://"):
        return _fetch_remote(uri, storage_options)
    path = Path(uri.removeprefix("file://")).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model URI {uri} is a file; expected a diffusers-format folder")
        return path
    if uri.count("/") == 1 and not uri.startswith((".", "/", "~")):
        return _fetch_hub(uri, allow_pickle)
    raise ModelLoadError(f"model folder {uri} does not exist")


def _fetch_remote(uri: str, storage_options: dict) -> Path:
    """Copy a remote model folder into a local cache (atomic rename), keyed by the URI and by
    what the store says of every file's version, so a model replaced at the same URI is
    fetched again instead of served stale; the copies of its earlier versions are then
    removed. A folder whose files carry no version (a web server without ETag or
    Last-Modified) is fetched on every call and cached under a digest of its content.
    Only the files a prior is loaded from are copied (`MODEL_FILES`: not, say, the trainer's
    checkpoint/ beside them). Failures are ModelFetchErrors naming the URI without its
    credentials."""
    fs, root = _remote_fs(uri, storage_options)
    with _fetching(uri, "list the folder"):
        fs.invalidate_cache(root)  # a listing cached earlier in this process may predate a change
        if not fs.isdir(root):
            raise ModelLoadError(f"model folder {redact(uri)} does not exist or is not a folder")
        files = {path: _versioned(fs, path, info)
                 for path, info in fs.find(root, detail=True).items()
                 if os.path.relpath(path, root) in MODEL_FILES}
    cache = Path(os.environ.get("SDEDIT_CACHE", Path.home() / ".cache" / "sdedit")) / "models"
    key = _listing_key(uri, root, files)
    if key is not None and (cache / key).exists():
        return cache / key
    cache.mkdir(parents=True, exist_ok=True)
    staging = _download(fs, root, files, cache, uri)
    target = cache / (key or _content_key(uri, staging))
    try:
        staging.rename(target)
    except OSError:  # renaming onto a folder that exists fails with ENOTEMPTY, not EEXIST
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():  # not another process (or an identical copy) there already
            raise
    _prune_cache(cache, keep=target)
    return target


def _remote_fs(uri: str, storage_options: dict):
    """fsspec's file system and path for `uri`; an unknown protocol or a missing client
    library is a ModelLoadError (a storage option it does not take stays a TypeError, which
    callers report as that)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri, **storage_options)
    except (ValueError, ImportError) as error:
        raise ModelLoadError(redact(f"model {uri}: cannot open its file system: "
                                    f"{type(error).__name__}: {error}")) from error


@contextmanager
def _fetching(uri: str, what: str) -> Iterator[None]:
    """Raise what the store or its client library raises in the block as a ModelFetchError
    saying what could not be done, credentials masked (the store's text may repeat them);
    ModelLoadErrors pass, and so does the TypeError of a storage option the file system does
    not take (the caller's mistake, reported by `sdedit run`)."""
    try:
        yield
    except (ModelLoadError, TypeError):
        raise
    except Exception as error:  # fsspec and its clients (aiohttp, botocore...) raise many types
        raise ModelFetchError(redact(f"model {uri}: could not {what}: {type(error).__name__}: "
                                     f"{error}")) from error


def _download(fs, root: str, files: dict, cache: Path, uri: str) -> Path:
    """Copy every listed file into a new staging folder under `cache`; removed on failure."""
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".partial-"))
    try:
        for remote in files:
            relative = os.path.relpath(remote, root)
            local = staging / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            with _fetching(uri, f"copy {relative}"):
                fs.get_file(remote, str(local))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _prune_cache(cache: Path, keep: Path) -> None:
    """Remove what a new copy of a model leaves useless: copies of the same URI's earlier
    versions (same URI part of the name), folders named as earlier releases named them (32 hex
    digits, never read again) and downloads killed more than a day ago."""
    uri_part = keep.name.split("-")[0]
    for folder in cache.iterdir():
        stale = (folder.name.startswith(uri_part + "-") and folder != keep
                 or _LEGACY_NAME.fullmatch(folder.name) is not None
                 or folder.name.startswith(".partial-") and _age_seconds(folder) > DAY_SECONDS)
        if stale and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def _age_seconds(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:  # another process finished or removed it meanwhile
        return 0.0


# Listing fields that change when an object's content does (S3/GCS/Azure/local spellings, and
# the headers of an http(s) HEAD as fsspec's http file system reports them).
_VERSION_FIELDS = ("ETag", "etag", "md5Hash", "crc32c", "content_md5", "LastModified",
                   "last_modified", "updated", "mtime", "Last-Modified", "Content-MD5", "Digest")


def _versions(info: dict) -> list[str]:
    return [str(info[name]) for name in _VERSION_FIELDS if info.get(name) is not None]


def _versioned(fs, path: str, info: dict) -> dict:
    """A listing entry with its size and version fields: where the listing gives neither (an
    http(s) folder's index page names files only), what `fs.info` says (a HEAD request: size,
    ETag, Last-Modified)."""
    if info.get("size") is not None and _versions(info):
        return info
    return {**info, **fs.info(path)}


def _listing_key(uri: str, root: str, files: dict) -> str | None:
    """Cache folder name: "<digest of the URI>-<digest of each file's path, size and version
    fields>", so the copies of one URI's versions share the part before the dash; None when a
    file has no version field, as nothing then tells a replaced file from the cached one."""
    digest = hashlib.sha256()
    for path in sorted(files):
        info = files[path]
        if not _versions(info):
            return None
        digest.update(repr((os.path.relpath(path, root), info.get("size"),
                            _versions(info))).encode())
    return f"{_uri_part(uri)}-{digest.hexdigest()[:24]}"


def _content_key(uri: str, folder: Path) -> str:
    """Cache folder name of a copy whose listing said nothing of versions: as `_listing_key`,
    with a digest of each file's path and content after the dash."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(repr((path.relative_to(folder).as_posix(), _file_digest(path))).encode())
    return f"{_uri_part(uri)}-{digest.hexdigest()[:24]}"


def _uri_part(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def hub_files(allow_pickle: bool) -> list[str]:
    """The files of a hub repository a prior is loaded from (exact names: not a pipeline's text
    encoder, VAE or fp16 variants, which `*` patterns matched); pickle weights only with
    `allow_pickle`."""
    return sorted(name for name in MODEL_FILES if allow_pickle or PICKLE_WEIGHTS not in name)


def _fetch_hub(repo_id: str, allow_pickle: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=hub_files(allow_pickle)))
    except Exception as error:  # the hub client raises many types; all mean "not reachable"
        raise ModelLoadError(
            f"could not fetch model {repo_id} from the Hugging Face hub ({type(error).__name__}: "
            f"{error}); no local folder {repo_id!r} exists either. If this machine is offline, "
            "download the folder elsewhere and pass its path or URI"
        ) from error


@dataclass(frozen=True)
class _FolderParts:
    unet_dir: Path
    unet_config: dict
    weights: Path
    scheduler_file: Path
    scheduler_config: dict


def _folder_parts(folder: Path, uri: str, allow_pickle: bool) -> _FolderParts:
    """Find and check a prior folder's pieces (flat or unet/ + scheduler/ layout): the one
    place both `load` and `describe` refuse a folder, so they refuse the same ones. It checks
    what can be checked without torch: both configs, the scheduler's settings, and that a
    safetensors file is whole and holds the shapes the config names (its header only)."""
    _check_pixel_pipeline(folder, uri)
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    scheduler_dir = folder / "scheduler" if (folder / "scheduler").is_dir() else folder
    config_file = unet_dir / "config.json"
    unet_config = _read_json(config_file, uri)
    if unet_config.get("_class_name") != "UNet2DModel":
        raise ModelLoadError(f"model {uri}: expected a UNet2DModel, found "
                             f"{unet_config.get('_class_name')!r} in {config_file}")
    _check_sample_size(unet_config, config_file, uri)
    _check_unconditional(unet_config, config_file, uri)
    channels = unet_config.get("in_channels", 3), unet_config.get("out_channels", 3)
    if channels[0] != channels[1]:
        raise ModelLoadError(f"model {uri}: {config_file} has in_channels={channels[0]} and "
                             f"out_channels={channels[1]}; expected an epsilon (or score) "
                             "model, which returns as many channels as it takes (models that "
                             "also predict variances are not supported)")
    weights = _weights_file(unet_dir, uri, allow_pickle)
    scheduler_file = scheduler_dir / "scheduler_config.json"
    scheduler_config = _read_json(scheduler_file, uri)
    _check_pairing(unet_config, check_scheduler(scheduler_config, uri), config_file, uri)
    if weights.suffix == ".safetensors":
        _check_weights(weights, unet_config, config_file, uri)
    return _FolderParts(unet_dir, unet_config, weights, scheduler_file, scheduler_config)


def _load_folder(folder: Path, uri: str, allow_pickle: bool):
    """Build the schedule and the UNet; what diffusers still refuses (a config it cannot build,
    weights that do not fit it beyond what `_folder_parts` checks) is a ModelLoadError naming
    the URI and the file."""
    parts = _folder_parts(folder, uri, allow_pickle)
    try:
        schedule = schedule_from_config(parts.scheduler_config, uri)
    except ModelLoadError:
        raise
    except Exception as error:  # diffusers raises NotImplementedError, ValueError, TypeError...
        raise ModelLoadError(f"model {uri}: cannot build the schedule {parts.scheduler_file}: "
                             f"{type(error).__name__}: {error}") from error
    from diffusers import UNet2DModel

    try:
        unet, loading = UNet2DModel.from_pretrained(
            parts.unet_dir, use_safetensors=parts.weights.suffix == ".safetensors",
            low_cpu_mem_usage=False, output_loading_info=True,
        )
    except Exception as error:  # a size mismatch is a RuntimeError, a bad file an OSError...
        raise ModelLoadError(f"model {uri}: cannot build the UNet from {parts.unet_dir} "
                             f"(config.json, {parts.weights.name}): {type(error).__name__}: "
                             f"{error}") from error
    if missing := sorted(loading.get("missing_keys") or ()):
        # diffusers fills them with random values: every load would edit differently
        raise ModelLoadError(f"model {uri}: the weights {parts.weights.name} lack "
                             f"{len(missing)} tensors the UNet of its config.json has (e.g. "
                             f"{', '.join(missing[:3])}); expected every weight of the model "
                             "(a file cut short, or saved from another architecture?)")
    _check_finite(unet, uri, parts.weights)
    return unet, schedule, _file_digest(parts.weights)


def _check_finite(unet: torch.nn.Module, uri: str, weights: Path) -> None:
    """Refuse weights holding NaN or infinity (a training run that diverged): every image such a
    network makes is NaN, written as black."""
    import torch

    bad = [name for name, tensor in unet.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ModelLoadError(f"model {uri}: weights in {weights.name} hold NaN or infinite "
                             f"values ({len(bad)} tensors, e.g. {bad[0]}); was it saved from a "
                             "training run that diverged?")


def _check_pixel_pipeline(folder: Path, uri: str) -> None:
    """A pipeline folder with more than a UNet and a scheduler (a VAE or VQ-VAE of a latent
    model, a text encoder) is not a pixel prior: its UNet works on latents, and SDEdit on
    images with it runs without error but gives noise."""
    index = folder / "model_index.json"
    if not index.exists():
        return
    pipeline = _read_json(index, uri)
    others = sorted(name for name, value in pipeline.items() if not name.startswith("_")
                    and name not in ("unet", "scheduler") and value not in (None, [None, None]))
    if others:
        raise ModelLoadError(f"model {uri}: {index} describes a "
                             f"{pipeline.get('_class_name', 'pipeline')} with {', '.join(others)} "
                             "besides its UNet and scheduler (a latent or conditioned model); "
                             "expected a pixel-space prior: a UNet2DModel on images with a DDPM, "
                             "DDIM or ScoreSdeVe scheduler")


def _read_json(path: Path, uri: str) -> dict:
    if not path.exists():
        raise ModelLoadError(f"model {uri}: missing {path.name} (looked in {path.parent})")
    try:
        values = json.loads(path.read_bytes())
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError both are
        raise ModelLoadError(f"model {uri}: {path} is not valid JSON ({error})") from error
    if not isinstance(values, dict):
        raise ModelLoadError(f"model {uri}: {path} holds a JSON {type(values).__name__}; "
                             "expected an object")
    return values


def _check_sample_size(config: dict, config_file: Path, uri: str) -> None:
    """The model's resolution must be in its config: a positive integer, or [height, width]."""
    size = config.get("sample_size")
    sizes = size if isinstance(size, list) and size else [size]
    if not all(isinstance(side, int) and not isinstance(side, bool) and side > 0
               for side in sizes):
        raise ModelLoadError(f"model {uri}: {config_file} has sample_size={size!r}; expected "
                             "the image resolution, a positive integer (or [height, width])")
    if len(set(sizes)) > 1:  # guides are made square at the resolution
        raise ModelLoadError(f"model {uri}: {config_file} has sample_size={size!r} (height, "
                             "width); only square models are supported")


def _check_unconditional(config: dict, config_file: Path, uri: str) -> None:
    """SDEdit here calls the network with the image and the time alone: a class-conditioned
    UNet fails at its first call (diffusers wants class labels)."""
    conditioning = {name: config[name] for name in ("num_class_embeds", "class_embed_type")
                    if config.get(name) is not None}
    if conditioning:
        settings = ", ".join(f"{name}={value!r}" for name, value in conditioning.items())
        raise ModelLoadError(f"model {uri}: {config_file} describes a class-conditioned UNet "
                             f"({settings}); expected an unconditional pixel-space prior")


def _check_pairing(unet_config: dict, scheduler: str, config_file: Path, uri: str) -> None:
    """A UNet of Fourier time embeddings (NCSN++) takes the log of a VE noise level; with a VP
    scheduler it gets step indices from 0 and every edit is NaN."""
    if (unet_config.get("time_embedding_type") == "fourier"
            and scheduler not in VE_SCHEDULERS):
        raise ModelLoadError(
            f"model {uri}: {config_file} has time_embedding_type='fourier' (a VE, NCSN++-style "
            f"network, which takes noise levels) but the scheduler is {scheduler}; expected "
            "ScoreSdeVeScheduler with it")


def _weights_file(unet_dir: Path, uri: str, allow_pickle: bool) -> Path:
    if (unet_dir / SAFE_WEIGHTS).exists():
        return unet_dir / SAFE_WEIGHTS
    if (unet_dir / PICKLE_WEIGHTS).exists():
        if allow_pickle:
            return unet_dir / PICKLE_WEIGHTS
        raise ModelLoadError(f"model {uri} has only pickle weights ({PICKLE_WEIGHTS}); pickle "
                             "can run arbitrary code, so pass allow_pickle=True (--allow-pickle) "
                             "only if you trust the source")
    raise ModelLoadError(f"model {uri}: no {SAFE_WEIGHTS} in {unet_dir}" + (
        "" if allow_pickle else f" ({PICKLE_WEIGHTS} is fetched and loaded only with "
                                "allow_pickle=True, --allow-pickle)"))


def _check_weights(weights: Path, config: dict, config_file: Path, uri: str) -> None:
    """Read the safetensors header (names and shapes; safetensors checks that the data it
    describes is all there) and compare the shapes `_expected_shapes` knows with the config."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as tensors:
            names = tensors.keys()  # noqa: SIM118 (a safe_open handle is not iterable)
            shapes = {name: tensors.get_slice(name).get_shape() for name in names}
    except Exception as error:  # safetensors raises its own SafetensorError, or an OSError
        raise ModelLoadError(f"model {uri}: cannot read the weights {weights} "
                             f"({type(error).__name__}: {error}); expected a complete "
                             "safetensors file") from error
    for name, dim, expected, field in _expected_shapes(config):
        shape = shapes.get(name)
        if shape is not None and (len(shape) <= dim or shape[dim] != expected):
            raise ModelLoadError(f"model {uri}: the weights {weights} do not match "
                                 f"{config_file}: {name} has shape {list(shape)}, whose "
                                 f"dimension {dim} should be {field} = {expected}")


def _expected_shapes(config: dict) -> list[tuple[str, int, int, str]]:
    """(tensor name, dimension, size, config field) that diffusers' UNet2DModel gives its
    input and output convolutions and each level's first ResNet: the widths a config from
    another model gets wrong. A tensor of another size fails `load` with a size mismatch;
    a missing one does not (diffusers initialises it at random; `_load_folder` refuses that
    once the UNet is built), so only present tensors are checked here."""
    expected = [("conv_in.weight", 1, config.get("in_channels", 3), "in_channels"),
                ("conv_out.weight", 0, config.get("out_channels", 3), "out_channels")]
    widths = config.get("block_out_channels")
    if isinstance(widths, list) and widths:
        expected += [("conv_in.weight", 0, widths[0], "block_out_channels[0]"),
                     ("conv_out.weight", 1, widths[0], "block_out_channels[0]")]
        expected += [(f"down_blocks.{level}.resnets.0.conv1.weight", 0, width,
                      f"block_out_channels[{level}]") for level, width in enumerate(widths)]
    return expected


# The beta_schedule names diffusers' DDPMScheduler builds (`schedule_from_config` builds every
# VP schedule with it); others raise NotImplementedError there.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")


def check_scheduler(config: dict, uri: str = "<config>") -> str:
    """The scheduler class a diffusers scheduler config names, if this package supports it
    and can build its schedule (VP: a beta_schedule DDPMScheduler knows, or trained_betas;
    VE: 0 < sigma_min < sigma_max)."""
    kind = config.get("_class_name")
    if kind not in VP_SCHEDULERS | VE_SCHEDULERS:
        raise ModelLoadError(f"model {uri}: unsupported scheduler {kind!r}; expected one of "
                             f"{sorted(VP_SCHEDULERS | VE_SCHEDULERS)}")
    if kind in VP_SCHEDULERS and config.get("prediction_type", "epsilon") != "epsilon":
        raise ModelLoadError(f"model {uri}: only epsilon prediction is supported, got "
                             f"prediction_type={config['prediction_type']!r}")
    beta_schedule = config.get("beta_schedule", "linear")
    if (kind in VP_SCHEDULERS and config.get("trained_betas") is None
            and beta_schedule not in BETA_SCHEDULES):
        raise ModelLoadError(f"model {uri}: unsupported beta_schedule {beta_schedule!r} in its "
                             f"scheduler config; expected one of {list(BETA_SCHEDULES)} or "
                             "trained_betas")
    if kind in VE_SCHEDULERS:
        _check_sigmas(config, uri)
    return kind


def _check_sigmas(config: dict, uri: str) -> None:
    sigmas = config.get("sigma_min", 0.01), config.get("sigma_max", 1348.0)
    numbers = all(isinstance(s, int | float) and not isinstance(s, bool) for s in sigmas)
    if not (numbers and 0 < sigmas[0] < sigmas[1]):
        raise ModelLoadError(f"model {uri}: the scheduler config has sigma_min={sigmas[0]!r} "
                             f"and sigma_max={sigmas[1]!r}; expected 0 < sigma_min < sigma_max")


def schedule_from_config(config: dict, uri: str = "<config>") -> Schedule:
    """Build the VP or VE schedule a diffusers scheduler config describes."""
    from sdedit.schedules import VESchedule, VPSchedule

    if check_scheduler(config, uri) in VP_SCHEDULERS:
        from diffusers import DDPMScheduler

        return VPSchedule(DDPMScheduler.from_config(config).betas)
    sigma_min, sigma_max = config.get("sigma_min", 0.01), config.get("sigma_max", 1348.0)
    return VESchedule(float(sigma_min), float(sigma_max))


# What a scheduler config decides for this package's samplers (VP: the betas, which
# DDPMScheduler computes from these; VE: the sigma range), with diffusers' defaults.
SCHEDULE_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                     "beta_schedule": "linear", "trained_betas": None,
                     "sigma_min": 0.01, "sigma_max": 1348.0}


def config_digest(unet_config: dict, scheduler_config: dict) -> str:
    """A digest of what a prior's configs decide beyond its weights: the schedule (VP or VE and
    the settings that make its betas or sigmas) and the resolution. The same weights under an
    edited scheduler config edit differently; a config re-saved by another diffusers version,
    or naming a default it left out before, has the same digest."""
    kind = "VE" if scheduler_config.get("_class_name") in VE_SCHEDULERS else "VP"
    decided = {"schedule": kind, "sample_size": unet_config.get("sample_size"),
               **{name: scheduler_config.get(name, default)
                  for name, default in SCHEDULE_DEFAULTS.items()}}
    text = json.dumps(decided, sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _state_digest(module: torch.nn.Module) -> str:
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()
