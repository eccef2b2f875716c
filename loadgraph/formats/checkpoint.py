"""A Hugging Face checkpoint directory: which files it holds and which tensors live where.

Everything here reads headers and small JSON files only, so it is instant on a 100 GB model.
Paths named inside the checkpoint (index entries, symlinks) are confined to the directory.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from loadgraph.errors import InputError
from loadgraph.formats.safetensors import Header, TensorEntry, read_header

INDEX_NAME = "model.safetensors.index.json"
_COMMIT_DIR = re.compile(r"[0-9a-f]{40}")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Files a checkpoint carries besides weights, which loaders look for by name.
AUX_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "video_preprocessor_config.json",
)
TOKENIZER_FILES = frozenset(AUX_PATTERNS) - {"config.json", "generation_config.json"}
# LLaVA's own training outputs: projector (and other non-LoRA) tensors, always pickled by its
# trainer. Flat state dicts that torch.load(weights_only=True) reads without running code, so
# they need no allow_pickle (a pickled *model* still does).
LLAVA_SIDE_FILES = ("mm_projector.bin", "non_lora_trainables.bin")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class Checkpoint:
    """A validated view of a checkpoint directory's weights and companion files."""

    root: Path
    weight_files: list[str]  # relative names, in index/file order
    aux_files: list[str]
    pickle_files: list[str] = field(default_factory=list)
    headers: dict[str, Header] = field(default_factory=dict)

    @property
    def tensors(self) -> dict[str, tuple[str, TensorEntry]]:
        """tensor name -> (file, entry), in checkpoint order (file order, then offset)."""
        table: dict[str, tuple[str, TensorEntry]] = {}
        for fname in self.weight_files:
            for name, entry in sorted(self.headers[fname].tensors.items(), key=lambda kv: kv[1].begin):
                table[name] = (fname, entry)
        return table

    def config(self) -> dict:
        path = self.root / "config.json"
        if not path.exists():
            return {}
        return load_json(path)


def side_file_notice(path: Path) -> None:
    """The one notice for a LLaVA side file read without allow_pickle (warnings shows it once)."""
    import warnings

    warnings.warn(
        f"{path.name}: LLaVA's pickled side file, read with torch.load(weights_only=True) (tensors only, no code runs)",
        UserWarning,
        stacklevel=2,
    )


def load_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); fix or remove the file") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to be a config; fix or remove the file") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a JSON object")
    return doc


def confined(root: Path, relname: str, what: str) -> Path:
    """Resolve a checkpoint-relative name, refusing absolute paths, `..` and symlink escapes."""
    pure = PurePosixPath(relname)
    if not relname or pure.is_absolute() or ".." in pure.parts or "\\" in relname or relname.startswith("~"):
        raise InputError(f"{what}: path {relname!r} is absolute or leaves the checkpoint directory; only file names inside it are allowed")
    if "\x00" in relname:
        raise InputError(f"{what}: path {relname!r} contains a NUL byte; only file names inside the checkpoint are allowed")
    path = root / pure
    try:
        real_root = root.resolve()
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # name too long, symlink loop
        raise InputError(f"{what}: path {relname!r} cannot be resolved ({exc.__class__.__name__}); only file names inside the checkpoint are allowed") from None
    blobs = hub_blobs(real_root)
    if real != real_root and real_root not in real.parents and not (blobs and real.parent == blobs):
        raise InputError(f"{what}: {relname!r} resolves outside the checkpoint directory (symlink to {real}); copy the file in instead")
    return path


def hub_blobs(snapshot: Path) -> Path | None:
    """The repo's blobs/ if `snapshot` is really a hub cache snapshot, else None.

    A hub snapshot's files are links into its repo's own blobs/ (`<repo>/snapshots/<commit>/f ->
    ../../blobs/<sha>`); only that structure earns the exception (a directory named by a commit
    in snapshots/, beside blobs/, in a `models--org--name` repo dir or one with refs/), and only
    for links that land directly in blobs/: a directory that merely sits in a folder named
    `snapshots` does not. (refs/ alone is not required: a download pinned to a commit has none.)"""
    parent = snapshot.parent
    repo = parent.parent
    if parent.name != "snapshots" or not _COMMIT_DIR.fullmatch(snapshot.name) or not (repo / "blobs").is_dir():
        return None
    if not (repo / "refs").is_dir() and not repo.name.startswith(("models--", "datasets--", "spaces--")):
        return None
    return repo / "blobs"


