"""The resolved configuration of one `sdedit run`: a frozen dataclass, validated once at the edge.

Values come from defaults, then a `--config` file (YAML or TOML), then command-line flags;
later sources win. Storage options may hold credentials: `public_dict` masks them, and
nothing else in the pipeline prints the configuration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pipeline.manifest import T0_DECIMALS, distinct_t0
from sdedit.loading import redact
from tasks.images import MAX_PIXELS

Format = Literal["parquet", "webdataset"]
ImageFormat = Literal["png", "jpeg", "webp"]
DType = Literal["float32", "bfloat16", "float16"]
ErrorStage = Literal["read", "decode", "validate", "edit", "encode", "write"]  # where a row failed
SECRET_KEY = re.compile(r"key|secret|token|pass|credential|session|auth|sig|connection_string|"
                        r"cookie", re.IGNORECASE)
URI_FIELDS = ("manifest", "output", "model", "address")  # shown with credentials masked
FLAGS = ("compile", "channels_last", "fast_decode", "overwrite", "allow_pickle")

# Fields that change what the images are: a different value into the same OUTPUT is refused.
OUTPUT_FIELDS = ("model", "t0", "samples", "steps", "repeats", "seed", "task", "format",
                 "image_format", "dtype")
# Switches that change pixels slightly (compile, channels_last: rare pixels by one grey level;
# fast_decode: guides by about one level); recorded only when on, so OUTPUTs made before they
# existed still resume.
OUTPUT_SWITCHES = ("compile", "channels_last", "fast_decode")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option and what was expected."""


@dataclass(frozen=True)
class RunConfig:
    """Everything `sdedit run` needs; `t0`/`samples`/`repeats` None = the task preset's value
    (or 0.5 / 1 / 1 without a task); `steps` None = every step of the prior's schedule."""

    manifest: str
    output: str
    model: str = "default"
    t0: tuple[float, ...] | None = None
    samples: int | None = None
    steps: int | None = None
    repeats: int | None = None
    seed: int = 0
    task: str | None = None
    batch_size: int = 32
    model_batch: int = 8
    rows_per_shard: int = 256
    format: Format = "parquet"
    image_format: ImageFormat = "png"
    dtype: DType = "float32"
    compile: bool = False  # torch.compile the network in each actor (compiles on first batch)
    channels_last: bool = False  # channels-last memory format for the network
    fast_decode: bool = False  # JPEG guides decoded at a reduced scale (tasks.images.open_image)
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    address: str | None = None
    actors: tuple[int, int] | None = None  # None: one per GPU of the cluster, else 1
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    threads: int | None = None  # chunk workers per CPU actor; None: node cores / actors
    max_pixels: int = MAX_PIXELS
    max_error_rate: float = 1.0
    progress_interval: float = 30.0  # seconds between progress lines on stderr; 0: none
    wait_for_output: float = 0.0  # seconds to wait for another run's lease on OUTPUT to end
    wait_for_gpus: float = 0.0  # with gpus_per_actor > 0: seconds to wait for GPU nodes to join
    overwrite: bool = False
    allow_pickle: bool = False  # pickle weights can run code: only for trusted models
    retry_errors: tuple[ErrorStage, ...] = ()  # committed failures of these stages are redone

    def __post_init__(self) -> None:
        for check in (_check_types, _check_sizes, _check_choices, _check_t0, _check_actors,
                      _check_rates, _check_retry):
            check(self)

    def output_record(self, model_digest: str, config_digest: str | None = None) -> dict:
        """The fields that decide the outputs, as stored in OUTPUT/_run_config.json."""
        record = {name: _plain(getattr(self, name)) for name in OUTPUT_FIELDS}
        record["model"] = redact(self.model)
        record.update({name: True for name in OUTPUT_SWITCHES if getattr(self, name)})
        record["model_digest"] = model_digest
        if config_digest:
            record["model_config_digest"] = config_digest
        return record

    def public_dict(self) -> dict:
        """All fields as plain values, with secret-looking storage options masked."""
        values = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        values["storage_options"] = mask_secrets(self.storage_options)
        values.update({name: redact(values[name]) for name in URI_FIELDS if values[name]})
        return values


