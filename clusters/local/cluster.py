#!/usr/bin/env python3
"""A multi-node Ray cluster on one machine, for development: a head and N workers, each a
`ray start --block` process with every port explicit, its own session, and its PID recorded.

    python clusters/local/cluster.py up --workers 2 --gpus-per-worker 1   # fake GPUs: placement only
    python clusters/local/cluster.py status
    python clusters/local/cluster.py down

`up` prints RAY_ADDRESS (for `loadgraph build` on this machine) and RAY_API_SERVER_ADDRESS (for
`ray job submit` / `loadgraph submit`). `down` stops exactly the processes `up` started, by
PID: never `ray stop`, which stops every Ray cluster on the machine, other people's included.

Why these choices: Ray records "the" cluster of a machine in /tmp/ray; a private --temp-dir
keeps that record (and the session files) to this cluster. Each node gets its OWN temp dir: nodes
sharing one also share runtime_resources/, and one node's runtime-env agent then deletes and
re-unpacks a job's working dir under another node's running driver or workers. The dashboard listens on 127.0.0.1
only. Ray itself advertises the machine's routable IP for its nodes (it rewrites 127.0.0.1),
which is fine on one host. Token auth follows $RAY_AUTH_MODE (default here: disabled, for a
dev box; set RAY_AUTH_MODE=token and a token to try auth).
"""

from __future__ import annotations

import argparse
import json
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_DIR = Path(f"/tmp/lg-devcluster-{os.getuid()}")  # short: Ray's socket paths are length-limited
STATE = "cluster.json"
START_TIMEOUT_S = 120.0


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port never handed out before by this process (two binds may get the same one)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def node_env() -> dict[str, str]:
    env = dict(os.environ)
    # Job drivers and workers inherit this: `python` and `loadgraph` resolve to this environment.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


WORKER_BLOCKS = 48
_BLOCKS = itertools.count(random.randrange(WORKER_BLOCKS))


def worker_port_block() -> int:
    """A 250-port range for one node's workers in 20000-32000: below the kernel's ephemeral range
    (where the other ports above come from, so they cannot fall inside it) and above Ray's default
    worker ports (10002-19999) that other clusters here use; successive nodes get distinct blocks."""
    return 20000 + 250 * (next(_BLOCKS) % WORKER_BLOCKS)