def scan_checkpoint(root: str | os.PathLike, *, allow_pickle: bool = False, read_headers: bool = True,
                    remote: frozenset[str] = frozenset()) -> Checkpoint:
    """List and validate a checkpoint directory (headers, index, file confinement).

    `remote`: top-level files the checkpoint has that are not downloaded yet (a hub repo's
    weights, fetched by the units); they count as present, and their headers are not read."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: no such file or directory; give a local checkpoint directory or a hub repo id")
    if not root.is_dir():
        raise InputError(f"{root}: not a directory; give the checkpoint's directory")
    names = sorted(p.name for p in root.iterdir() if p.is_file() or p.is_symlink())
    for name in names:
        confined(root, name, str(root / name))
    names = sorted(set(names) | remote)
    aux = [n for n in names if n in AUX_PATTERNS]
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) and not n.startswith("training_args")]
    if "adapter_config.json" in names:
        # A LoRA output (LLaVA's: adapter beside config.json and its side files): the adapter's
        # weights are fetched as an adapter, not as the model's.
        pickles = [n for n in pickles if n not in ADAPTER_FILES]
    index_path = root / INDEX_NAME
    if index_path.exists():
        weight_files = _files_from_index(root, index_path, remote)
    else:
        weight_files = [n for n in names if n.endswith(".safetensors") and not ("adapter_config.json" in names and n in ADAPTER_FILES)]
    if not weight_files and pickles and all(n in LLAVA_SIDE_FILES for n in pickles):
        allow_pickle = True  # read with weights_only=True like every pickle here, with one notice
        for name in pickles:
            side_file_notice(root / name)
    if not weight_files and pickles and not allow_pickle:
        raise InputError(
            f"{root}: weights are pickled ({', '.join(pickles[:3])}); pickle can run code: pass allow_pickle=True "
            "(source.allow_pickle: true in a spec) to convert them to safetensors with torch.load(weights_only=True), or supply safetensors"
        )
    if not weight_files and not pickles:
        raise InputError(f"{root}: no *.safetensors weights found; is this a checkpoint directory?")
    ckpt = Checkpoint(root, weight_files, aux, pickles if not weight_files else [])
    if read_headers:
        ckpt.headers = {f: read_header(confined(root, f, str(index_path))) for f in weight_files}
        _check_index_matches(ckpt, index_path)
    return ckpt


def _files_from_index(root: Path, index_path: Path, remote: frozenset[str] = frozenset()) -> list[str]:
    index = load_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_path}: missing or empty 'weight_map'; regenerate the index")
    files: list[str] = []
    for tensor, fname in weight_map.items():
        if not isinstance(fname, str):
            raise InputError(f"{index_path}: weight_map[{tensor!r}] is not a file name")
        path = confined(root, fname, str(index_path))
        if fname not in files:
            try:
                present = fname in remote or path.is_file()
            except OSError:  # e.g. a name too long for the filesystem
                present = False
            if not present:
                raise InputError(f"{index_path}: weight_map names {fname!r} (for {tensor!r}) but that shard is missing; re-download it")
            files.append(fname)
    return files


def _check_index_matches(ckpt: Checkpoint, index_path: Path) -> None:
    seen: dict[str, str] = {}
    for fname in ckpt.weight_files:
        for name in ckpt.headers[fname].tensors:
            if name in seen:
                raise InputError(f"{ckpt.root}: tensor {name!r} appears in both {seen[name]} and {fname}")
            seen[name] = fname
    if index_path.exists():
        weight_map = load_json(index_path)["weight_map"]
        for tensor, fname in weight_map.items():
            if seen.get(tensor) != fname:
                raise InputError(f"{index_path}: weight_map puts {tensor!r} in {fname} but that shard does not hold it")


def parse_size(value: str | int, field_name: str = "max_shard_size") -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (decimal units as transformers uses)."""
    if isinstance(value, int):
        if value <= 0:
            raise InputError(f"{field_name}: must be positive, got {value}")
        return value
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    text = str(value).strip().upper().replace(" ", "")
    num = text.rstrip("BKMGTI")
    unit = text[len(num):] or "B"
    try:
        size = int(float(num) * units[unit])
    except (KeyError, ValueError, OverflowError):
        raise InputError(f"{field_name}: cannot read size {value!r}; write e.g. 5GB, 500MB or 2GiB") from None
    if size <= 0:
        raise InputError(f"{field_name}: must be positive, got {value!r}")
    return size