def _check_types(config: RunConfig) -> None:
    """What a config file can get wrong that flags cannot: `overwrite: "no"` is not false."""
    for name in FLAGS:
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(config, name)!r}")
    for name in ("max_error_rate", "progress_interval", "wait_for_output", "wait_for_gpus",
                 "gpus_per_actor", "cpus_per_actor"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
    for name in ("manifest", "output", "model", "task", "address"):
        value = getattr(config, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
    if not isinstance(config.storage_options, Mapping):
        raise ConfigError("storage_options must be a mapping of option names to values (or, "
                          "as flags, KEY=VALUE strings)")
    if names := _names_not_text(config.storage_options):
        raise ConfigError(f"storage_options names must be text, got {names[0]!r}")


def _names_not_text(options: Mapping) -> list:
    """Keys of `options`, and of mappings nested in it, that are not strings."""
    names = []
    for key, value in options.items():
        if not isinstance(key, str):
            names.append(key)
        elif isinstance(value, Mapping):
            names.extend(_names_not_text(value))
    return names


def _check_sizes(config: RunConfig) -> None:
    for name in ("batch_size", "model_batch", "rows_per_shard", "max_pixels"):
        _positive_int(name, getattr(config, name))
    for name in ("samples", "steps", "repeats", "threads"):
        if getattr(config, name) is not None:
            _positive_int(name, getattr(config, name))
    if isinstance(config.seed, bool) or not isinstance(config.seed, int):
        raise ConfigError(f"seed must be an integer, got {config.seed!r}")


def _check_choices(config: RunConfig) -> None:
    choices = {"format": Format, "image_format": ImageFormat, "dtype": DType}
    for name, kind in choices.items():
        allowed = get_args(kind)
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, "
                              f"got {getattr(config, name)!r}")


def _check_t0(config: RunConfig) -> None:
    if config.t0 is None:
        return
    if not config.t0:
        raise ConfigError("t0 needs at least one value in (0, 1]")
    for value in config.t0:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"t0 values must be numbers in (0, 1], got {value!r}")
    bad = [value for value in config.t0 if not 0.0 < value <= 1.0]
    if bad:
        raise ConfigError(f"t0 values must lie in (0, 1], got {bad[0]}")
    if len(distinct_t0(config.t0)) < len(config.t0):
        raise ConfigError(f"t0 values must differ (to {T0_DECIMALS} decimals), got "
                          f"{', '.join(repr(value) for value in config.t0)}")


def _check_actors(config: RunConfig) -> None:
    low, high = config.actors or (1, 1)
    if low < 1 or high < low:
        raise ConfigError(f"actors must be N or MIN-MAX with 1 <= MIN <= MAX, got {low}-{high}")
    for name in ("gpus_per_actor", "cpus_per_actor"):
        value = getattr(config, name)
        if value is not None and not 0 <= value < math.inf:  # NaN too
            raise ConfigError(f"{name} must be a finite number >= 0, got {value}")


def _check_rates(config: RunConfig) -> None:
    if not 0.0 <= config.max_error_rate <= 1.0:
        raise ConfigError(f"max_error_rate must lie in [0, 1], got {config.max_error_rate}")
    for name in ("progress_interval", "wait_for_output", "wait_for_gpus"):
        if not getattr(config, name) >= 0:
            raise ConfigError(f"{name} must be >= 0 seconds, got {getattr(config, name)}")


def _check_retry(config: RunConfig) -> None:
    unknown = [stage for stage in config.retry_errors if stage not in get_args(ErrorStage)]
    if unknown:
        raise ConfigError(f"retry_errors must name stages among {', '.join(get_args(ErrorStage))} "
                          f"(or all), got {unknown[0]!r}")


