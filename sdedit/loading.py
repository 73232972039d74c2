"""Load diffusion priors: diffusers-format pixel models from a folder, any fsspec URI or the hub.

A prior folder holds a UNet2DModel (config.json + weights) and a scheduler config, either side
by side at the root or in `unet/` and `scheduler/` subfolders (a pipeline folder). DDPM and DDIM
schedulers give a VP schedule, ScoreSdeVe gives a VE schedule. Weights load from safetensors
only, unless the caller opts in to pickle checkpoints. torch and diffusers are imported where a
network or schedule is built: `describe` of a folder reads configs and hashes a file only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from sdedit.models import Prior
    from sdedit.schedules import Schedule

PRIORS_DIR = Path(__file__).parent / "priors"
SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS = "diffusion_pytorch_model.bin"
VP_SCHEDULERS = {"DDPMScheduler", "DDIMScheduler"}
VE_SCHEDULERS = {"ScoreSdeVeScheduler"}
_LEGACY_NAME = re.compile(r"[0-9a-f]{32}")  # model cache folder names of earlier releases
DAY_SECONDS = 24 * 3600


# userinfo up to the authority's last '@' (a password may hold an unencoded one)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@\s:?#]*)"
                       r"(?P<password>:[^/\s?#]*)?@")
# a value ends where the URI does; a ':' right before the end is the message's, not the value's
_SECRET_QUERY = re.compile(r"(?P<name>[?&;][^=&\s#]*(?:token|sig|secret|pass|key|credential|auth|"
                           r"session)[^=&\s#]*=)[^&\s#'\"]*?(?=:?(?:[\s&#'\"]|$))",
                           re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the credentials URIs in it may carry masked: the password of
    `scheme://user:password@` (a lone userinfo, often a token, entirely) and the values of
    secret-looking query parameters (token, sig, X-Amz-Signature, key, ...)."""
    def userinfo(match: re.Match) -> str:
        user = f"{match['user']}:***" if match["password"] is not None else "***"
        return f"{match['scheme']}{user}@"

    return _SECRET_QUERY.sub(r"\g<name>***", _USERINFO.sub(userinfo, text))


class ModelLoadError(RuntimeError):
    """A prior could not be loaded; the message says which URI and what was expected."""


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

    uri = "default" if uri is None else str(uri)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype)
    if uri.startswith("builtin:"):
        from sdedit.builtin import build_builtin

        unet, schedule = build_builtin(uri.removeprefix("builtin:"))
        name, digest = uri, _state_digest(unet)
    else:
        folder = _local_folder(uri, storage_options or {}, allow_pickle)
        unet, schedule, digest = _load_folder(folder, uri, allow_pickle)
        name = redact(uri)
    adapter = UNetAdapter(unet.to(device), torch_dtype, channels_last, compile)
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
    parts = _folder_parts(_local_folder(uri, storage_options or {}, allow_pickle), uri,
                          allow_pickle)
    return PriorInfo(redact(uri), _file_digest(parts.weights), int(_resolution(parts.unet_config)),
                     int(parts.unet_config.get("in_channels", 3)))


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
    what its listing says of every file, so a model replaced at the same URI is fetched again
    instead of served stale; the copies of its earlier versions are then removed."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **storage_options)
    fs.invalidate_cache(root)  # a listing cached earlier in this process may predate a change
    if not fs.isdir(root):
        raise ModelLoadError(f"model folder {uri} does not exist or is not a folder")
    files = fs.find(root, detail=True)
    cache = Path(os.environ.get("SDEDIT_CACHE", Path.home() / ".cache" / "sdedit")) / "models"
    target = cache / _listing_key(uri, root, files)
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".partial-"))
    try:
        for remote in files:
            local = staging / os.path.relpath(remote, root)
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(local))
        staging.rename(target)
    except OSError:  # renaming onto a folder that exists fails with ENOTEMPTY, not EEXIST
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():  # not another process winning the race to the same folder
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _prune_cache(cache, keep=target)
    return target


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


# Listing fields that change when an object's content does (S3/GCS/Azure/local spellings).
_VERSION_FIELDS = ("ETag", "etag", "md5Hash", "crc32c", "content_md5", "LastModified",
                   "last_modified", "updated", "mtime")


