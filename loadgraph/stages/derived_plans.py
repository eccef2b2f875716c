"""Merge and quantization plans, memoised in the cache by the small inputs they derive from.

`plan_adapters` and `quant_plan` give what formats/lora_plan.py and formats/quant_plan.py give,
through pipeline/derived.py's memo. What each plan is a function of (its memo key's parts):
- the base's name map: its config.json and its tensor names;
- an adapter's merge plan: that, the base's dtypes and shapes, the adapter's adapter_config.json
  and its safetensors header, the scale;
- a quantization plan: config.json, generation_config.json (the plan renders both), each weight
  file's tensor names, dtypes and shapes, the settings.
A memoised plan names the paths it was derived at; they are replaced by the caller's, so the
merge reads the adapter at hand (an adapter whose config and header are unchanged, retrained in
place or elsewhere, reuses the plan; its tensors are read from where it is now).
A plan may also be guessed without transformers or PEFT (guess_plans, guess_quant; for a merge's
output, on first demand: guess_quant_later) while the checks derive it in a child
(pipeline/check_process.py): until confirmed or withdrawn, a guess is what plan_adapters and
quant_plan return for its key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from loadgraph.errors import InputError
from loadgraph.formats.checkpoint import INDEX_NAME
from loadgraph.formats.safetensors import read_header
from loadgraph.pipeline.derived import is_memoised, memo_key, memoised

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def base_headers(tensors: dict[str, dict]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A manifest's or a scan's tensors as plan_merge takes them: name -> (dtype, shape)."""
    return {name: (t["dtype"], tuple(t["shape"])) for name, t in tensors.items()}


def _names_parts(base_dir: Path, tensors: dict[str, dict]) -> list[bytes | str] | None:
    config = _read(base_dir / CONFIG)
    return None if config is None else [config, "\n".join(sorted(tensors))]


def _adapter_parts(adapter_dir: Path) -> list[bytes | str] | None:
    """Its config and header bytes; None for a pickled adapter (no header to name it by)."""
    config, weights = _read(adapter_dir / ADAPTER_CONFIG), adapter_dir / ADAPTER_WEIGHTS
    if config is None or not weights.is_file():
        return None
    try:
        header = read_header(weights)
    except InputError:
        return None  # LoraAdapter.load reports it
    return [config, json.dumps({n: [e.dtype, list(e.shape)] for n, e in header.tensors.items()}, sort_keys=True)]


def _base_parts(names_parts: list | None, headers: dict) -> list[bytes | str] | None:
    """The base's share of a merge plan's key: its name-map parts, dtypes and shapes."""
    return None if names_parts is None else [*names_parts, json.dumps({n: [d, list(s)] for n, (d, s) in sorted(headers.items())})]


def _merge_base(base_dir: Path, tensors: dict[str, dict]) -> tuple[dict, list[bytes | str] | None]:
    """The base's headers as plan_merge takes them, and its share of a merge plan's key."""
    headers = base_headers(tensors)
    return headers, _base_parts(_names_parts(Path(base_dir), tensors), headers)


def _plan_parts(base_parts: list | None, adapter_dir: Path, scale: float) -> list[bytes | str] | None:
    """An adapter's merge plan's key: the base's parts, the adapter, the scale."""
    adapter_parts = _adapter_parts(adapter_dir)
    return None if base_parts is None or adapter_parts is None else [*base_parts, *adapter_parts, repr(float(scale))]


def plan_adapters(base_dir: Path, tensors: dict[str, dict], adapter_dirs: list[Path], scales: list[float],
                  allow_pickle: bool = False, memo_root: Path | None = None) -> list:
    """Validate every adapter against the base (raises AdapterError) and return [(adapter, merge plan)]."""
    from loadgraph.formats.lora import LoraAdapter
    from loadgraph.formats.lora_plan import plan_merge
    from loadgraph.formats.names import inspect_checkpoint_names

    base_dir = Path(base_dir)
    names_parts = _names_parts(base_dir, tensors)
    headers = base_headers(tensors)
    base_parts = _base_parts(names_parts, headers)
    names: list = []

    def name_map():  # once, and only when an adapter's plan is not memoised
        if not names:
            names.append(memoised(memo_root, "names", names_parts, lambda: inspect_checkpoint_names(base_dir, keys=list(tensors))))
        return names[0]

    plans = []
    for path, scale in zip(map(Path, adapter_dirs), scales):
        parts = _plan_parts(base_parts, path, scale)

        def derive(path=path, scale=scale):
            adapter = LoraAdapter.load(path, allow_pickle=allow_pickle)
            return adapter, plan_merge(adapter, name_map(), headers, scale_multiplier=scale)

        adapter, plan = _guessed("merge-plan", parts) or memoised(memo_root, "merge-plan", parts, derive)
        weights = path / adapter.weights_file.name
        plans.append((replace(adapter, path=path, weights_file=weights), replace(plan, adapter_file=weights)))
    return plans