def parse_stages(value: str | list | tuple) -> tuple[str, ...]:
    """`read,decode`, `all` or a list of stage names to a tuple of stages."""
    if not isinstance(value, str | list | tuple):
        raise ConfigError(f"retry_errors must be stage names (a comma list, or all), got "
                          f"{value!r}")
    names = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names = [name.strip() for name in names if name.strip()]
    return get_args(ErrorStage) if "all" in names else tuple(dict.fromkeys(names))


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _plain(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def mask_secrets(options: Mapping[str, Any], everything: bool = False) -> dict:
    """A copy of storage options with credential-looking values replaced by "***": those under
    secret-looking names, every header's value (`X-JFrog-Art-Api` carries a key under a name no
    pattern knows), and a URI's password or token wherever it appears (an endpoint, a list of
    proxies). `everything` masks every value, keeping the names."""
    masked = {}
    for key, value in options.items():
        secret = everything or bool(SECRET_KEY.search(str(key)))
        if isinstance(value, Mapping):
            masked[key] = mask_secrets(value, secret or str(key).lower() == "headers")
        else:
            masked[key] = "***" if secret else _redacted(value)
    return masked


def _redacted(value: Any) -> Any:
    """Strings with a URI's credentials masked, in lists too; other values as they are."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list | tuple):
        return [_redacted(item) for item in value]
    return value


def parse_storage_options(pairs: tuple[str, ...] | list[str]) -> dict:
    """`KEY=VALUE` strings to a dict; dotted keys nest (client_kwargs.region_name=x);
    true/false/integers are converted."""
    options: dict = {}
    for pair in pairs:
        if not isinstance(pair, str):
            raise ConfigError(f"storage options as a list must be KEY=VALUE strings, got {pair!r}")
        key, sep, raw = pair.partition("=")
        if not sep or not key:  # never echo what was given: without '=' it may be all secret
            got = "one with no '=' (not shown: it may hold a secret)" if not sep else "no KEY"
            raise ConfigError(f"storage option must look like KEY=VALUE, got {got}")
        *parents, leaf = key.split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = _scalar(raw)
    return options


def _scalar(raw: str) -> object:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if re.fullmatch(r"-?\d+", raw):
        return int(raw)
    return raw


def parse_actors(value: str | int | list | tuple) -> tuple[int, int]:
    """`N` or `MIN-MAX` (or a two-item list) to (min, max)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, list | tuple) and len(value) == 2:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"actors must be N or MIN-MAX, got {value!r}")
        return (value[0], value[1])
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(value))
    if not match:
        raise ConfigError(f"actors must be N or MIN-MAX, got {value!r}")
    low = int(match.group(1))
    return (low, int(match.group(2) or low))


def load_config_file(path: str) -> dict:
    """Options from a YAML (.yaml/.yml) or TOML (.toml) file; keys may use - or _."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = file.read_text()
    if file.suffix == ".toml":
        import tomllib

        parse, errors, kind = tomllib.loads, tomllib.TOMLDecodeError, "TOML"
    elif file.suffix in (".yaml", ".yml", ".json"):
        import yaml

        parse, errors, kind = load_yaml, yaml.YAMLError, "YAML"
    else:
        raise ConfigError(f"config file {path}: expected a .yaml, .yml, .json or .toml file")
    try:
        data = parse(text)
    except errors as error:
        raise ConfigError(f"config file {path} is not valid {kind}: {_parse_reason(error)}"
                          ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of option names to values")
    if names := [key for key in data if not isinstance(key, str)]:
        raise ConfigError(f"config file {path}: option names must be text, got {names[0]!r}")
    options: dict = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in options:
            spelled = [k for k in data if k.replace("-", "_") == name]
            raise ConfigError(f"config file {path} gives option {name} twice, as "
                              f"{spelled[0]} and {spelled[1]}; keep one")
        options[name] = value
    return options


def _parse_reason(error: Exception) -> str:
    """What is wrong with a config file and where, without the file's text: PyYAML quotes the
    line it stopped at, which may be a storage option's secret (TOML's errors name only the
    line and column)."""
    problem = getattr(error, "problem", None)
    if problem is None:  # TOML, or a YAMLError without a position
        return str(error) if not hasattr(error, "problem_mark") else type(error).__name__
    context = (f"{error.context}{_at(error.context_mark)}: "
               if getattr(error, "context", None) else "")
    return f"{context}{problem}{_at(error.problem_mark)}"


def _at(mark) -> str:
    """Where a YAML mark points, as people count lines and columns."""
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""


def load_yaml(text: str):
    """YAML (or JSON) text as Python values, {} when empty; a mapping that names a key twice
    is refused (PyYAML keeps the last, so a scheduled job's file could silently run the
    values of a line its author did not mean)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Loader, node: yaml.MappingNode):
        seen: dict[tuple, int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"found key {key.value!r} again (first on line "
                        f"{seen[key.tag, key.value]})", key.start_mark)
                seen[key.tag, key.value] = key.start_mark.line + 1
        yield from loader.construct_yaml_map(node)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=Loader) or {}  # a SafeLoader: plain values only


