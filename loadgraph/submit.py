"""`loadgraph submit`: run `loadgraph build` on a Ray cluster through its job API.

The submission id is derived from the plan's content keys (every target's key and export path),
the build arguments and the day: a scheduler that fires twice (a retried cron run, two operators)
attaches to the job already running or done, and an input changed in place (an adapter retrained
under the same path) gives a new key, so a new job. The keys depend on the inputs' bytes, which
live on the cluster: the plan runs there first as a short `loadgraph plan --json` job. A job that
failed or was stopped is resubmitted under the next free `-rN` suffix. Specs are validated here,
before anything is submitted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import shlex
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from loadgraph.errors import InputError

ACTIVE_OR_DONE = ("PENDING", "RUNNING", "SUCCEEDED")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
MAX_RESUBMITS = 50
PLAN_TIMEOUT_S = 900.0
POLL_S = 0.5
# --wait: how long the job API may stay unreachable (a head restart, a dropped port-forward)
# before we stop following; the job itself keeps running either way.
REATTACH_FOR_S = 300.0
# Uploading these would be slow and useless: environments, VCS data, caches.
EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache"]


@dataclass
class Submission:
    submission_id: str
    entrypoint: str
    attached: bool  # True: a job with this id already existed and we follow it
    status: str


def validate_specs(specs: list[Path]) -> None:
    """The CLI's validation and messages, before anything is submitted."""
    from loadgraph.spec import load_spec_file

    for path in specs:
        load_spec_file(path)


def plan_digest(plan: dict, build_args: list[str]) -> str:
    """sha256 of what the build will produce: each target's content key and export path."""
    from loadgraph.pipeline.stage import canonical_json

    targets = sorted((t["name"], t["key"], t["export"]) for t in plan["targets"])
    return hashlib.sha256(canonical_json({"targets": targets, "args": build_args}).encode()).hexdigest()


def _plan_from_logs(logs: str) -> dict:
    """The `plan --json` document in a job's logs (Ray may print lines of its own around it)."""
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(logs) if ch == "{"):
        try:
            doc, _ = decoder.raw_decode(logs, start)
        except ValueError:
            continue
        if isinstance(doc, dict) and "targets" in doc and "nodes" in doc:
            return doc
    raise ValueError("no plan in the job's output")


def plan_on_cluster(client, rel_specs: list[str], build_args: list[str], runtime_env: dict, timeout: float = PLAN_TIMEOUT_S) -> dict:
    """Run `loadgraph plan --json` as a job on the cluster (where the inputs are) and return it."""
    sid = f"loadgraph-plan-{uuid.uuid4().hex[:12]}"
    client.submit_job(entrypoint=shlex.join(["loadgraph", "plan", *rel_specs, "--json", *build_args]), submission_id=sid,
                      runtime_env=runtime_env, metadata={"tool": "loadgraph", "purpose": "plan for submit"})
    deadline = time.monotonic() + timeout
    status = _status(client, sid)
    while status not in TERMINAL:
        if time.monotonic() > deadline:
            client.stop_job(sid)
            raise InputError(f"planning on the cluster (job {sid}) did not finish within {timeout:.0f}s; see `ray job logs {sid}`")
        time.sleep(POLL_S)
        status = _status(client, sid)
    logs = client.get_job_logs(sid)
    if status != "SUCCEEDED":
        # The plan names the bad input in one line (exit 2): pass that on, nothing is submitted.
        lines = [line for line in logs.strip().splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if line.startswith("error")), lines[-1] if lines else status)
        raise InputError(f"planning on the cluster failed (job {sid}): {reason.strip()}")
    return _plan_from_logs(logs)


def base_submission_id(digest: str, day: dt.date) -> str:
    return f"loadgraph-{day:%Y%m%d}-{digest[:16]}"


