"""Where a cold build's wall time goes: the CLI's build with a mark at each phase.

    python -m benchmarks.timeline LOG build SPEC --executor local --cache DIR

writes `[seconds since start] > phase` / `< phase` lines to LOG: loadgraph's imports, compile (the
source hashing), the checks (transformers' meta model, PEFT's config checks: their imports), each
node and its assembly. A finished build ends in os._exit, so the last mark is `< build`.
"""

from __future__ import annotations

import sys
import time

T0 = time.perf_counter()


def main(argv: list[str]) -> None:
    log = open(argv[0], "w", encoding="utf-8")

    def mark(what: str) -> None:
        log.write(f"[{time.perf_counter() - T0:6.2f}] {what}\n")
        log.flush()

    import loadgraph.cli as cli
    import loadgraph.import_warmup as import_warmup
    import loadgraph.pipeline.check_process as check_process
    import loadgraph.pipeline.graph as graph
    import loadgraph.pipeline.runner as runner

    mark("imports")

    def wrap(owner, name: str) -> None:
        inner = getattr(owner, name)

        def marked(*args, **kwargs):
            mark(f"> {name} {getattr(args[0], 'stage', '') if args else ''}")
            try:
                return inner(*args, **kwargs)
            finally:
                mark(f"< {name}")

        setattr(owner, name, marked)

    for owner, name in ((graph.Graph, "run_checks"), (cli, "_compile"), (runner, "_build_node"), (runner, "build"), (runner, "run_jobs"),
                        (check_process.ChecksBeside, "begin"), (check_process.ChecksBeside, "confirm"), (check_process.ChecksBeside, "extend"),
                        (import_warmup.ImportWarmup, "_run")):
        wrap(owner, name)
    sys.argv = ["loadgraph", *argv[1:]]
    cli.main()


if __name__ == "__main__":
    main(sys.argv[1:])
