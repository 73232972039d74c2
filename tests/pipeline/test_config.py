"""RunConfig: merging file and flags, validation, secrets never shown."""

from __future__ import annotations

import json
import re

import pytest

from pipeline.config import (
    ConfigError,
    RunConfig,
    build_config,
    load_config_file,
    parse_actors,
    parse_storage_options,
)
from pipeline.resume import ConfigMismatchError, claim_output


def test_storage_options_nest_and_convert():
    options = parse_storage_options(["endpoint_url=http://x:1", "client_kwargs.region_name=eu",
                                     "anon=false", "max_retries=5"])
    assert options == {"endpoint_url": "http://x:1", "client_kwargs": {"region_name": "eu"},
                       "anon": False, "max_retries": 5}


def test_storage_option_without_equals_is_refused():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_storage_options(["endpoint_url"])


@pytest.mark.parametrize(("text", "expected"), [("3", (3, 3)), ("1-4", (1, 4)), (2, (2, 2))])
def test_actors_parse(text, expected):
    assert parse_actors(text) == expected


def test_flags_override_a_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("manifest: m.parquet\noutput: out\nt0: [0.3, 0.6]\nbatch-size: 8\n"
                    "steps: 20\nprogress-interval: 300\nwait-for-output: 150\n"
                    "storage_options:\n  endpoint_url: http://s3:1\n")
    config = build_config(load_config_file(str(path)), {"steps": 5, "seed": None})
    assert config.t0 == (0.3, 0.6)
    assert config.batch_size == 8
    assert config.steps == 5
    assert config.progress_interval == 300 and config.wait_for_output == 150
    assert config.storage_options == {"endpoint_url": "http://s3:1"}


