"""Module-name patterns from adapter configs, checked before PEFT matches them with `re`.

PEFT matches `target_modules` / `exclude_modules` (a string is a regex, `re.fullmatch`) and the
keys of `rank_pattern` / `alpha_pattern` (`re.match`) with the standard library's `re`, which has
no timeout: `(.*.*)*Z` backtracks for hours on a 40-character module name. Smarter engines (the
`regex` package) finish such patterns instantly, so they cannot vouch for `re`: the patterns are
tried with `re` itself, exactly as PEFT applies them, in a short-lived child interpreter that is
killed after TIMEOUT_S. One that does not finish is refused, naming the file and field.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from loadgraph.errors import InputError

# Every pattern on every name, together: a sane set finishes in milliseconds.
TIMEOUT_S = 3.0
# Stand-ins for names PEFT matches, when the caller has none: typical lengths and shapes.
SAMPLE_NAMES = (
    "model.layers.0.self_attn.q_proj",
    "model.language_model.layers.31.mlp.experts.gate_up_proj_with_a_long_suffix",
    "base_model.model.model.layers.10.self_attn.o_proj.lora_A.default",
)
_CHILD = """
import json, re, sys
todo = json.load(sys.stdin)
for field, pattern, names in todo:
    print(field, flush=True)
    compiled = re.compile(pattern)
    for name in names:
        compiled.fullmatch(name)
        compiled.fullmatch(name + ".x" * 8 + "!")
print("done", flush=True)
"""
_PLAIN = re.compile(r"[\w.\-]*")


def _patterns(config: Mapping[str, Any]) -> Iterable[tuple[str, str, str]]:
    """(field, regex as PEFT applies it, the pattern as written) for every pattern a PEFT config holds."""
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if isinstance(value, str) and value != "all-linear":
            yield field, value, value  # re.fullmatch(value, key)
    for field in ("rank_pattern", "alpha_pattern"):
        value = config.get(field)
        if isinstance(value, dict):
            for key in value:
                if isinstance(key, str):
                    yield f"{field}[{key!r}]", rf"(.*\.)?({key})$", key  # get_pattern_key: re.match
    layers = config.get("layers_pattern")
    for key in [layers] if isinstance(layers, str) else layers if isinstance(layers, list) else []:
        if isinstance(key, str):
            yield "layers_pattern", rf".*\.{key}\.(\d+)\.", key


def check_patterns(config_path: Path, config: Mapping[str, Any], names: Iterable[str] = ()) -> None:
    """Refuse (InputError) a pattern that is invalid or that takes too long on module names."""
    candidates = list(dict.fromkeys([*list(names)[:64], *SAMPLE_NAMES]))
    todo = []
    for field, pattern, written in _patterns(config):
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as exc:
            raise InputError(f"{config_path}: field {field}: not a valid regular expression ({exc}); fix the pattern") from None
        if not _PLAIN.fullmatch(written):  # plain dotted names cannot backtrack: no child needed
            todo.append((field, pattern, candidates))
    if not todo:
        return
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(json.dumps(todo), timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        started = out.split()
        field = started[-1] if started else todo[0][0]
        raise InputError(
            f"{config_path}: field {field}: the pattern takes too long to match module names (catastrophic backtracking "
            "would hang PEFT); list the module names, or write a simpler pattern"
        ) from None
