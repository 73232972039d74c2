"""Runs that reach one OUTPUT at the same instant: how often does more than one take its lease?

    python benchmarks/lease_race.py --output URI [--storage-option KEY=VALUE ...]
        [--racers 4] [--trials 40]

Makes `--trials` OUTPUTs under the folder URI `--output` (a temporary folder by default; an
s3:// URI with `--storage-option endpoint_url=...` for an S3-compatible server, credentials
from the environment), every other one holding a stale lease, as a killed run leaves. Then
`--racers` processes call `pipeline.lease.acquire` on each OUTPUT at the same instant (a busy
wait on the clock). Prints, as JSON, how many racers took each OUTPUT: exactly one is right,
two or more would both write it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

from pipeline.config import parse_storage_options
from pipeline.lease import EXPIRE_SECONDS, LEASE, Lease, OutputInUseError, acquire
from pipeline.resume import output_fs

SPACING = 0.5  # seconds between trials, so that each starts from a quiet store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="folder URI (default: a temporary folder)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--racers", type=int, default=4)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--race", nargs=2, metavar=("START", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = parse_storage_options(args.storage_option)
    if args.race:
        race(args.race[1], float(args.race[0]), args.trials, options)
        return
    with tempfile.TemporaryDirectory(prefix="sdedit-lease-race-") as scratch:
        folder = (args.output or scratch).rstrip("/")
        fs, root = output_fs(folder, options)
        now = time.time()
        for trial in range(0, args.trials, 2):
            stale = Lease("stale", "node-7", 4242, now - 600, now - EXPIRE_SECONDS - 60)
            fs.makedirs(f"{root}/o{trial}", exist_ok=True)  # a local folder; none on S3
            fs.pipe_file(f"{root}/o{trial}/{LEASE}", json.dumps(asdict(stale)).encode())
        start = time.time() + 3 + args.racers  # every racer started and imported by then
        command = [sys.executable, __file__, "--trials", str(args.trials),
                   "--race", str(start), folder,
                   *(f"--storage-option={option}" for option in args.storage_option)]
        racers = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
                  for _ in range(args.racers)]
        results = [racer.communicate()[0].split() for racer in racers]
    holders = [column.count("held") for column in zip(*results, strict=True)]
    print(json.dumps({"racers": args.racers, "trials": args.trials, "holders": holders,
                      "trials_with_two_or_more": sum(count > 1 for count in holders),
                      "trials_with_none": holders.count(0)}, indent=2))


def race(folder: str, start: float, trials: int, options: dict) -> None:
    """One racer: at each trial's instant, try to take that trial's OUTPUT."""
    for trial in range(trials):
        while time.time() < start + SPACING * trial:
            pass  # every racer reaches acquire at the same instant
        try:
            acquire(f"{folder}/o{trial}", options)
            print("held", flush=True)
        except OutputInUseError:
            print("refused", flush=True)


if __name__ == "__main__":
    main()