def test_toml_file_is_read(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('manifest = "m.parquet"\noutput = "out"\nactors = "1-3"\nt0 = 0.4\n')
    config = build_config(load_config_file(str(path)), {})
    assert config.actors == (1, 3)
    assert config.t0 == (0.4,)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("t0", (0.0,), "t0 values must lie in"),
    ("t0", (1.5,), "t0 values must lie in"),
    ("t0", (0.5, 0.3, 0.5), r"t0 values must differ \(to 6 decimals\), got 0.5, 0.3, 0.5$"),
    ("t0", (0.3, 0.3000000001), "t0 values must differ.*got 0.3, 0.3000000001$"),
    ("batch_size", 0, "batch_size must be a positive integer"),
    ("format", "csv", "format must be one of"),
    ("actors", (3, 1), "actors must be"),
    ("max_error_rate", 2.0, "max_error_rate"),
    ("progress_interval", -1.0, "progress_interval must be >= 0 seconds, got -1.0"),
    ("progress_interval", float("nan"), "progress_interval must be >= 0 seconds, got nan"),
    ("wait_for_output", -5.0, "wait_for_output must be >= 0 seconds, got -5.0"),
    ("wait_for_gpus", -1.0, "wait_for_gpus must be >= 0 seconds, got -1.0"),
    ("retry_errors", ("read", "network"), "retry_errors must name stages.*'network'"),
])
def test_invalid_values_are_refused_with_the_option_name(field, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(manifest="m", output="o", **{field: value})


def test_unknown_and_missing_options_are_named():
    with pytest.raises(ConfigError, match="unknown option.*colour"):
        build_config({"manifest": "m", "output": "o", "colour": "red"}, {})
    with pytest.raises(ConfigError, match="missing required option.*output"):
        build_config({"manifest": "m"}, {})
    # a flag's name in a config file (`storage-option:` is read as storage_option)
    with pytest.raises(ConfigError) as error:
        build_config({"manifest": "m", "output": "o", "storage_option": ["a=b"], "colour": 1}, {})
    assert str(error.value) == ("unknown option(s): colour, storage_option (did you mean "
                                "storage_options?)")


def test_public_dict_masks_credentials():
    config = RunConfig(manifest="m", output="o", storage_options={
        "key": "AKIA", "secret": "s3cr3t", "endpoint_url": "http://x",
        "client_kwargs": {"aws_session_token": "tok"}})
    public = config.public_dict()
    assert public["storage_options"] == {"key": "***", "secret": "***",
                                         "endpoint_url": "http://x",
                                         "client_kwargs": {"aws_session_token": "***"}}
    assert "s3cr3t" not in repr(public)


def test_public_dict_masks_every_header_and_uri_credentials_in_lists():
    config = RunConfig(manifest="m", output="o", storage_options={
        "https": {"headers": {"X-JFrog-Art-Api": "APIKEYHDR1313", "Accept": "image/png"}},
        "proxies": ["http://user:PW1313@proxy:3128", "http://proxy2:3128"],
        "session_kwargs": {"profile_name": "nightly"}, "endpoint_url": "http://x", "anon": False})
    public = config.public_dict()
    assert public["storage_options"] == {
        "https": {"headers": {"X-JFrog-Art-Api": "***", "Accept": "***"}},
        "proxies": ["http://user:***@proxy:3128", "http://proxy2:3128"],
        "session_kwargs": {"profile_name": "***"}, "endpoint_url": "http://x", "anon": False}
    assert "APIKEYHDR1313" not in repr(public) and "PW1313" not in repr(public)


def test_output_record_holds_only_output_deciding_fields():
    config = RunConfig(manifest="m", output="o", t0=(0.5,), batch_size=4, actors=(2, 2))
    record = config.output_record("sha256:abc")
    assert record["t0"] == [0.5]
    assert record["model_digest"] == "sha256:abc"
    assert "batch_size" not in record and "actors" not in record


def test_compile_channels_last_and_fast_decode_are_recorded_only_when_on(tmp_path):
    plain = RunConfig(manifest="m", output=str(tmp_path))
    switches = {"compile", "channels_last", "fast_decode"}
    assert not switches & set(plain.output_record("d"))  # old OUTPUTs resume
    fast = build_config({"manifest": "m", "output": str(tmp_path)},
                        {"compile": True, "channels_last": True, "fast_decode": True})
    assert fast.output_record("d") == {**plain.output_record("d"), "compile": True,
                                       "channels_last": True, "fast_decode": True}
    claim_output(str(tmp_path), plain.output_record("d"), False, {})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "part-0.parquet").write_bytes(b"")  # a shard: outputs of the record
    claim_output(str(tmp_path), plain.output_record("d"), False, {})
    with pytest.raises(ConfigMismatchError, match=r"compile: False -> True"):
        claim_output(str(tmp_path), fast.output_record("d"), False, {})
    decode_only = build_config({"manifest": "m", "output": str(tmp_path)}, {"fast_decode": True})
    with pytest.raises(ConfigMismatchError, match=r"fast_decode: False -> True"):
        claim_output(str(tmp_path), decode_only.output_record("d"), False, {})


def test_retry_errors_take_a_comma_list_or_all():
    flags = {"manifest": "m", "output": "o"}
    assert build_config(flags, {"retry_errors": "read, decode"}).retry_errors == ("read",
                                                                                  "decode")
    assert build_config({**flags, "retry_errors": ["edit"]}, {}).retry_errors == ("edit",)
    assert build_config(flags, {"retry_errors": "all"}).retry_errors == (
        "read", "decode", "validate", "edit", "encode", "write")
    assert "retry_errors" not in RunConfig(manifest="m", output="o").output_record("d")


