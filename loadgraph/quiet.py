"""Quiet by default: what libraries print during a build goes to the build's log file.

transformers, bitsandbytes, DeepSpeed, tqdm bars and Ray workers (whose output Ray forwards to
the driver's stderr) write to the process's file descriptors 1 and 2, some of them from C or
from threads. Redirecting the descriptors themselves, not just `sys.stderr`, is the one way to
catch all of it: nothing is lost, it is in the log, and the screen shows only loadgraph.
The screen console keeps a duplicate of the original stderr. loadgraph's own warnings are one
plain line on the screen (and in the log); `-v` turns the redirect off and shows everything live.
"""

from __future__ import annotations

import datetime
import io
import os
import tempfile
import sys
import warnings
from pathlib import Path
from types import TracebackType

from rich.console import Console

PACKAGE_DIR = str(Path(__file__).resolve().parent)


def new_log_path(cache_root: Path, command: str = "build") -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return cache_root / "logs" / f"{command}-{stamp}-{os.getpid()}.log"


def is_own_warning(filename: str) -> bool:
    try:
        return str(Path(filename).resolve()).startswith(PACKAGE_DIR + os.sep)
    except OSError:
        return False


class NoiseFilter:
    """Context manager: third-party output to `log_path` (unless verbose), own warnings to `screen`."""

    def __init__(self, log_path: Path, screen: Console, verbose: bool = False):
        self.log_path = log_path
        self.screen = screen
        self.verbose = verbose
        self._saved_fds: dict[int, int] = {}
        self._log: io.TextIOWrapper | None = None
        self._screen_file: io.TextIOWrapper | None = None
        self._old_screen_file = None
        self._old_showwarning = warnings.showwarning

    def __enter__(self) -> "NoiseFilter":
        warnings.showwarning = self._show_warning
        if self.verbose:
            return self
        # A read-only cache still serves builds: the log then goes to this user's temp dir, and
        # where no file can be written at all, third-party output stays live (never lost).
        for path in (self.log_path, Path(tempfile.gettempdir()) / f"loadgraph-logs-{os.getuid()}" / self.log_path.name):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._log = open(path, "a", encoding="utf-8", buffering=1)
                self.log_path = path
                break
            except OSError:
                continue
        else:
            self.verbose = True
            return self
        self._old_screen_file = getattr(self.screen, "_file", None)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        try:
            screen_fd = self.screen.file.fileno()
        except (AttributeError, OSError, ValueError):
            screen_fd = None  # an in-memory console (tests): nothing to keep
        if screen_fd in (1, 2):
            # The screen keeps what stderr was (a terminal, say), so rich still draws live lines.
            self._screen_file = os.fdopen(os.dup(screen_fd), "w", encoding="utf-8", buffering=1)
            self.screen.file = self._screen_file
        for fd in (1, 2):
            self._saved_fds[fd] = os.dup(fd)
            os.dup2(self._log.fileno(), fd)
        return self

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings' signature
        own = is_own_warning(filename)
        if own:
            self.screen.print(f"warning: {message}", highlight=False, markup=False, soft_wrap=True)
        text = warnings.formatwarning(message, category, filename, lineno, line)
        if self._log is not None:
            self._log.write(text)
        elif not own:  # -v: third-party warnings as Python prints them
            sys.stderr.write(text)

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        warnings.showwarning = self._old_showwarning
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for fd, saved in self._saved_fds.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._saved_fds.clear()
        if self._screen_file is not None:
            self.screen.file = self._old_screen_file  # type: ignore[assignment] - None: back to sys.stderr
            self._screen_file.close()
            self._screen_file = None
        if self._log is not None:
            self._log.close()
            self._log = None
            if self.log_path.stat().st_size == 0:
                self.log_path.unlink()  # nothing was said: no file to wonder about
