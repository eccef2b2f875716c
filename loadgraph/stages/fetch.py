"""fetch: bring a source checkpoint (local directory or hub repo) into the cache.

The node's key is the digest of the source's content (file digests, plus the hub commit),
so moving or renaming a local checkpoint reuses its cache entry and editing one file
rebuilds. Pickled weights are converted to safetensors only when the spec allows pickle.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from loadgraph.errors import BuildError, InputError
from loadgraph.formats.checkpoint import INDEX_NAME, Checkpoint, scan_checkpoint
from loadgraph.formats import digest
from loadgraph.formats.safetensors import copy_and_hash
from loadgraph.pipeline.cache import Cache
from loadgraph.pipeline.hashing import hash_files, key_digest, stat_record
from loadgraph.pipeline.stage import NodeContext, Stage, Unit
from loadgraph.stages import hub
from loadgraph.stages.hub import HubRepo
from loadgraph.stages.inspect import link_or_copy
from loadgraph.spec import Source

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Remote code must be pinned: a branch name could point at different code tomorrow.
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def locate(source_model: str, revision: str | None, what: str, allow_patterns: list[str] | None = None,
           local_files_only: bool = False, cache_dir: str | None = None) -> tuple[Path, str | None]:
    """A local directory as is, or a hub repo downloaded whole (or found offline) at a resolved
    commit: what the loader needs; builds use `open_source`, which leaves weights to the units."""
    path = Path(source_model).expanduser()
    if path.exists():
        return path, None
    _check_repo_id(source_model, what)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = Path(snapshot_download(source_model, revision=revision, allow_patterns=allow_patterns, local_files_only=local_files_only, cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        raise InputError(f"{what}: {source_model}@{revision or 'main'} is not in the local hub cache and HF_HUB_OFFLINE forbids downloading; run `loadgraph prefetch` online first") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise InputError(f"{what}: cannot fetch {source_model}@{revision or 'main'} from the hub: {str(exc).splitlines()[0]}") from None
    return local, local.name  # snapshot directories are named by the commit they hold


def _check_repo_id(source_model: str, what: str) -> None:
    if source_model.startswith((".", "/", "~")) or not REPO_ID.match(source_model):
        raise InputError(f"{what}: {source_model}: no such directory (and not a hub repo id like org/name)")


def open_source(source_model: str, revision: str | None, what: str, cache_root: Path, allow_patterns: list[str] | None = None,
                eager: bool = False) -> tuple[Path, str | None, HubRepo | None]:
    """(directory the plan reads, hub commit, the hub repo when its units download their files).

    Online, a hub repo is listed at its commit and only its small files are downloaded now
    (stages/hub.py); offline, or when the hub is unreachable, the local hub cache is read as is."""
    path = Path(source_model).expanduser()
    if path.exists():
        return path, None, None
    _check_repo_id(source_model, what)
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return (*_locate_local(source_model, revision, what, allow_patterns, cache_root), None)
    try:
        repo = hub.resolve(source_model, revision, what, cache_root, allow_patterns, eager)
    except hub.HubUnreachable:
        try:  # as snapshot_download does: a snapshot already in the local cache still builds
            return (*_locate_local(source_model, revision, what, allow_patterns, cache_root), None)
        except InputError:
            pass
        raise
    return repo.snapshot, repo.commit, (None if repo.whole else repo)


def _locate_local(source_model: str, revision: str | None, what: str, allow_patterns: list[str] | None, cache_root: Path) -> tuple[Path, str | None]:
    """The repo in the local hub cache, else in the one earlier builds downloaded into (`<cache>/hub`)."""
    from huggingface_hub import constants

    try:
        return locate(source_model, revision, what, allow_patterns, local_files_only=True)
    except InputError:
        ours = hub.download_dir(cache_root)
        if ours == str(constants.HF_HUB_CACHE):
            raise
        try:
            return locate(source_model, revision, what, allow_patterns, local_files_only=True, cache_dir=ours)
        except InputError:
            pass
        raise


def resolve_source(source: Source, cache: Cache, what: str = "source.model") -> tuple[dict, dict]:
    """Validate a source before any work and return (params for the key, runtime locator).

    `trust_remote_code` is judged by what it would run: nothing when the checkpoint has no
    custom code; a local directory's code files are pinned by their digests (in the key and the
    manifest, named by `plan`); a hub repo's code only at a 40-hex commit, since a branch could
    point at other code tomorrow. A revision on a local directory pins nothing and is refused.
    """
    field = what.rsplit(".", 1)[0] if what.endswith(".model") else what
    if source.revision is not None and Path(source.model).expanduser().exists():
        raise InputError(
            f"{field}.revision: {source.revision!r} is set but {source.model} is a local directory, whose content is pinned by digest; "
            "a revision selects a hub commit: remove it (model_revision in a LLaMA-Factory YAML)"
        )
    root, commit, repo = open_source(source.model, source.revision, what, cache.root)
    remote = repo.remote if repo else {}
    # Weights still on the hub: their headers are read by the units (inspect), not here.
    ckpt = scan_checkpoint(root, allow_pickle=source.allow_pickle, read_headers=not remote, remote=frozenset(remote))
    check_quantization(ckpt.root / "config.json", ckpt.config())
    code = custom_code_files(ckpt, field) if source.trust_remote_code else []
    if not source.trust_remote_code:
        check_no_custom_code(ckpt.root / "config.json", ckpt.config(), what)
    elif code and commit is not None and not (source.revision and COMMIT.match(source.revision)):
        raise InputError(
            f"{field}.trust_remote_code: {source.model} is a hub repo with custom code ({', '.join(code)}), which runs only at a pinned commit; "
            f"set {field}.revision (model_revision) to a 40-hex commit sha (main is {commit} now)"
        )
    files = source_files(ckpt, bool(code))
    digests = hash_files({rel: root / rel for rel in files if rel not in remote}, cache.root)
    # A hub weight is named by its LFS sha256, as hashing.hub_sha256 names a downloaded one: same key.
    digests.update({rel: f"sha256:{remote[rel]['sha256']}" for rel in files if rel in remote})
    params: dict = {"files": dict(sorted(digests.items())), "commit": commit, "convert_pickle": bool(ckpt.pickle_files)}
    if code:
        params["code"] = {rel: digests[rel] for rel in code}  # the trusted code, by content
    return params, runtime_for(root, repo)


def runtime_for(root: Path, repo: HubRepo | None) -> dict:
    """The fetch node's locator: the directory, and the hub repo when units download from it."""
    return {"path": str(root), **({"hub": repo.runtime()} if repo is not None else {})}


