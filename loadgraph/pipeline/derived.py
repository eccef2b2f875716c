"""Facts derived from transformers' meta-device model and PEFT's config checks, memoised in the cache.

A merge plan needs the base's name map (formats/names.py: a meta-device model) and PEFT's
acceptance of the adapter's config; a quantization plan needs transformers' quantizer on a meta
model. Each costs the imports of transformers (and PEFT) plus the model, seconds at 7B, although
it is a pure function of small inputs: the base's config files and tensor table, the adapter's
config and tensor headers, the params. Those inputs, the versions of the libraries that judge
them and the digest of loadgraph's own code are the memo's key, so a variant build (a retrained
adapter of the same config on the same base, the same quantization of its re-merged model) and
every Ray worker reuse the plan instead of rebuilding it, and a changed library or a changed
loadgraph never reads a stale one.

Layout: `<cache>/derived/<kind>/<key>.pickle`, holding the BLAKE3 of the payload and the payload.
A file that fails its digest or does not unpickle is recomputed and replaced, never used. Only
successes are stored: a plan that raises (a bad adapter) raises again on every build.
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TypeVar

import blake3

T = TypeVar("T")
DIGEST = 32
# Libraries whose behaviour a derived fact records (the meta model, PEFT's checks, the quantizer).
JUDGES = ("transformers", "peft", "torch", "bitsandbytes", "safetensors")


@lru_cache(maxsize=1)
def _code_and_versions() -> bytes:
    """loadgraph's source (any change may change a derivation: all of it, a few ms) and the judges' versions."""
    h = blake3.blake3()
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    for pkg in JUDGES:
        try:
            h.update(f"{pkg}={version(pkg)}\0".encode())
        except PackageNotFoundError:
            h.update(f"{pkg}=-\0".encode())
    return h.digest()


def memo_key(parts: Sequence[bytes | str]) -> str:
    h = blake3.blake3(_code_and_versions())
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: parts never run together
    return h.hexdigest()


def memo_path(root: Path, kind: str, parts: Sequence[bytes | str]) -> Path:
    return root / "derived" / kind / f"{memo_key(parts)}.pickle"


def lookup(path: Path) -> tuple[bool, object]:
    """(True, value) for an intact memo file, else (False, None)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False, None
    payload = data[DIGEST:]
    if len(data) < DIGEST or blake3.blake3(payload).digest() != data[:DIGEST]:
        return False, None
    try:
        return True, pickle.loads(payload)
    except Exception:  # noqa: BLE001 - a payload of another class layout: recompute
        return False, None


def store(path: Path, value: object) -> None:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(blake3.blake3(payload).digest() + payload)
        os.replace(tmp, path)  # readers see the whole file or none
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only or full cache: the next build derives it again


def enabled() -> bool:
    """LOADGRAPH_DERIVED_MEMO=0 derives every plan afresh (and stores none)."""
    return os.environ.get("LOADGRAPH_DERIVED_MEMO") != "0"


def memoised(root: Path | None, kind: str, parts: Sequence[bytes | str] | None, compute: Callable[[], T]) -> T:
    """`compute()`, or its memo under `root` for `parts` (None: not memoisable, e.g. a pickled input)."""
    if root is None or parts is None or not enabled():
        return compute()
    path = memo_path(Path(root), kind, parts)
    found, value = lookup(path)
    if found:
        return value  # type: ignore[return-value]
    value = compute()
    store(path, value)
    return value


def is_memoised(root: Path | None, kind: str, parts: Sequence[bytes | str] | None) -> bool:
    return root is not None and parts is not None and enabled() and lookup(memo_path(Path(root), kind, parts))[0]
