"""The deploy/ manifests parse, and their entrypoints are valid `sdedit run` command lines."""

from __future__ import annotations

import shlex
from pathlib import Path

import click
import pytest
import yaml

from pipeline.run_cli import run

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _entrypoint(document: dict) -> str:
    spec = document["spec"]
    return (spec.get("jobTemplate") or spec)["entrypoint"]


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycronjob.yaml"])
def test_kuberay_entrypoint_parses_as_sdedit_run(name):
    document = yaml.safe_load((DEPLOY / "kuberay" / name).read_text())
    assert document["apiVersion"] == "ray.io/v1"
    argv = shlex.split(_entrypoint(document))
    assert argv[:2] == ["sdedit", "run"]
    context = run.make_context("run", argv[2:])  # raises click.UsageError on a bad flag
    assert context.params["address"] == "auto"
    assert context.params["manifest"].startswith("s3://")


def test_unknown_flag_is_rejected_by_the_same_check():
    with pytest.raises(click.UsageError):
        run.make_context("run", ["in/", "out/", "--no-such-flag"])


def test_cronjob_forbids_concurrent_runs_into_one_output():
    document = yaml.safe_load((DEPLOY / "kuberay" / "raycronjob.yaml").read_text())
    assert document["kind"] == "RayCronJob"
    assert document["spec"]["concurrencyPolicy"] == "Forbid"
