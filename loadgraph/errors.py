"""The two kinds of failure a user sees, mapped to the CLI's exit codes."""

from __future__ import annotations


class LoadgraphError(Exception):
    """Base class; its message is one line a user can act on."""

    exit_code = 1


class InputError(LoadgraphError):
    """Bad input: spec, files, arguments (exit 2). Raised before any artifact is published."""

    exit_code = 2


class BuildError(LoadgraphError):
    """A build that failed while running (exit 1)."""

    exit_code = 1


def disk_full_message(cache_root: object, what: str) -> str:
    """The one line for ENOSPC in the cache, the same under every executor."""
    return (f"no space left on the device of the cache {cache_root} while building {what}: nothing was published; "
            "free space (e.g. `loadgraph cache gc --max-size ...`) and rerun, finished units are kept")


class CorruptInput(BuildError):
    """A cached input's bytes no longer match their recorded digest; `key` names the entry to evict
    and rebuild (the runner does, then walks the graph again)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key

    def __reduce__(self):  # raised in a Ray task: rebuilt in the driver with its key
        return (type(self), (str(self), self.key))
