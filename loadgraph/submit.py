"""`loadgraph submit`: run `loadgraph build` on a Ray cluster through its job API.

The submission id is derived from the specs' content, the build arguments and the day, so a
scheduler that fires twice (a retried cron run, two operators) attaches to the job already
running or done instead of starting a second one. A job that failed or was stopped is
resubmitted under the next free `-rN` suffix. Specs are validated here, before anything is
submitted; their sources are resolved and hashed on the cluster, where the files are.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from loadgraph.errors import InputError

ACTIVE_OR_DONE = ("PENDING", "RUNNING", "SUCCEEDED")
MAX_RESUBMITS = 50
# Uploading these would be slow and useless: environments, VCS data, caches.
EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache"]


@dataclass
class Submission:
    submission_id: str
    entrypoint: str
    attached: bool  # True: a job with this id already existed and we follow it
    status: str


def spec_digest(specs: list[Path], build_args: list[str]) -> str:
    """sha256 of the specs as parsed (not their bytes: comments and key order do not matter)."""
    from loadgraph.pipeline.stage import canonical_json
    from loadgraph.spec import load_spec_file, parse_spec

    docs = []
    for path in specs:
        load_spec_file(path)  # the CLI's validation and messages, before anything is submitted
        # Parsed again without resolving relative paths: they mean the uploaded working dir.
        targets = parse_spec(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))
        docs.append([t.model_dump(mode="json") for t in targets])
    return hashlib.sha256(canonical_json({"specs": docs, "args": build_args}).encode()).hexdigest()


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
    entrypoint, _ = entrypoint_for(specs, working_dir, build_args)
    base = submission_id or base_submission_id(spec_digest(specs, build_args), day or dt.datetime.now(dt.timezone.utc).date())
    client = _client(address)
    sid, status = find_slot(client, base)
    if status is not None:
        return Submission(sid, entrypoint, True, status)
    runtime_env = {"working_dir": str(working_dir.resolve()), "excludes": EXCLUDES}
    if env:
        runtime_env["env_vars"] = dict(env)
    try:
        client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env, metadata={"tool": "loadgraph", "specs": " ".join(map(str, specs))})
    except RuntimeError as exc:
        if "already exists" not in str(exc):
            raise
        return Submission(sid, entrypoint, True, _status(client, sid) or "PENDING")  # a concurrent submitter won
    return Submission(sid, entrypoint, False, "PENDING")


def follow(address: str, submission_id: str, write: Callable[[str], None]) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    client = _client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            write(chunk)

    asyncio.run(tail())
    return _status(client, submission_id) or "UNKNOWN"


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