def node_ports() -> list[str]:
    ports = {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    low = worker_port_block()
    # Worker processes need a port range of their own, clear of other clusters' defaults.
    return [f"{k}={v}" for k, v in ports.items()] + [f"--min-worker-port={low}", f"--max-worker-port={low + 200}"]


def http_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def alive_nodes(dashboard: str) -> int:
    doc = http_json(f"{dashboard}/api/v0/nodes?limit=1000")
    if not doc:
        return 0
    return sum(1 for n in doc.get("data", {}).get("result", {}).get("result", []) if n.get("state") == "ALIVE")


def spawn(args: list[str], log: Path) -> int:
    with open(log, "ab") as out:
        # Its own session: `down` can signal exactly this tree, and Ctrl-C here does not reach it.
        proc = subprocess.Popen([ray_executable(), "start", "--block", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=node_env(), start_new_session=True)
    return proc.pid


def wait_for(what: str, check, pids: list[int], timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        dead = [p for p in pids if not pid_alive(p)]
        if dead:
            raise SystemExit(f"{what}: ray start exited early (pid {dead}); see the logs next to {STATE}")
        time.sleep(0.5)
    raise SystemExit(f"{what}: not ready after {timeout:.0f}s; see the logs next to {STATE}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our exited child) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def up(args: argparse.Namespace) -> dict:
    root: Path = args.dir
    if (root / STATE).exists():
        raise SystemExit(f"{root / STATE} exists: a cluster is (or was) running; run `down --dir {root}` first")
    root.mkdir(parents=True, exist_ok=True)
    temp_dir = node_temp_dir(root, 0)
    dashboard_port = args.dashboard_port or free_port()
    gcs_port = args.port or free_port()
    common = [f"--num-cpus={args.cpus_per_node}", f"--object-store-memory={args.object_store_mb * 2**20}", "--disable-usage-stats"]
    state: dict = {"dir": str(root), "temp_dir": str(temp_dir), "dashboard": f"http://127.0.0.1:{dashboard_port}", "nodes": []}
    head_args = ["--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                 f"--ray-client-server-port={free_port()}", "--num-gpus=0", f"--temp-dir={temp_dir}", *node_ports(), *common]
    head = spawn(head_args, root / "head.log")
    state["nodes"].append({"role": "head", "pid": head, "log": str(root / "head.log"), "temp_dir": str(temp_dir)})
    write_state(root, state)
    wait_for("head", lambda: http_json(f"{state['dashboard']}/api/version") is not None, [head])
    # Ray writes the address it advertises (the routable IP, not 127.0.0.1) into the temp dir.
    wait_for("head address", lambda: (temp_dir / "ray_current_cluster").exists(), [head])
    state["address"] = (temp_dir / "ray_current_cluster").read_text().strip()
    for i in range(1, args.workers + 1):
        log = root / f"worker-{i}.log"
        own_temp = node_temp_dir(root, i)
        pid = spawn([f"--address={state['address']}", f"--num-gpus={args.gpus_per_worker}", f"--temp-dir={own_temp}", *node_ports(), *common], log)
        state["nodes"].append({"role": f"worker-{i}", "pid": pid, "log": str(log), "temp_dir": str(own_temp)})
        write_state(root, state)
        # One at a time: a raylet must register within 30 s, and several starting together on a
        # small machine (each with its agents) can miss that.
        wait_for(f"worker-{i}", lambda n=i + 1: alive_nodes(state["dashboard"]) >= n, [pid])
    return state


def node_temp_dir(root: Path, index: int) -> Path:
    """Node `index`'s own Ray temp dir (0 is the head); short, for Ray's socket path limit."""
    return root / f"t{index}"


def write_state(root: Path, state: dict) -> None:
    tmp = root / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, root / STATE)


def down(root: Path, grace_s: float = 30.0) -> list[int]:
    """SIGTERM each `ray start --block` (workers first; it stops its node's processes), then
    SIGKILL whatever is left in those process groups. Returns the PIDs that were signalled."""
    try:
        state = json.loads((root / STATE).read_text())
    except FileNotFoundError:
        return []
    pids = [n["pid"] for n in reversed(state["nodes"])]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)  # the group is this node's session: ours alone
        except (ProcessLookupError, PermissionError):
            pass
    (root / STATE).unlink(missing_ok=True)
    for temp_dir in {state.get("temp_dir", root / "ray"), *(n["temp_dir"] for n in state["nodes"] if "temp_dir" in n)}:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return pids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("up", "down", "status"):
        p = sub.add_parser(name)
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state, logs and Ray's temp dir (default {DEFAULT_DIR})")
        if name == "up":
            p.add_argument("--workers", type=int, default=2)
            p.add_argument("--cpus-per-node", type=int, default=1)
            p.add_argument("--gpus-per-worker", type=int, default=0, help="fake GPUs (a resource count): tests placement, not CUDA")
            p.add_argument("--object-store-mb", type=int, default=100)
            p.add_argument("--port", type=int, default=0, help="GCS port (default: a free one)")
            p.add_argument("--dashboard-port", type=int, default=0, help="dashboard / job API port (default: a free one)")
    args = ap.parse_args(argv)
    if args.cmd == "up":
        try:
            state = up(args)
        except BaseException:
            down(args.dir)
            raise
        print(f"export RAY_ADDRESS={state['address']}")
        print(f"export RAY_API_SERVER_ADDRESS={state['dashboard']}")
        print(f"# {len(state['nodes'])} nodes; stop with: {sys.executable} {__file__} down --dir {args.dir}", file=sys.stderr)
    elif args.cmd == "down":
        pids = down(args.dir)
        print(f"stopped {len(pids)} node(s): pids {pids}" if pids else f"no cluster recorded in {args.dir}")
    else:
        try:
            state = json.loads((args.dir / STATE).read_text())
        except FileNotFoundError:
            print(f"no cluster recorded in {args.dir}")
            return 1
        alive = alive_nodes(state["dashboard"])
        print(json.dumps({**state, "alive_nodes": alive}, indent=2))
        return 0 if alive == len(state["nodes"]) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
