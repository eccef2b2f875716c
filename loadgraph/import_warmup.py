"""The libraries a cold build's checks import, imported on a thread while its sources are hashed.

The checks of a merge or quantize node (graph.run_checks) build transformers' model on the meta
device: their imports (torch, transformers' modeling_utils, bitsandbytes for a quantization) are
4-6 s that hold the GIL, and they cannot start before the plan knows what is not cached. The
plan's source hashing is the one thing that runs before them and does not need the GIL when it
runs in a child process (pipeline/hash_process.py), so the imports start with it. They start only
when sources are hashed (a cached rerun's stat memo hits, so it still imports neither torch nor
transformers), or after compile when checks are pending on a base big enough for a child (a new
adapter on a built base hashes nothing big). PEFT is left to the checks: it is imported with or
without bitsandbytes depending on the graph (peft_import.py), which is not known yet. transformers is left out too when every
plan the checks derive is memoised (stages/derived_plans.py: a variant of a built base needs no
meta model), judged when the warm-up starts, so a cached rerun does not even judge it.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from pathlib import Path

from loadgraph.spec import BuildSpec


def warmup_plan(targets: list[BuildSpec], memo_root: Path | None) -> tuple[bool, list[str]]:
    """(whether the checks get a child beside units on guessed plans, what this process imports).

    Imports: none for a re-shard or an export alone; no transformers when every plan is in
    `memo_root`'s memo or the child derives them. The child (pipeline/check_process.py) is worth it
    when every target, from a base on disk, merges adapters, quantizes to bnb 4-bit with the
    default skips, or both (what the guesses cover: no attachment, conversion or QLoRA round trip)
    and some plan is not memoised (else the checks take milliseconds here). LOADGRAPH_CHECKS_BESIDE=0 keeps the checks in this process, before any unit."""
    if not any(t.adapters or t.quantize or (t.convert and t.convert.base_adapters) for t in targets):
        return False, []
    import os

    from loadgraph.pipeline.derived import enabled
    from loadgraph.stages.derived_plans import plans_memoised

    memoised = memo_root is not None and all(plans_memoised(t, memo_root) for t in targets)
    guessable = all(not t.convert and Path(t.source.model).is_dir() and _guessable(t) for t in targets)
    beside = guessable and not memoised and memo_root is not None and enabled() and os.environ.get("LOADGRAPH_CHECKS_BESIDE") != "0"
    quantizes = any(t.quantize for t in targets)
    return beside, ["torch"] + (["transformers.modeling_utils"] if not (beside or memoised) else []) + (["bitsandbytes"] if quantizes else [])


def local_weight_bytes(targets: list[BuildSpec]) -> int:
    """The bytes of the targets' local bases' weights (a hub repo's count nothing)."""
    return sum(p.stat().st_size for t in targets if Path(t.source.model).is_dir() for p in Path(t.source.model).glob("*.safetensors"))


def _guessable(t: BuildSpec) -> bool:
    """Adapters merged (none attached, no QLoRA round trip), then or only a bitsandbytes 4-bit
    quantization with the default skips (formats/quant_guess.py)."""
    merges = t.merge.base_roundtrip == "none" and all(a.mode == "merge" for a in t.adapters)
    quantizes = t.quantize is not None and t.quantize.method.lower() in ("bnb-nf4", "bnb-fp4") and not t.quantize.skip_modules
    return (bool(t.adapters) or t.quantize is not None) and (not t.adapters or merges) and (t.quantize is None or quantizes)


def import_for_checks(quantizes: bool, merges: bool = True) -> None:
    """The checks' imports, in their child: bitsandbytes for a quantization's meta model, PEFT for
    a merge's checks (without bitsandbytes in a merge-only graph: peft_import.py)."""
    import transformers.modeling_utils  # noqa: F401

    if quantizes:
        import bitsandbytes  # noqa: F401

        if merges:
            import peft  # noqa: F401
        return
    from loadgraph.peft_import import import_peft, without_bitsandbytes

    without_bitsandbytes()
    import_peft()


class ImportWarmup:
    """`start()` (idempotent) imports `modules()` on a thread; `wait()` joins it. The thread is not
    a daemon: an interpreter that exits mid-import (a bad input found after hashing began) waits
    for it instead of tearing down under it."""

    def __init__(self, modules: Callable[[], list[str]]):
        self.modules = modules
        self._thread: threading.Thread | None = None
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            names = self.modules()
            if names:
                self._thread = threading.Thread(target=self._run, args=(names,), name="loadgraph-import-warmup")
                self._thread.start()

    def _run(self, names: list[str]) -> None:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the checks import it again and report the error there
                return

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