def build_config(file_values: dict, flag_values: dict, source: str | None = None) -> RunConfig:
    """Merge file values and explicitly given flags (flags win) into a validated RunConfig; an
    error about an option that came from the file names the file (`source`)."""
    flags = {k: v for k, v in flag_values.items() if v is not None}
    merged = {**file_values, **flags}
    from_file = set(file_values) - set(flags)
    try:
        if file_values.get("storage_options") and flag_values.get("storage_options"):
            merged["storage_options"] = _merged(_options(file_values["storage_options"]),
                                                _options(flag_values["storage_options"]))
            from_file.discard("storage_options")
        known = {f.name for f in dataclasses.fields(RunConfig)}
        unknown = sorted(set(merged) - known)
        if unknown:
            guesses = ", ".join(_guessed(name, known) for name in unknown)
            raise ConfigError(f"unknown option(s): {guesses}")
        missing = [name for name in ("manifest", "output") if not merged.get(name)]
        if missing:
            raise ConfigError(f"missing required option(s): {', '.join(missing)}")
        return RunConfig(**_normalise(merged))
    except ConfigError as error:
        if source and _about(str(error), from_file):
            raise ConfigError(f"config file {source}: {error}") from error
        raise


def _about(message: str, names: set[str]) -> bool:
    """Whether an error message is about one of `names`: it starts with the option's name (or
    `storage option` for storage_options), or lists unknown options."""
    starts = [f"{name} " for name in names] + ["storage option"] * ("storage_options" in names)
    return message.startswith(("unknown option", *starts))


def _guessed(name: str, known: set[str]) -> str:
    """An unknown option with the known one it was likely meant as (a flag's name, e.g.
    `storage-option:` for the file's `storage_options:`)."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"{name} (did you mean {close[0]}?)" if close else name


def _options(value: object) -> dict:
    if isinstance(value, list | tuple):
        return parse_storage_options(value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"storage_options must be a mapping of option names to values, got "
                          f"a {type(value).__name__}")
    return dict(value)


def _merged(base: Mapping, override: Mapping) -> dict:
    """`override` on top of `base`, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _normalise(values: dict) -> dict:
    values = dict(values)
    if "t0" in values:
        t0 = values["t0"]
        values["t0"] = tuple(float(v) if isinstance(v, int | float) and not isinstance(v, bool)
                             else v for v in (t0 if isinstance(t0, list | tuple) else [t0]))
    if "actors" in values:
        values["actors"] = parse_actors(values["actors"])
    if "retry_errors" in values:
        values["retry_errors"] = parse_stages(values["retry_errors"])
    if isinstance(values.get("storage_options"), list | tuple):
        values["storage_options"] = parse_storage_options(values["storage_options"])
    if values.get("model", "") is None:  # `model: ~` in a file: the default, as other nulls
        del values["model"]
    for name in ("manifest", "output", "model"):
        if name in values:
            values[name] = str(values[name])
    for name in ("manifest", "output"):
        if name in values:
            values[name] = absolute_local(values[name])
    if "model" in values and os.path.exists(values["model"]):
        values["model"] = absolute_local(values["model"])
    return values


def absolute_local(uri: str) -> str:
    """Local paths become absolute (Ray workers and later readers may not share the cwd);
    URIs with a scheme other than file:// are left as they are."""
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def dumps(record: dict) -> str:
    """Stable JSON text for stored records."""
    return json.dumps(record, indent=2, sort_keys=True)
