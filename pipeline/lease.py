"""One run at a time per OUTPUT: a lease the running driver holds and renews.

Two runs writing one OUTPUT at once (a scheduled run starting while yesterday's is still going)
would break exactly-once: each start deletes the temporary files the other is writing, and the
same key can be committed by both in differently composed shards. So `sdedit run` holds
`OUTPUT/_run_lease.json` (run id, host, pid, when it was renewed) from before it touches OUTPUT
until its summary is written, renewing it every `RENEW_SECONDS`, and another run refuses to
start while it is live. A lease is stale once it has not been renewed for `EXPIRE_SECONDS`, or at
once when it names a process on this host that no longer exists, so a killed driver rerun on
its machine resumes without waiting. The lease is written whole (temp + rename, one PUT) and
read back, on a local disk under a lock of this host from the first read to the read-back. On S3
the PUT is conditional on what was read (`If-None-Match: *` where there was no lease, `If-Match`
its ETag where there was one), so of runs that read the same lease only one writes (AWS S3
documents both conditions; SeaweedFS honours both in the tests). Other object stores, and
S3-compatible ones that refuse the conditions, have no atomic create: there two runs started
within one round trip of each other could both proceed (on SeaweedFS without the conditions,
9 of 40 tries of 4 runs started at once); a run started while another is running cannot.

The lease also fences the run's workers: every shard commit first checks that OUTPUT's lease
still names its run (`confirm_held`). A driver killed alone leaves Ray workers that can go on
for a moment, and a run whose lease expired (its driver stalled) still has work in flight; once
another run has taken OUTPUT over, their commits are refused instead of adding a second copy
of keys the new run redoes.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, replace

from pipeline.progress import Report, quiet
from tasks.images import StorageError, storage_step, with_backoff

LEASE = "_run_lease.json"
RENEW_SECONDS = 30.0
EXPIRE_SECONDS = 120.0
POLL_SECONDS = 5.0  # how often a waiting run looks at the lease again


class OutputInUseError(RuntimeError):
    """Another live run holds OUTPUT's lease."""


class LeaseLostError(RuntimeError):
    """This run no longer holds OUTPUT's lease: another run took OUTPUT over."""


@dataclass(frozen=True)
class Lease:
    """Who holds OUTPUT: a run id, its driver's host and pid, and wall-clock times. (A field
    added here would make earlier versions read the lease as none, and take OUTPUT over.)"""

    run: str
    host: str
    pid: int
    started_at: float
    renewed_at: float

    def stale_reason(self, now: float) -> str | None:
        """Why this lease no longer protects a run (None while it does)."""
        if now - self.renewed_at > EXPIRE_SECONDS:
            return f"not renewed for {now - self.renewed_at:.0f} s"
        if self.host == socket.gethostname() and not _process_exists(self.pid):
            return f"its process {self.pid} on this host is gone"
        return None

    def is_live(self, now: float) -> bool:
        return self.stale_reason(now) is None

    def same_run(self, other: Lease | None) -> bool:
        """Whether `other` is this run's lease (at any renewal)."""
        return other is not None and other.run == self.run

    def describe(self, now: float) -> str:
        return (f"run {self.run} (host {self.host}, pid {self.pid}), started "
                f"{now - self.started_at:.0f} s ago, renewed {now - self.renewed_at:.0f} s ago")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass(frozen=True)
class LeaseRead:
    """A read of OUTPUT's lease: the lease (None: no file, or one no run could have written)
    and, on S3, the version that was read, which a write may be conditional on."""

    lease: Lease | None
    version: S3LeaseVersion | None = None


@dataclass(frozen=True)
class S3LeaseVersion:
    """OUTPUT's lease object on S3 and its ETag when read (None: there was none)."""

    bucket: str
    key: str
    etag: str | None


def read_lease(output: str, storage_options: Mapping, attempts: int = 1) -> Lease | None:
    """The lease OUTPUT holds, or None (no lease file, or one no run could have written);
    keys a later version adds are ignored. A store's failure that may pass is tried
    `attempts` times, with backoff."""
    return _read(output, storage_options, attempts).lease


def _read(output: str, storage_options: Mapping, attempts: int = 1) -> LeaseRead:
    from pipeline.resume import output_fs

    fs, root = output_fs(output, storage_options)
    path = f"{root}/{LEASE}"
    s3 = _is_s3(fs)
    bucket, key = fs.split_path(path)[:2] if s3 else (None, None)
    try:
        if s3:  # body and ETag from one GET: the version a conditional write names
            payload, etag = with_backoff(lambda: _get_object(fs, bucket, key), attempts, 0.5)
        else:
            payload = with_backoff(lambda: fs.cat_file(path), attempts, delay=0.5)
    except FileNotFoundError:
        payload, etag = None, None
    version = S3LeaseVersion(bucket, key, etag) if s3 else None
    try:
        fields = json.loads(payload)
        lease = Lease(**{name: fields[name] for name in Lease.__dataclass_fields__})
    except (ValueError, TypeError, KeyError):  # none, not JSON, or not a lease's fields
        lease = None
    return LeaseRead(lease, version)