@pytest.mark.parametrize(("text", "message"), [
    ('overwrite: "no"', "overwrite must be true or false, got 'no'"),
    ('compile: "false"', "compile must be true or false, got 'false'"),
    ("t0: abc", r"t0 values must be numbers in \(0, 1\], got 'abc'"),
    ('t0: [0.5, "x"]', "t0 values must be numbers.*got 'x'"),
    ("actors: [a, b]", r"actors must be N or MIN-MAX, got \['a', 'b'\]"),
    ('max_error_rate: "0.1"', "max_error_rate must be a number, got '0.1'"),
    ("progress_interval: '30'", "progress_interval must be a number"),
    ("retry_errors: 5", "retry_errors must be stage names"),
    ('storage_options: "endpoint_url=x"', "storage_options must be a mapping"),
    ("t0: [0.5\nsteps: 2", "is not valid YAML"),
    # tracebacks before these were clear errors: 'int' object has no attribute 'replace'...
    ("1: 2", "option names must be text, got 1"),
    ("storage_options: [5]", "storage options as a list must be KEY=VALUE strings, got 5"),
    ("storage_options: {1: x}", "storage_options names must be text, got 1"),
    ("storage_options: {client_kwargs: {2: x}}", "storage_options names must be text, got 2"),
    ("cpus_per_actor: .nan", "cpus_per_actor must be a finite number >= 0, got nan"),
    ("gpus_per_actor: .inf", "gpus_per_actor must be a finite number >= 0, got inf"),
])
def test_a_config_file_value_of_the_wrong_type_is_a_clear_error_naming_the_file(tmp_path, text,
                                                                                message):
    path = tmp_path / "job.yaml"
    path.write_text(f"manifest: m.parquet\noutput: out\n{text}\n")
    with pytest.raises(ConfigError, match=rf"^config file {re.escape(str(path))}\b.*{message}"):
        build_config(load_config_file(str(path)), {}, source=str(path))


def test_errors_about_a_files_options_name_the_file_and_a_flags_do_not(tmp_path):
    path = tmp_path / "nightly.yaml"
    path.write_text("manifest: m.parquet\noutput: out\nstepz: 5\n")
    with pytest.raises(ConfigError, match=rf"^config file {path}: unknown option\(s\): stepz "
                                          r"\(did you mean steps\?\)$"):
        build_config(load_config_file(str(path)), {}, source=str(path))
    path.write_text("manifest: m.parquet\noutput: out\nsteps: '2'\n")
    with pytest.raises(ConfigError, match=rf"^config file {path}: steps must be a positive "
                                          "integer, got '2'$"):
        build_config(load_config_file(str(path)), {}, source=str(path))
    assert build_config(load_config_file(str(path)), {"steps": 3}, source=str(path)).steps == 3
    with pytest.raises(ConfigError, match="^batch_size must be a positive integer, got 0$"):
        build_config(load_config_file(str(path)), {"steps": 3, "batch_size": 0},
                     source=str(path))