# Plans guessed by guess_plans and guess_quant_plan, by (kind, memo key), until confirmed;
# _EPOCH[0] counts their changes: the per-process plan and layout caches key on it.
_GUESSED: dict[tuple[str, str], object] = {}
_EPOCH = [0]


def guess_epoch() -> int:
    """Changes whenever a guessed plan is registered or withdrawn (a cache keyed on it never
    serves a withdrawn guess)."""
    return _EPOCH[0]


def _guessed(kind: str, parts: list | None):
    return _GUESSED.get((kind, memo_key(parts))) if parts is not None and _GUESSED else None


def _register(guesses: dict) -> None:
    _GUESSED.update(guesses)
    _EPOCH[0] += 1


def _withdraw(kind: str, parts: list | None):
    found = _GUESSED.pop((kind, memo_key(parts)), None) if parts is not None else None
    _EPOCH[0] += 1
    return found


def guess_plans(base_dir: Path, tensors: dict[str, dict], adapter_dirs: list[Path], scales: list[float], allow_pickle: bool = False) -> bool:
    """Each adapter's merge plan under the identity name map, without transformers or PEFT: what
    the checks derive for a checkpoint that transformers loads under its on-disk names (Llama,
    Qwen, Mistral...). plan_adapters returns these until confirm_plans, so a local merge runs
    while its checks import and derive beside it (pipeline/check_process.py); the runner publishes
    it only if they agree. False (nothing guessed) where the identity map cannot even plan it."""
    from loadgraph.formats.lora import LoraAdapter
    from loadgraph.formats.lora_plan import plan_merge

    headers, base_parts = _merge_base(base_dir, tensors)
    guesses = {}
    for path, scale in zip(map(Path, adapter_dirs), scales):
        parts = _plan_parts(base_parts, path, scale)
        if parts is None:
            return False
        try:
            adapter = LoraAdapter.load(path, allow_pickle=allow_pickle, peft_checks=False)
            guesses["merge-plan", memo_key(parts)] = (adapter, plan_merge(adapter, {n: n for n in tensors}, headers, scale_multiplier=scale))
        except Exception:  # noqa: BLE001 - the checks judge it (and report it)
            return False
    _register(guesses)
    return True


def confirm_plans(base_dir: Path, tensors: dict[str, dict], adapter_dirs: list[Path], scales: list[float], allow_pickle: bool = False,
                  memo_root: Path | None = None) -> bool:
    """After the checks passed: whether every guessed plan equals the one they derived (memoised
    by them in `memo_root`, else derived here). The guesses are dropped either way."""
    _, base_parts = _merge_base(base_dir, tensors)
    guessed = [_withdraw("merge-plan", _plan_parts(base_parts, Path(p), s)) for p, s in zip(adapter_dirs, scales)]
    derived = plan_adapters(base_dir, tensors, adapter_dirs, scales, allow_pickle, memo_root)
    return all(g is not None and plans_fingerprint([g]) == plans_fingerprint([d]) for g, d in zip(guessed, derived))


def plans_fingerprint(plans: list) -> str:
    """What the merge does with each tensor, by value (targets, ranks, scales, order; no paths),
    as a BLAKE3: a guess is confirmed on it, and a merge's unit ids carry a prefix of it, so units
    merged on a plan never pass for another plan's."""
    from loadgraph.formats.digest import digest_bytes

    return digest_bytes(repr([(plan.scale_multiplier, sorted(plan.ops.items())) for _, plan in plans]).encode())


def _weight_headers(base_dir: Path) -> dict[str, dict[str, list]] | None:
    """file -> tensor -> [dtype, shape], from the headers of the files the index names (a merge's
    prospect links its files from staging: no confinement check here, plan_quantization's reads them)."""
    index = _read(base_dir / INDEX_NAME)
    try:
        files = sorted(set(json.loads(index)["weight_map"].values())) if index is not None else ["model.safetensors"]
        return {f: {n: [e.dtype, list(e.shape)] for n, e in read_header(base_dir / f).tensors.items()} for f in files}
    except (InputError, ValueError, KeyError, TypeError):
        return None  # plan_quantization reports it


def _quant_parts(base_dir: Path, settings) -> list[bytes | str] | None:
    config, table = _read(base_dir / CONFIG), _weight_headers(base_dir)
    if config is None or table is None:
        return None
    return [config, _read(base_dir / GENERATION_CONFIG) or b"", json.dumps(table, sort_keys=True), repr(settings)]