def weights_local(runtime: dict) -> bool:
    """Whether a fetch node's weights are on this machine already (plan-time header checks)."""
    return not (runtime.get("hub") or {}).get("sizes")


def custom_code_files(ckpt: Checkpoint, field: str) -> list[str]:
    """The code files `trust_remote_code` would run: the checkpoint's *.py (auto_map names them)."""
    code = sorted(p.name for p in ckpt.root.glob("*.py"))
    for name in ("config.json", "tokenizer_config.json"):
        path = ckpt.root / name
        auto_map = (ckpt.config() if name == "config.json" else _json_or_empty(path)).get("auto_map") if path.exists() else None
        refs = [v for v in (auto_map or {}).values() for v in (v if isinstance(v, list) else [v]) if isinstance(v, str)]
        elsewhere = sorted({r.split("--")[0] for r in refs if "--" in r})
        if elsewhere:
            # transformers would fetch that repo's code at load time, unpinned by this checkpoint.
            raise InputError(f"{path}: auto_map runs code from another repo ({', '.join(elsewhere)}); {field}.trust_remote_code cannot pin it: vendor the code files into the checkpoint")
        missing = sorted({r.rsplit(".", 1)[0] + ".py" for r in refs} - set(code))
        if missing:
            raise InputError(f"{path}: auto_map names code files the checkpoint lacks ({', '.join(missing)}); add them or drop {field}.trust_remote_code")
    return code


