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
