"""The deploy/ manifests parse, and their entrypoints are valid `sdedit run` command lines."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
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
    # GPU workers may join after the job starts: without the wait it would get CPU actors
    assert (context.params["gpus_per_actor"], context.params["wait_for_gpus"]) == (1, 600)


def test_unknown_flag_is_rejected_by_the_same_check():
    with pytest.raises(click.UsageError):
        run.make_context("run", ["in/", "out/", "--no-such-flag"])


def test_cronjob_uses_only_fields_of_kuberays_raycronjob():
    """KubeRay's RayCronJobSpec has schedule, timeZone (1.7) and jobTemplate; the
    `concurrencyPolicy` this file had is none of them (strict validation rejects the file, and
    without it the field is dropped): an overlapping night stops on OUTPUT's lease instead."""
    document = yaml.safe_load((DEPLOY / "kuberay" / "raycronjob.yaml").read_text())
    assert document["kind"] == "RayCronJob"
    assert set(document["spec"]) == {"schedule", "timeZone", "jobTemplate"}


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycronjob.yaml"])
def test_worker_ranges_come_with_the_autoscaler_that_moves_them(name):
    """minReplicas/maxReplicas without enableInTreeAutoscaling are never used: the nightly
    job's 1-4 GPU workers were always 1."""
    spec = yaml.safe_load((DEPLOY / "kuberay" / name).read_text())["spec"]
    cluster = (spec.get("jobTemplate") or spec)["rayClusterSpec"]
    ranged = [group for group in cluster["workerGroupSpecs"]
              if {"minReplicas", "maxReplicas"} & set(group)]
    assert not ranged or cluster.get("enableInTreeAutoscaling") is True


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycronjob.yaml"])
def test_kuberay_jobs_delete_their_cluster_after_the_job(name):
    """RayJobSpec has `shutdownAfterJobFinishes` (and `ttlSecondsAfterFinished`, which only
    works with it); `shutdownAfterJobFinishesSeconds` is no field of it: the API server rejects
    or prunes it, and nothing deletes the GPU cluster after the job."""
    text = (DEPLOY / "kuberay" / name).read_text()
    spec = yaml.safe_load(text)["spec"]
    job = spec.get("jobTemplate") or spec  # a RayCronJob's jobTemplate is a RayJobSpec
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int)
    assert "shutdownAfterJobFinishesSeconds" not in text


def test_rayjob_autoscales_the_workers_its_actor_range_needs():
    """minReplicas/maxReplicas only move with the in-tree autoscaler; without it KubeRay keeps
    `replicas` workers and `--actors 1-8` would never get more than those."""
    document = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())
    cluster = document["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    workers = cluster["workerGroupSpecs"][0]
    actors = run.make_context("run", shlex.split(_entrypoint(document))[2:]).params["actors"]
    assert actors == "1-8"
    assert (workers["minReplicas"], workers["maxReplicas"]) == (1, 8)


@pytest.mark.parametrize(("extra", "address"), [([], "auto"),
                                                (["--address", "10.0.0.2:6379"], "10.0.0.2:6379")])
def test_submit_script_passes_auto_unless_the_user_names_an_address(tmp_path, extra, address):
    """submit.sh runs `ray job submit -- sdedit run ...`; a stand-in `ray` prints its argv."""
    fake = tmp_path / "ray"
    fake.write_text('#!/bin/sh\nprintf "%s\\0" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
           "RAY_ADDRESS": "http://head:8265"}
    printed = subprocess.run(["bash", str(DEPLOY / "submit.sh"), "s3://b/in/", "s3://b/out/",
                              "--t0", "0.4", *extra], env=env, check=True,
                             capture_output=True).stdout.decode()
    argv = printed.split("\0")[:-1]
    assert re.fullmatch(r"sdedit-\d{8}-\d{6}-[0-9a-f]{6}", argv[argv.index("--submission-id") + 1])
    command = argv[argv.index("--") + 1:]
    assert command[:2] == ["sdedit", "run"]
    params = run.make_context("run", command[2:]).params
    assert params["address"] == address
    assert (params["manifest"], params["output"]) == ("s3://b/in/", "s3://b/out/")