def entrypoint_for(specs: list[Path], working_dir: Path, build_args: list[str]) -> tuple[str, list[str]]:
    """The `loadgraph build` command line, with spec paths relative to the uploaded working dir."""
    rel = []
    root = working_dir.resolve()
    for spec in specs:
        path = spec.resolve()
        if root not in path.parents:
            raise InputError(f"{spec}: not inside the working directory {root}, which is what gets uploaded; run from the spec's directory or pass --working-dir")
        rel.append(str(path.relative_to(root)))
    return shlex.join(["loadgraph", "build", *rel, *build_args]), rel


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(f"--address: cannot reach the Ray job API at {address}: {str(exc).strip().splitlines()[0]}") from None


def _status(client, submission_id: str) -> str | None:
    try:
        status = client.get_job_info(submission_id).status
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            return None
        raise
    return str(getattr(status, "value", status))  # JobStatus is a str enum


def find_slot(client, base: str) -> tuple[str, str | None]:
    """(id, status): the first of base, base-r2, ... that is free, running or succeeded."""
    for n in range(1, MAX_RESUBMITS + 1):
        sid = base if n == 1 else f"{base}-r{n}"
        status = _status(client, sid)
        if status is None or status in ACTIVE_OR_DONE:
            return sid, status
    raise InputError(f"{base}: failed {MAX_RESUBMITS} times today; fix the cause (see `ray job logs`) or pass --submission-id")


def submit(
    specs: list[Path],
    address: str,
    *,
    working_dir: Path = Path("."),
    cache: str | None = None,
    env: dict[str, str] | None = None,
    submission_id: str | None = None,
    day: dt.date | None = None,
) -> Submission:
    build_args = ["--cache", cache] if cache else []
    validate_specs(specs)
    entrypoint, rel_specs = entrypoint_for(specs, working_dir, build_args)
    client = _client(address)
    runtime_env = {"working_dir": str(working_dir.resolve()), "excludes": EXCLUDES}
    if env:
        runtime_env["env_vars"] = dict(env)
    if submission_id is None:
        plan = plan_on_cluster(client, rel_specs, build_args, runtime_env)
        submission_id = base_submission_id(plan_digest(plan, build_args), day or dt.datetime.now(dt.timezone.utc).date())
    sid, status = find_slot(client, submission_id)
    if status is not None:
        return Submission(sid, entrypoint, True, status)
    try:
        client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env, metadata={"tool": "loadgraph", "specs": " ".join(map(str, specs))})
    except RuntimeError as exc:
        if "already exists" not in str(exc):
            raise
        return Submission(sid, entrypoint, True, _status(client, sid) or "PENDING")  # a concurrent submitter won
    return Submission(sid, entrypoint, False, "PENDING")


def follow(address: str, submission_id: str, write: Callable[[str], None], reattach_for: float = REATTACH_FOR_S) -> str:
    """Stream the job's logs until it ends; returns its final status.

    A log stream that ends or breaks while the job still runs (a dropped connection, a restarted
    proxy) is re-opened; it restarts at the beginning, so what was already written is skipped.
    Gives up with "UNREACHABLE" after `reattach_for` seconds without reaching the job API."""
    written = [0]  # characters of the log already written, across re-attaches
    last_contact = time.monotonic()
    while True:
        try:
            client = _client(address)
            _tail_from(client, submission_id, written, write)
            status = _status(client, submission_id) or "UNKNOWN"
            last_contact = time.monotonic()
        except Exception:  # noqa: BLE001 - a broken connection or API: retry until the deadline
            status = None
        if status is not None and status not in ("PENDING", "RUNNING"):
            return status
        if time.monotonic() - last_contact > reattach_for:
            return "UNREACHABLE"
        time.sleep(1.0)


def _tail_from(client, submission_id: str, written: list[int], write: Callable[[str], None]) -> None:
    """Write the job's log stream past the `written[0]` characters already shown, counting them."""
    skip = written[0]

    async def tail() -> None:
        seen = 0
        async for chunk in client.tail_job_logs(submission_id):
            fresh = chunk[max(0, skip - seen):]
            seen += len(chunk)
            if fresh:
                write(fresh)
                written[0] += len(fresh)

    asyncio.run(tail())


def parse_env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--env: {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def default_address() -> str | None:
    """The variable Ray's own `ray job` CLI reads."""
    return os.environ.get("RAY_API_SERVER_ADDRESS")