def _json_or_empty(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


# Pre-quantized formats whose weights loadgraph can read and check (bnb, fine-grained fp8).
READABLE_QUANTIZATION = ("bitsandbytes", "fp8")


def check_quantization(config_path: Path, config: dict) -> None:
    """A GPTQ/AWQ/AQLM/... checkpoint is refused before any work: merging into, verifying or
    re-quantizing its packed weights needs that method's kernels, which loadgraph does not run."""
    quant = config.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method and method not in READABLE_QUANTIZATION:
        raise InputError(f"{config_path}: a pre-quantized {method!r} checkpoint is not supported (its packed weights need {method}'s own kernels); "
                         "start from the full-precision checkpoint and quantize with bnb-nf4/bnb-int8/fp8")


def check_no_custom_code(config_path: Path, config: dict, what: str) -> None:
    """A config whose model_type transformers does not know needs its auto_map's code: refused
    here (exit 2) rather than by transformers mid-build with a prompt and a multi-line error."""
    if not config.get("auto_map"):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise InputError(
            f"{config_path}: model_type {model_type!r} exists only as custom code (auto_map) and {what.split('.')[0]}.trust_remote_code is false; "
            "set trust_remote_code: true with a pinned commit revision, or use a checkpoint transformers supports"
        )


def source_files(ckpt: Checkpoint, with_code: bool) -> list[str]:
    weights = ckpt.weight_files or ckpt.pickle_files
    extra = [INDEX_NAME] if (ckpt.root / INDEX_NAME).exists() else []
    if ckpt.pickle_files and (ckpt.root / PICKLE_INDEX).exists():
        extra.append(PICKLE_INDEX)
    if with_code:
        extra += sorted(p.name for p in ckpt.root.glob("*.py"))
    return sorted(set(weights + ckpt.aux_files + extra))


class FetchStage(Stage):
    name = "fetch"
    version = 1

    def units(self, ctx: NodeContext) -> list[Unit]:
        root = Path(ctx.runtime["path"])
        sizes = (ctx.runtime.get("hub") or {}).get("sizes", {})
        return [
            Unit(id=f"file-{i:05d}", payload={"file": rel}, nbytes=sizes[rel] if rel in sizes else (root / rel).stat().st_size)
            for i, rel in enumerate(sorted(ctx.params["files"]))
        ]

    def run_unit(self, ctx: NodeContext, unit: Unit, out: Path) -> dict:
        rel = unit.payload["file"]
        # A hub repo's file is downloaded here, on whichever node runs the unit (no request when
        # the node's hub cache has it); a local directory's is read where it is.
        src = hub.download(ctx.runtime["hub"], rel) if ctx.runtime.get("hub") else Path(ctx.runtime["path"]) / rel
        expected = ctx.params["files"][rel]
        if rel.endswith((".bin", ".pt", ".pth", ".ckpt")):
            if expected.startswith("sha256:"):  # a hub blob: check the bytes against its LFS sha256
                sha = expected.removeprefix("sha256:")
                _check_unchanged(src, expected if digest.matches(src.resolve(), {"size": src.stat().st_size, "sha256": sha}) else "", expected)
            else:
                _check_unchanged(src, key_digest({"meta": digest.file_record(src)[0]}), expected)
            return convert_pickle(src, out)
        linked = False
        record = stat_record(src, expected, ctx.cache.root)
        if record is not None:
            # Unchanged since it was hashed: link (same filesystem) or copy without rehashing.
            linked = link_or_copy(src, out / rel)
            meta, tensors = dict(record["meta"]), record["tensors"]
        elif expected.startswith("sha256:"):  # a hub blob, named by its sha256
            link_or_copy(src, out / rel)
            meta, tensors = {"size": (out / rel).stat().st_size, "sha256": expected.removeprefix("sha256:")}, {}
            _check_unchanged(src, "" if not digest.matches(out / rel, meta) else expected, expected)
        else:
            value, tensors = copy_and_hash(src.resolve(), out / rel)
            meta = {"size": (out / rel).stat().st_size, "blake3": value, **({"tree": digest.TREE} if digest.is_safetensors(rel) else {})}
            _check_unchanged(src, value, expected)
        # "shared": the cache file is the user's own inode; nothing may chmod it or link it into an export.
        meta.update({"shared": True} if linked else {})
        moved = 0 if linked else meta["size"]  # a hardlink reads and writes nothing
        return {"files": {rel: meta}, "bytes": moved, "written": moved, "tensor_digests": {rel: tensors} if tensors else {}}

    def finalize(self, ctx: NodeContext, results: dict[str, dict], out: Path) -> dict:
        if PICKLE_INDEX in ctx.params["files"]:
            # The converted shards replace the .bin ones: rewrite the index to name them.
            index = json.loads((out / PICKLE_INDEX).read_text())
            index["weight_map"] = {k: _safetensors_name(v) for k, v in index["weight_map"].items()}
            (out / PICKLE_INDEX).unlink()
            (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        digests = {rel: d for r in results.values() for rel, d in r.get("tensor_digests", {}).items()}
        return {"source": {"commit": ctx.params["commit"], "origin_path": ctx.runtime["path"]}, "tensor_digests": digests}


def _check_unchanged(src: Path, actual: str, expected: str) -> None:
    if actual != expected:
        raise BuildError(f"{src}: changed while the build ran (digest {actual[:12] or 'differs'} != planned {expected[:12]}); rerun the build")


def _safetensors_name(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    return stem.replace("pytorch_model", "model") + ".safetensors"


def convert_pickle(src: Path, out: Path) -> dict:
    """torch.load(weights_only=True) refuses arbitrary objects: only tensors come out."""
    import pickle

    import torch
    from safetensors.torch import save_file

    try:
        try:
            state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # The legacy (pre-zipfile) format cannot be memory-mapped: read it whole instead.
            state = torch.load(src, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise InputError(f"{src}: refused by torch.load(weights_only=True): {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{src}: not a flat state dict of tensors; cannot convert it to safetensors")
    # safetensors refuses shared storage: give each tensor its own contiguous copy.
    state = {k: v.contiguous().clone() for k, v in state.items()}
    dest = out / _safetensors_name(src.name)
    save_file(state, str(dest), metadata={"format": "pt"})
    meta, tensors = digest.file_record(dest)
    return {"files": {dest.name: meta}, "bytes": src.stat().st_size, "tensor_digests": {dest.name: tensors}}


STAGES = {"fetch": FetchStage}