def quant_plan(base_dir: str, settings, memo_root: Path | None = None):
    """formats/quant_plan.plan_quantization of `base_dir`, memoised; its base_dir is the caller's.
    Guessed on first demand where guess_quant_later armed these settings and the memo lacks it."""
    from loadgraph.formats.quant_plan import plan_quantization

    parts = _quant_parts(Path(base_dir), settings)
    plan = _guessed("quant-plan", parts)
    if plan is None and parts is not None and settings in _LATER and not is_memoised(memo_root, "quant-plan", parts) \
            and _guess_later(Path(base_dir), settings, parts):
        plan = _guessed("quant-plan", parts)
    plan = plan or memoised(memo_root, "quant-plan", parts, lambda: plan_quantization(base_dir, settings))
    return replace(plan, base_dir=str(base_dir))


# Quantizations of an artifact that does not exist when the checks start (a merge's output):
# settings -> send(dir), which hands the derivation of that dir's plan to the checks' child.
# quant_plan guesses the plan when it is first asked for (the fused merge's prospect, else the
# published merge), once per memo key: _LATER_GUESSES keeps each guess for confirm_quant_later.
_LATER: dict[object, Callable[[Path], None]] = {}
_LATER_GUESSES: dict[str, object] = {}


def guess_quant_later(settings, send: Callable[[Path], None]) -> bool:
    """Arm the guess of formats/quant_guess.py for the artifacts quantized with `settings`; False
    where it cannot guess any (not bnb 4-bit with the default skips)."""
    if not settings.is_4bit or settings.skip_modules:
        return False
    _LATER[settings] = send
    return True


def _guess_later(base_dir: Path, settings, parts: list) -> bool:
    if memo_key(parts) in _LATER_GUESSES:
        return False  # guessed once already: confirmed or withdrawn since
    tensors = {n: {"dtype": d, "shape": shape} for table in (_weight_headers(base_dir) or {}).values() for n, (d, shape) in table.items()}
    if not tensors or not guess_quant(base_dir, tensors, settings):
        return False
    _LATER_GUESSES[memo_key(parts)] = _guessed("quant-plan", parts)
    _LATER[settings](base_dir)
    return True


def confirm_quant_later(base_dir: Path, settings, memo_root: Path | None = None) -> bool:
    """Whether the plan guessed for `base_dir` (if any: else the units used the memoised one)
    writes what the checks' plan does. The same answer for every artifact of the same parts."""
    from loadgraph.formats.quant_guess import unit_fingerprint

    parts = _quant_parts(Path(base_dir), settings)
    guessed = _LATER_GUESSES.get(memo_key(parts)) if parts is not None else None
    if guessed is None:
        return True
    _withdraw("quant-plan", parts)
    return unit_fingerprint(guessed) == unit_fingerprint(quant_plan(str(base_dir), settings, memo_root))


def forget_guesses() -> None:
    """Drop every guess and armed guess (the build that made them ended)."""
    _GUESSED.clear()
    _LATER.clear()
    _LATER_GUESSES.clear()
    _EPOCH[0] += 1


def guess_quant(base_dir: Path, tensors: dict[str, dict], settings) -> bool:
    """Register formats/quant_guess's plan for `base_dir` (as guess_plans does for merges)."""
    from loadgraph.formats.quant_guess import guess_quant_plan

    parts, plan = _quant_parts(Path(base_dir), settings), guess_quant_plan(base_dir, tensors, settings)
    if parts is None or plan is None:
        return False
    _register({("quant-plan", memo_key(parts)): plan})
    return True


def confirm_quant(base_dir: Path, settings, memo_root: Path | None = None) -> bool:
    """After the checks passed: whether the guessed quantization plan writes what theirs does."""
    from loadgraph.formats.quant_guess import unit_fingerprint

    guessed = _withdraw("quant-plan", _quant_parts(Path(base_dir), settings))
    return guessed is not None and unit_fingerprint(guessed) == unit_fingerprint(quant_plan(str(base_dir), settings, memo_root))


def plans_memoised(spec, memo_root: Path) -> bool:
    """Whether every plan the checks of `spec` derive is in the memo, judged before compiling (so a
    cold build's warm-up imports transformers only when a check will build a meta model). False
    where that cannot be told from the spec alone: a hub or converted base, attached adapters, a
    quantization of a merge (its input's config is written by the merge)."""
    from loadgraph.formats.checkpoint import scan_checkpoint
    from loadgraph.stages.quantize import make_settings, settings_params

    base_dir = Path(spec.source.model)
    if spec.convert is not None or not base_dir.is_dir() or any(a.mode != "merge" for a in spec.adapters):
        return False
    if spec.quantize is not None:
        return not spec.adapters and is_memoised(memo_root, "quant-plan", _quant_parts(base_dir, make_settings(settings_params(spec.quantize, spec.dtype))))
    try:
        tensors = {n: {"dtype": e.dtype, "shape": list(e.shape)} for n, (_, e) in scan_checkpoint(base_dir).tensors.items()}
    except Exception:  # noqa: BLE001 - compile reports it
        return False
    _, base_parts = _merge_base(base_dir, tensors)
    return all(is_memoised(memo_root, "merge-plan", _plan_parts(base_parts, Path(a.path), a.scale)) for a in spec.adapters)
