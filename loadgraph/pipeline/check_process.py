"""A local build's checks in a child process, beside the nodes that run on their guessed plans.

A cold merge's or quantization's checks import torch, transformers and PEFT (or bitsandbytes) and
build the base on the meta device (seconds: 5-6 on the 16-core GPU host, 4-5 on 2 cores) before
its first unit may start, although what they derive for a common checkpoint can be guessed from
its headers (Graph.guesses: the identity name map of stages/derived_plans.guess_plans, the bnb
4-bit plan of formats/quant_guess.py). Here a child
process, spawned when the sources start hashing so that its imports overlap the plan, runs the
checks and stores their plans in the cache's memo, while this process's units run on the guesses.
The runner publishes a guessed node only once the checks passed and `confirm` found their plans
equal to the guess, and builds it again on theirs otherwise (the units' ids carry the plan, so a
unit computed on a guess is never taken for another plan's, even after a kill). A check that fails
fails the build (exit 2) at the next finished unit, with nothing published.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from pathlib import Path

from loadgraph import faults
from loadgraph.errors import LoadgraphError

Checks = list[tuple[str, Callable[[], None], Path | None]]  # Graph.take_checks


def _serve(conn, prepare: Callable[[], None]) -> None:
    """The child: import, then run each batch of checks it is sent and answer how it went."""
    from loadgraph.pipeline.graph import run_checks

    try:
        prepare()
    except Exception:  # noqa: BLE001 - the checks import again and report the error there
        pass
    faults.checks_child_ready()
    while True:
        try:
            checks = conn.recv()
        except (EOFError, OSError):
            return  # nothing more to check: the build needed none, or ended
        try:
            run_checks(checks)
            conn.send(("passed", None))
        except LoadgraphError as exc:
            conn.send(("refused", exc))
        except BaseException as exc:  # noqa: BLE001 - judged again in the parent, where it is reported
            conn.send(("crashed", f"{type(exc).__name__}: {exc}"))


class ChecksBeside:
    """`start(prepare)` spawns the child (idempotent); `begin` hands it a build's pending checks,
    `extend` more of them (a plan guessed once its artifact's files exist: a merge's output)."""

    def __init__(self) -> None:
        self._proc = None
        self._conn = None
        self._sent: list[Checks] = []  # the batches handed to the child, answered in order
        self._outcomes: list[tuple] = []
        self._confirms: dict[str, Callable[[], bool]] = {}
        self._lock = threading.Lock()  # one reader of the child's answers (nodes may confirm from threads)
        self.overruled: list[str] = []  # keys built again on the checks' plans

    @property
    def started(self) -> bool:
        return self._proc is not None

    def start(self, prepare: Callable[[], None]) -> None:
        """`prepare`: the child's imports (pickled to it: a module-level function or its partial)."""
        if self._proc is None:
            ctx = multiprocessing.get_context("spawn")  # this process runs threads: no fork
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=_serve, args=(child, prepare), name="loadgraph-checks", daemon=True)
            self._proc.start()
            child.close()

    def begin(self, graph, keys: set[str]) -> None:
        """Run the pending checks of `keys`: in the child when every node they gate can run on a
        guess (the guesses are then registered), else here, before any unit."""
        from loadgraph.pipeline.graph import run_checks

        pending = graph.take_checks(keys)
        gated = {key for key, _, _ in pending}
        guessed: list[str] = []
        if self._proc is not None and gated and all(key in graph.guesses for key in gated):
            for key in gated:
                if not graph.guesses[key][0](send=self.extend):
                    break
                guessed.append(key)
        if pending and len(guessed) == len(gated):
            try:
                self._conn.send(pending)
                self._sent, self._confirms = [pending], {key: graph.guesses[key][1] for key in gated}
                return
            except OSError:
                pass  # the child is gone (killed, out of memory): the checks run here
        try:
            run_checks(pending)
        finally:
            for key in guessed:  # withdrawn before any unit ran on them
                try:
                    graph.guesses[key][1]()
                except LoadgraphError:
                    pass  # the checks' own error is the one raised
            self.close()

    def extend(self, checks: Checks) -> None:
        """More checks for the child, answered before any guessed node is confirmed (here, if it is gone)."""
        from loadgraph.pipeline.graph import run_checks

        with self._lock:
            if any(outcome[0] == "refused" for outcome in self._outcomes):
                return  # the build fails on that error at its next unit
            if self._proc is not None:
                try:
                    self._conn.send(checks)
                    self._sent.append(checks)
                    return
                except OSError:
                    pass
        run_checks(checks)

    def raise_if_refused(self) -> None:
        """The checks' error, as soon as the child has reported one (a unit just finished)."""
        with self._lock:
            while self._confirms and len(self._outcomes) < len(self._sent) and self._conn.poll():
                self._receive()
        for outcome in self._outcomes:
            if outcome[0] == "refused":
                raise outcome[1]

    def confirm(self, key: str) -> bool:
        """For a node built on a guess: waits for every check sent so far (raises their error),
        then whether their plans are the guessed ones. True for any other node."""
        if key not in self._confirms:
            return True
        with self._lock:
            while len(self._outcomes) < len(self._sent):
                self._receive()
        self.raise_if_refused()
        agreed = self._confirms.pop(key)()
        if not agreed:
            self.overruled.append(key)
        return agreed

    def _receive(self) -> None:
        from loadgraph.pipeline.graph import run_checks

        try:
            outcome = self._conn.recv()
        except (EOFError, OSError):
            outcome = ("crashed", "the checks' process ended")
        if outcome[0] == "crashed":  # killed, out of memory, a library's own failure: judged here
            run_checks(self._sent[len(self._outcomes)])
            outcome = ("passed", None)
        self._outcomes.append(outcome)

    def close(self) -> None:
        from loadgraph.stages.derived_plans import forget_guesses

        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()  # mid-import or mid-check: its memo files are written whole or not at all
            self._proc.join()
            self._conn.close()
            self._proc = None
        forget_guesses()