def test_a_null_model_in_a_file_is_the_default_model(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("manifest: m.parquet\noutput: out\nmodel: ~\n")
    config = build_config(load_config_file(str(path)), {})
    assert config.model == RunConfig(manifest="m", output="o").model == "default"


def test_a_switch_a_file_turns_on_can_be_turned_off_by_a_flag(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    path = tmp_path / "nightly.yaml"
    path.write_text("overwrite: true\ncompile: true\n")
    flags = {"overwrite": False, "compile": False}
    config = build_config({"manifest": "m", "output": "o", **load_config_file(str(path))}, flags)
    assert (config.overwrite, config.compile) == (False, False)
    usage = CliRunner().invoke(main, ["run", "--help"]).output
    for switch in ("overwrite", "compile", "channels-last", "fast-decode", "allow-pickle"):
        assert f"--{switch} / --no-{switch}" in usage


@pytest.mark.parametrize("name, text, message", [
    ("nightly.yaml", "manifest: m\noutput: o\nt0: 0.3\nsteps: 20\nt0: 0.6\n",
     r"(?s)nightly.yaml is not valid YAML: .*found key 't0' again \(first on line 3\)"),
    ("nightly.yaml", "storage_options:\n  key: A\n  key: B\n",
     r"found key 'key' again \(first on line 2\)"),
    ("nightly.json", '{"t0": 0.3, "t0": 0.5}', r"found key 't0' again \(first on line 1\)"),
    ("nightly.yaml", "batch-size: 3\nbatch_size: 4\n",
     r"nightly.yaml gives option batch_size twice, as batch-size and batch_size; keep one"),
    ("nightly.toml", "batch-size = 3\nbatch_size = 4\n", r"gives option batch_size twice"),
])
def test_an_option_given_twice_in_a_config_file_is_refused(tmp_path, name, text, message):
    """PyYAML keeps the last of two equal keys: a nightly file whose author added `t0: 0.6`
    below a forgotten `t0: 0.3` ran with one of them, silently."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config_file(str(path))


@pytest.mark.parametrize("text, message", [
    ('storage_options:\n  endpoint_url: x\n  secret: "S3CRET\n',
     "while scanning a quoted scalar (line 3, column 11): found unexpected end of stream "
     "(line 4, column 1)"),
    ("storage_options:\n  secret: [S3CRET\n",
     "while parsing a flow sequence (line 2, column 11): expected ',' or ']', but got "
     "'<stream end>' (line 3, column 1)"),
    ("storage_options:\n  secret: S3CRET\n  secret: S3CRET2\n",
     "while reading a mapping (line 2, column 3): found key 'secret' again (first on line 2) "
     "(line 3, column 3)"),
])
def test_a_yaml_error_names_the_line_but_does_not_quote_it(tmp_path, text, message):
    """PyYAML's message quotes the line it stopped at: a storage option's secret reached the
    console."""
    path = tmp_path / "nightly.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config_file(str(path))
    assert str(refused.value) == f"config file {path} is not valid YAML: {message}"


def test_yaml_merge_keys_and_repeated_values_are_not_duplicates(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("base: &base {region_name: eu}\nstorage_options:\n  client_kwargs:\n"
                    "    <<: *base\n    region_name: us\nt0: [0.3, 0.3]\n")
    options = load_config_file(str(path))
    assert options["storage_options"] == {"client_kwargs": {"region_name": "us"}}
    assert options["t0"] == [0.3, 0.3]


def test_invalid_toml_is_a_clear_error(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('manifest = "m.parquet"\noutput = \n')
    with pytest.raises(ConfigError, match=r"job.toml is not valid TOML: "):
        load_config_file(str(path))


def test_storage_option_flags_add_to_the_files_options(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("manifest: m.parquet\noutput: out\nstorage_options:\n  key: AK\n"
                    "  endpoint_url: http://s3:9000\n  client_kwargs: {region_name: eu}\n")
    config = build_config(load_config_file(str(path)), {
        "storage_options": ["client_kwargs.verify=false", "endpoint_url=http://s3:9001"]})
    assert config.storage_options == {"key": "AK", "endpoint_url": "http://s3:9001",
                                      "client_kwargs": {"region_name": "eu", "verify": False}}


def test_credentials_in_uris_and_options_never_reach_what_a_run_records():
    config = RunConfig(
        manifest="http://bob:MANPASS@h/m.parquet?token=MTOKEN", output="s3://b/out",
        model="https://alice:MODELPASS@h/model/?X-Amz-Signature=SIG1",
        storage_options={"headers": {"Authorization": "Bearer HDR"}, "passphrase": "PP",
                         "connection_string": "AccountName=a;AccountKey=AZ", "auth": "AUTHX",
                         "endpoint_url": "http://u:EPPASS@h:9000",
                         "client_kwargs": {"proxy": "http://u:PROXYPASS@p", "region_name": "eu"}})
    shown = json.dumps([config.public_dict(), config.output_record("digest")])
    for secret in ("MANPASS", "MTOKEN", "MODELPASS", "SIG1", "HDR", "PP", "AZ", "AUTHX",
                   "EPPASS", "PROXYPASS"):
        assert secret not in shown, secret
    public = config.public_dict()
    assert public["manifest"] == "http://bob:***@h/m.parquet?token=***"
    assert public["storage_options"]["endpoint_url"] == "http://u:***@h:9000"
    assert public["storage_options"]["client_kwargs"]["region_name"] == "eu"
    assert config.output_record("digest")["model"] == "https://alice:***@h/model/?X-Amz-Signature=***"
