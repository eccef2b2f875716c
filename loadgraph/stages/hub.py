"""Hub repos at plan time without their weights; each weight downloaded by the fetch unit that needs it.

A plan lists the repo at a resolved commit (one API call: file names, sizes, LFS sha256s) and
downloads only the small files it reads (configs, tokenizer, index, code). A weight's LFS
sha256 names its content, so the key is known without its bytes; the fetch unit downloads the
file wherever it runs (`download`) and checks that sha256. Offline (HF_HUB_OFFLINE) a repo is
read from the local hub cache as before.

Where downloads go: HF_HUB_CACHE (or HF_HOME) when the user set one, since they said where hub
files live; otherwise the loadgraph cache root's `hub/`, because the cache is the one place every
node is known to reach (a weight is downloaded once for the cluster, not once per node) and it is
on the same filesystem as `objects/`, so the fetch unit hardlinks the blob instead of copying it.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

from loadgraph.errors import BuildError, InputError
from loadgraph.formats.checkpoint import AUX_PATTERNS, PICKLE_SUFFIXES

WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# What a plan reads besides weights: configs, the index, tokenizer and template files, code.
PLAN_SUFFIXES = (".json", ".py", ".txt", ".model", ".jinja", ".tiktoken")


class HubUnreachable(InputError):
    """The hub did not answer (not: it answered that the repo or revision does not exist)."""


@dataclass
class HubRepo:
    """A repo resolved online: where its plan-time files are, and the weights left to the units."""

    repo: str
    commit: str
    cache_dir: str
    snapshot: Path
    remote: dict[str, dict] = field(default_factory=dict)  # relname -> {size, sha256}: not downloaded
    # Whole in the default hub cache already: read there by units on the driver's node, as offline.
    whole: bool = False

    def runtime(self) -> dict | None:
        """What a fetch unit on any node needs to download a file (JSON, not in the key)."""
        if self.whole:
            return None
        return {"repo": self.repo, "commit": self.commit, "cache_dir": self.cache_dir, "sizes": {r: m["size"] for r, m in self.remote.items()}}


def download_dir(cache_root: Path) -> str:
    """The hub cache downloads go to (module docstring: why the loadgraph cache by default)."""
    from huggingface_hub import constants

    user_set = any(os.environ.get(v) for v in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"))
    if user_set or constants.HF_HUB_CACHE != constants.default_cache_path:
        return str(constants.HF_HUB_CACHE)
    return str(Path(cache_root).absolute() / "hub")


def _snapshot(cache_dir: str, repo: str, commit: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir) / repo_folder_name(repo_id=repo, repo_type="model") / "snapshots" / commit


def _is_weight(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) and not name.startswith("training_args")


def resolve(repo: str, revision: str | None, what: str, cache_root: Path, allow_patterns: list[str] | None = None,
            eager: bool = False) -> HubRepo:
    """The repo at a commit, its plan-time files downloaded (weights stay remote unless already
    whole in the default hub cache). `eager` downloads the weights too (adapters: MBs, and the
    plan's checks read their tensors)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    where = f"{what}: {repo}@{revision or 'main'}"
    try:
        # A fresh HfApi reads the endpoint now (the module's shared one froze it at import).
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except RevisionNotFoundError:
        raise InputError(f"{where}: no such revision on the hub; name an existing branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise InputError(f"{where}: no such repo on the hub (or it is private/gated: log in with `hf auth login`)") from None
    except Exception as exc:  # the hub unreachable: say so in one line (a local snapshot is tried first by the caller)
        raise HubUnreachable(f"{where}: cannot list the repo on the hub: {_first_line(exc)}") from None
    commit = info.sha
    files = {s.rfilename: s for s in info.siblings or [] if "/" not in s.rfilename}
    if allow_patterns is not None:
        files = {n: s for n, s in files.items() if any(fnmatch.fnmatch(n, p) for p in allow_patterns)}
    from huggingface_hub import constants

    weights = [n for n in files if _is_weight(n)]
    default = _snapshot(constants.HF_HUB_CACHE, repo, commit)
    if weights and all((default / n).exists() for n in weights):
        cache_dir = str(constants.HF_HUB_CACHE)
        whole = True
    else:
        cache_dir, whole = download_dir(cache_root), False
    remote = {} if (eager or whole) else {n: {"size": s.lfs.size, "sha256": s.lfs.sha256} for n, s in files.items() if _is_weight(n) and s.lfs}
    needed = [n for n in files if n not in remote and (n.endswith(PLAN_SUFFIXES) or n in AUX_PATTERNS or _is_weight(n))]
    for name in needed:
        try:
            fetch_file(repo, commit, name, cache_dir)
        except BuildError as exc:
            raise InputError(f"{where}: {name}: {_first_line(exc)}") from None
    snapshot = _snapshot(cache_dir, repo, commit)
    snapshot.mkdir(parents=True, exist_ok=True)  # a repo of weights only has no small file to create it
    return HubRepo(repo, commit, cache_dir, snapshot, remote, whole)


def fetch_file(repo: str, commit: str, name: str, cache_dir: str) -> Path:
    """One file of the repo at `commit` in `cache_dir` (no request when already there)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, name, revision=commit, cache_dir=cache_dir))
    except Exception as exc:
        raise BuildError(f"{repo}@{commit[:12]}: cannot download {name} from the hub into {cache_dir}: {_first_line(exc)}") from None


def download(hub: dict, name: str) -> Path:
    """A fetch unit's source file, downloaded on this node if it is not in the hub cache yet."""
    return fetch_file(hub["repo"], hub["commit"], name, hub["cache_dir"])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def remote_tensors(hub: dict, files: list[str]) -> dict[str, dict]:
    """name -> {dtype, shape} of the weight files' tensors, from their headers read on the hub
    with range requests (the first 100 kB of each, rarely a second): what the plan's adapter
    checks need, without downloading the weights. In checkpoint order (file, then offset)."""
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import HfApi

    api = HfApi()

    def header(name: str):
        try:
            return api.parse_safetensors_file_metadata(hub["repo"], name, revision=hub["commit"])
        except Exception as exc:
            raise InputError(f"{hub['repo']}@{hub['commit'][:12]}: cannot read the header of {name} on the hub: {_first_line(exc)}") from None

    with ThreadPoolExecutor(max_workers=min(8, len(files) or 1)) as pool:
        metas = list(pool.map(header, files))
    table: dict[str, dict] = {}
    for meta in metas:
        for name, info in sorted(meta.tensors.items(), key=lambda kv: kv[1].data_offsets[0]):
            table[name] = {"dtype": info.dtype, "shape": list(info.shape)}
    return table