def _is_s3(fs) -> bool:
    return "s3" in fs.protocol and hasattr(fs, "_call_s3")  # s3fs


def _get_object(fs, bucket: str, key: str) -> tuple[bytes, str]:
    """(body, ETag) of one S3 GET through s3fs (its errors translated, e.g. FileNotFoundError)."""
    from fsspec.asyn import sync

    async def get() -> tuple[bytes, str]:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await response["Body"].read(), response["ETag"]
        finally:
            response["Body"].close()

    return sync(fs.loop, get)


def confirm_held(output: str, run: str, storage_options: Mapping) -> None:
    """LeaseLostError unless OUTPUT's lease still names run `run` (called before each commit,
    so a store's outage is waited out as the commit's own upload waits it out)."""
    from pipeline.writers import UPLOAD_ATTEMPTS

    holder = read_lease(output, storage_options, UPLOAD_ATTEMPTS)
    if holder is None or holder.run != run:
        now = time.time()
        raise LeaseLostError(
            f"run {run} no longer holds {output}: "
            f"{f'{holder.describe(now)} holds it now' if holder else 'its lease is gone'}. "
            "This run stopped committing, so that no output is written twice; what it "
            "committed stays in OUTPUT")


def live_holder(output: str, storage_options: Mapping, now: float) -> Lease | None:
    """OUTPUT's lease if a run holds it now (a run started now would be refused)."""
    lease = read_lease(output, storage_options)
    return lease if lease and lease.is_live(now) else None


def acquire(output: str, storage_options: Mapping, wait_seconds: float = 0.0,
            report: Report = quiet) -> tuple[Lease, Lease | None]:
    """Take OUTPUT's lease for this process: (the new lease, the stale one it replaced).
    While another run holds a live one, wait up to `wait_seconds` (saying so once through
    `report`) for it to be released or expire, then OutputInUseError."""
    from pipeline.resume import refuse_a_file

    refuse_a_file(output, storage_options)  # an object store would write a lease beside it
    deadline = time.time() + wait_seconds
    waiting = False
    while True:
        with _one_at_a_time(output, storage_options):
            read = _read(output, storage_options)
            holder, now = read.lease, time.time()
            if not (holder and holder.is_live(now)):
                lease = Lease(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), now, now)
                _write(output, lease, storage_options, read.version)
                claimed = read_lease(output, storage_options)
                if not lease.same_run(claimed):  # another run wrote between our read and write
                    raise _in_use(output, claimed, time.time()) if claimed else OutputInUseError(
                        f"cannot hold the lease on {output}: it vanished after it was written")
                return lease, holder  # None, or the stale lease this run replaced
        if now >= deadline:
            raise _in_use(output, holder, now)
        if not waiting:
            report(f"{output} is in use by {holder.describe(now)}; waiting up to "
                   f"{deadline - now:.0f} s for it to end")
            waiting = True
        time.sleep(min(POLL_SECONDS, deadline - now, _expires_in(holder, now) + 0.05))


@contextmanager
def _one_at_a_time(output: str, storage_options: Mapping) -> Iterator[None]:
    """On a local disk, one process of this host at a time from reading the lease to reading
    back its own (an exclusive lock on a file in the temporary folder, named by OUTPUT's real
    path, so OUTPUT is not touched): two runs that found the same stale lease, or none, both
    took OUTPUT (17 of 40 tries when started together), because writing and reading back
    leaves a window. Object stores have no such lock (see the module's note)."""
    import hashlib
    import tempfile

    from pipeline.resume import output_fs

    fs, root = output_fs(output, storage_options)
    if "file" not in fs.protocol:
        yield
        return
    name = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:24]
    with _locked(os.path.join(tempfile.gettempdir(), f"sdedit-lease-{name}.lock")):
        yield


@contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on the file at `path` for the block, the file removed as the lock is
    released: every run left one in the temporary folder per OUTPUT it wrote. A process that
    opened the file before it was removed gets the lock on a file no longer at `path`, and
    tries again. Without a lock (another user's file there), the block runs unguarded: their
    runs of this OUTPUT are theirs."""
    import fcntl

    with ExitStack() as held:  # the lock is released as its file closes
        while True:
            try:
                lock = held.enter_context(open(path, "a"))
                fcntl.flock(lock, fcntl.LOCK_EX)
                if os.path.samestat(os.fstat(lock.fileno()), os.stat(path)):
                    break
            except FileNotFoundError:  # removed between our lock and stat: try again
                pass
            except OSError:  # another user's lock file: their runs of this OUTPUT are theirs
                lock = None
                break
            held.close()
        try:
            yield
        finally:
            if lock is not None:
                with suppress(OSError):  # a file left behind is harmless
                    os.unlink(path)


def _expires_in(holder: Lease, now: float) -> float:
    return max(0.0, EXPIRE_SECONDS - (now - holder.renewed_at))


def _in_use(output: str, holder: Lease, now: float) -> OutputInUseError:
    wait = _expires_in(holder, now)
    return OutputInUseError(
        f"{output} is in use by {holder.describe(now)}. Two runs into one OUTPUT would delete "
        "each other's temporary files and could commit outputs twice. Wait for it to finish "
        "(--wait-for-output SECONDS waits); if it is gone (killed on another machine), its lease "
        f"expires in {wait:.0f} s, or delete {output.rstrip('/')}/{LEASE}")


def _write(output: str, lease: Lease, storage_options: Mapping,
           replacing: S3LeaseVersion | None = None) -> None:
    """Write `lease` whole; on S3 (`replacing` given) only over the version that was read. A
    write refused because another run wrote first returns quietly: the caller reads the
    lease back and finds theirs."""
    from pipeline.writers import commit

    payload = json.dumps(asdict(lease), indent=2).encode()
    if replacing is not None and _put_if_unchanged(output, replacing, payload, storage_options):
        return
    commit(output, LEASE, payload, storage_options)


def _put_if_unchanged(output: str, replacing: S3LeaseVersion, payload: bytes,
                      storage_options: Mapping) -> bool:
    """One conditional PUT of the lease: True once the store has applied it, or refused it
    because another run wrote first; False where it did neither (the caller then writes
    unconditionally, as for a store without conditional writes), including a refusal while
    the lease is still the one that was read, which no other run's write explains."""
    from botocore.exceptions import ParamValidationError

    from pipeline.resume import output_fs

    fs, _ = output_fs(output, storage_options)
    condition = ({"IfMatch": replacing.etag} if replacing.etag is not None else
                 {"IfNoneMatch": "*"})
    try:
        fs.call_s3("put_object", Bucket=replacing.bucket, Key=replacing.key, Body=payload,
                   **condition)
    except ParamValidationError:  # a botocore older than S3's conditional writes (2024)
        return False
    except OSError as error:
        if not _precondition_failed(error):
            return False
        return _read(output, storage_options).version != replacing
    finally:
        fs.invalidate_cache(f"{replacing.bucket}/{replacing.key}")  # as s3fs's own writes do
    return True


def _precondition_failed(error: BaseException) -> bool:
    """Whether S3 refused a conditional write (HTTP 412, or 409 for a concurrent one)."""
    response = getattr(error.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def release(output: str, lease: Lease, storage_options: Mapping) -> None:
    """Delete OUTPUT's lease if it is still this run's."""
    from pipeline.resume import output_fs

    if lease.same_run(read_lease(output, storage_options)):
        fs, root = output_fs(output, storage_options)
        fs.rm(f"{root}/{LEASE}")


@contextmanager
def holding(output: str, storage_options: Mapping, report: Report,
            wait_seconds: float = 0.0, renew_seconds: float = RENEW_SECONDS) -> Iterator[Lease]:
    """Hold OUTPUT's lease for the block (waiting up to `wait_seconds` for another run's to
    end), renewing it from a background thread."""
    with storage_step(f"cannot prepare OUTPUT {output}"):  # as open_output says
        lease, replaced = acquire(output, storage_options, wait_seconds, report)
    if replaced:
        report(f"taking over {output} from {replaced.describe(lease.started_at)}: "
               f"{replaced.stale_reason(lease.started_at)}")
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(output, lease, storage_options, report,
                                                    renew_seconds, stop),
                               name="sdedit-lease", daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join()
        try:
            with storage_step(f"could not release the lease on {output}"):
                release(output, lease, storage_options)
        except StorageError as error:  # the next run takes it over when it expires
            report(str(error))


def _renew(output: str, lease: Lease, storage_options: Mapping, report: Report,
           every: float, stop: threading.Event) -> None:
    """Rewrite the lease with a new renewal time until `stop`; give up if another run took it."""
    while not stop.wait(every):
        try:
            with storage_step(f"could not renew the lease on {output}"):
                read = _read(output, storage_options)
                if not lease.same_run(read.lease):
                    report(f"another run took over the lease on {output}; this run commits "
                           "nothing more")
                    return
                _write(output, replace(lease, renewed_at=time.time()), storage_options,
                       read.version)  # on S3, not over a lease written since this read
        except StorageError as error:  # a store hiccup: try again at the next renewal
            report(str(error))