def _listing_key(uri: str, root: str, files: dict) -> str:
    """Cache folder name: "<digest of the URI>-<digest of each file's path, size and version
    fields>", so the copies of one URI's versions share the part before the dash."""
    digest = hashlib.sha256()
    for path in sorted(files):
        info = files[path]
        versions = [str(info[name]) for name in _VERSION_FIELDS if info.get(name) is not None]
        digest.update(repr((os.path.relpath(path, root), info.get("size"), versions)).encode())
    return f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{digest.hexdigest()[:24]}"


def _fetch_hub(repo_id: str, allow_pickle: bool) -> Path:
    suffixes = ["json", "safetensors", *(["bin"] if allow_pickle else [])]
    patterns = [f"{prefix}*.{suffix}" for prefix in ("", "*/") for suffix in suffixes]
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns))
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
    scheduler_config: dict


def _folder_parts(folder: Path, uri: str, allow_pickle: bool) -> _FolderParts:
    """Find and check a prior folder's pieces (flat or unet/ + scheduler/ layout): the one
    place both `load` and `describe` refuse a folder, so they refuse the same ones."""
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    scheduler_dir = folder / "scheduler" if (folder / "scheduler").is_dir() else folder
    unet_config = _read_json(unet_dir / "config.json", uri)
    if unet_config.get("_class_name") != "UNet2DModel":
        raise ModelLoadError(f"model {uri}: expected a UNet2DModel, found "
                             f"{unet_config.get('_class_name')!r} in {unet_dir / 'config.json'}")
    weights = _weights_file(unet_dir, uri, allow_pickle)
    scheduler_config = _read_json(scheduler_dir / "scheduler_config.json", uri)
    check_scheduler(scheduler_config, uri)
    return _FolderParts(unet_dir, unet_config, weights, scheduler_config)


def _load_folder(folder: Path, uri: str, allow_pickle: bool):
    parts = _folder_parts(folder, uri, allow_pickle)
    schedule = schedule_from_config(parts.scheduler_config, uri)
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(
        parts.unet_dir, use_safetensors=parts.weights.suffix == ".safetensors",
        low_cpu_mem_usage=False,
    )
    return unet, schedule, _file_digest(parts.weights)


def _read_json(path: Path, uri: str) -> dict:
    if not path.exists():
        raise ModelLoadError(f"model {uri}: missing {path.name} (looked in {path.parent})")
    return json.loads(path.read_text())


def _weights_file(unet_dir: Path, uri: str, allow_pickle: bool) -> Path:
    if (unet_dir / SAFE_WEIGHTS).exists():
        return unet_dir / SAFE_WEIGHTS
    if (unet_dir / PICKLE_WEIGHTS).exists():
        if allow_pickle:
            return unet_dir / PICKLE_WEIGHTS
        raise ModelLoadError(f"model {uri} has only pickle weights ({PICKLE_WEIGHTS}); pickle "
                             "can run arbitrary code, so pass allow_pickle=True (--allow-pickle) "
                             "only if you trust the source")
    raise ModelLoadError(f"model {uri}: no {SAFE_WEIGHTS} in {unet_dir}")


def check_scheduler(config: dict, uri: str = "<config>") -> str:
    """The scheduler class a diffusers scheduler config names, if this package supports it."""
    kind = config.get("_class_name")
    if kind not in VP_SCHEDULERS | VE_SCHEDULERS:
        raise ModelLoadError(f"model {uri}: unsupported scheduler {kind!r}; expected one of "
                             f"{sorted(VP_SCHEDULERS | VE_SCHEDULERS)}")
    if kind in VP_SCHEDULERS and config.get("prediction_type", "epsilon") != "epsilon":
        raise ModelLoadError(f"model {uri}: only epsilon prediction is supported, got "
                             f"prediction_type={config['prediction_type']!r}")
    return kind


def schedule_from_config(config: dict, uri: str = "<config>") -> Schedule:
    """Build the VP or VE schedule a diffusers scheduler config describes."""
    from sdedit.schedules import VESchedule, VPSchedule

    if check_scheduler(config, uri) in VP_SCHEDULERS:
        from diffusers import DDPMScheduler

        return VPSchedule(DDPMScheduler.from_config(config).betas)
    sigma_min, sigma_max = config.get("sigma_min", 0.01), config.get("sigma_max", 1348.0)
    return VESchedule(float(sigma_min), float(sigma_max))


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
