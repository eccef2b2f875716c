"""Shared fixtures: tiny checkpoints made offline once per session, a fresh cache per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> "ModelFactory":
    return ModelFactory(tmp_path_factory.mktemp("models"))


class ModelFactory:
    """Makes each (kind, dtype) tiny checkpoint once per session, on first use."""

    def __init__(self, root: Path):
        self.root = root

    def __call__(self, kind: str = "llama", dtype: str = "float32", **kw) -> Path:
        from loadgraph.testing import make_tiny_model

        out = self.root / f"{kind}-{dtype}-{'-'.join(f'{k}{v}' for k, v in sorted(kw.items()))}"
        if not out.exists():
            make_tiny_model(kind, out, dtype=dtype, **kw)
        return out

    def copy(self, dest: Path, kind: str = "llama", dtype: str = "float32") -> Path:
        """A private, mutable copy (for tests that damage their input)."""
        shutil.copytree(self(kind, dtype), dest)
        return dest


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def write_spec(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command line in a subprocess: real exit codes, real stderr."""
    return subprocess.run(
        [sys.executable, "-m", "loadgraph.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
