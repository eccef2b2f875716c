"""One holder at a time for a name in an object store, without a lock server: a lease object
created only if absent (S3 `If-None-Match: *`), renewed only if unchanged (`If-Match`), taken
over once it has expired or its holder is provably dead. Used for one builder per cache key in
the remote tier and one publisher per export prefix."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from loadgraph.pipeline.fsops import HOST, pid_alive
from loadgraph.pipeline.objstore import create_exclusive, read_with_etag, replace_if

LEASE_ENV = "LOADGRAPH_REMOTE_LEASE_S"
POLL_S = 0.5


class RemoteLease:
    """One builder per key across nodes: a lease object created only if absent (If-None-Match),
    renewed only if unchanged (If-Match), taken over once it has expired or its holder is dead.

    The lease saves work; correctness does not depend on it (a node that lost its lease still
    publishes verified, deterministic bytes)."""

    def __init__(self, fs, path: str, ttl_s: float | None = None):
        self.fs, self.path = fs, path
        self.ttl_s = ttl_s or float(os.environ.get(LEASE_ENV, "30"))
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self._stop = threading.Event()

    def _doc(self) -> bytes:
        return json.dumps({"token": self.token, "host": HOST, "pid": os.getpid(), "expires": time.time() + self.ttl_s}).encode()

    def _stale(self, data: bytes) -> bool:
        try:
            doc = json.loads(data)
            if doc.get("host") == HOST and not pid_alive(int(doc.get("pid", -1))):
                return True  # its holder died on this machine: no need to wait for the expiry
            return float(doc["expires"]) < time.time()
        except (ValueError, KeyError, TypeError, AttributeError):
            return True

    @contextmanager
    def held(self, timeout: float = -1) -> Iterator[None]:
        self._acquire(timeout)
        beat = threading.Thread(target=self._renew, name="loadgraph-remote-lease", daemon=True)
        beat.start()
        try:
            yield
        finally:
            self._stop.set()
            beat.join()
            self._release()

    def _acquire(self, timeout: float) -> None:
        from filelock import Timeout

        deadline = time.monotonic() + timeout if timeout >= 0 else None
        while True:
            self.etag = create_exclusive(self.fs, self.path, self._doc())
            if self.etag is not None:
                return
            try:
                data, etag = read_with_etag(self.fs, self.path)
            except FileNotFoundError:
                continue  # released between our create and our read: try again at once
            if self._stale(data) and etag and (new := replace_if(self.fs, self.path, self._doc(), etag)) is not None:
                self.etag = new
                return
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(self.path)
            time.sleep(POLL_S)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            new = replace_if(self.fs, self.path, self._doc(), self.etag or "")
            if new is None:
                return  # taken over (we were too slow): the other builder's result is as good
            self.etag = new

    def _release(self) -> None:
        try:
            data, etag = read_with_etag(self.fs, self.path)
            if etag == self.etag or json.loads(data).get("token") == self.token:
                self.fs.rm_file(self.path)
        except (FileNotFoundError, ValueError, PermissionError):
            pass
