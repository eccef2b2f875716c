"""Spec -> DAG of nodes. A node's key hashes its stage, stage version, params and input keys.

Compiling resolves sources and checks every input a stage will need (headers, adapter
shapes, export destination) so bad input fails here, in seconds, before any work.
Nodes with equal keys are one node: batch targets that share a base build it once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from loadgraph.formats.checkpoint import parse_size
from loadgraph.pipeline.cache import Cache
from loadgraph.pipeline.stage import node_key, stage_version
from loadgraph.spec import BuildSpec, ConvertSpec


@dataclass
class Node:
    key: str
    stage: str
    params: dict
    inputs: dict[str, str]  # input name -> key of the producing node
    runtime: dict = field(default_factory=dict)  # locators that must not enter the key (paths)
    labels: list[str] = field(default_factory=list)

    @property
    def short(self) -> str:
        return self.key[:12]

    def describe(self) -> dict:
        """What an executor needs to run this node's units anywhere (small, JSON-safe)."""
        return {"key": self.key, "stage": self.stage, "params": self.params, "runtime": self.runtime, "inputs": self.inputs}


@dataclass
class Target:
    name: str
    spec: BuildSpec
    final: str  # key of the node whose artifact is the target's product
    export_path: str | None


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)  # insertion order is a topological order
    targets: list[Target] = field(default_factory=list)
    # Preflight checks (adapter shapes, quantization support) of nodes not yet cached, as
    # (node key, check). They import torch/transformers (seconds): `build` shows the plan first.
    checks: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    # For a node whose checks can be guessed ahead (a merge's or a base's bnb 4-bit plan, without
    # transformers or PEFT):
    # (guess, confirm). guess(send=) -> whether its units may run on the guess while the checks run
    # beside them (pipeline/check_process.py; `send` hands them more checks, for a plan guessed
    # later); confirm(), once they passed -> whether they agree.
    guesses: dict[str, tuple[Callable[..., bool], Callable[[], bool]]] = field(default_factory=dict)

    # Where passed checks are remembered: a check is a pure function of its node's key (content
    # addressed) and the versions of the libraries that judge it, so a later plan skips it.
    memo_dir: Path | None = None

    def loads_bitsandbytes(self) -> bool:
        """Whether building may load a bitsandbytes model through PEFT (a quantized model verified
        with adapters attached, a QLoRA base): else PEFT is imported without it (peft_import.py)."""
        return any(n.stage in ("quantize", "attach") or n.params.get("base_roundtrip") == "nf4" for n in self.nodes.values())

    def run_checks(self, keys: set[str] | None = None) -> None:
        """Run (and drop) the pending checks of `keys` (all when None); raises InputError."""
        run_checks(self.take_checks(keys))

    def take_checks(self, keys: set[str] | None = None) -> list[tuple[str, Callable[[], None], Path | None]]:
        """Drop the checks and return those of `keys` not yet passed, each with its memo path."""
        pending, self.checks = self.checks, []
        found = [(key, check, self._memo(key, check)) for key, check in pending if keys is None or key in keys]
        return [(key, check, memo) for key, check, memo in found if memo is None or not memo.exists()]

    def pending_checks(self, keys: set[str]) -> list[str]:
        """Names of the checks of `keys` not yet passed (by this cache's memo)."""
        return [CHECK_LABELS.get(getattr(check, "func", check).__name__, "checks") for key, check in self.checks
                if key in keys and not ((memo := self._memo(key, check)) is not None and memo.exists())]

    def _memo(self, key: str, check: Callable[[], None]) -> Path | None:
        if self.memo_dir is None:
            return None
        import hashlib
        from importlib.metadata import PackageNotFoundError, version

        versions = []
        for pkg in ("loadgraph", "transformers", "peft", "bitsandbytes", "safetensors"):
            try:
                versions.append(f"{pkg}={version(pkg)}")
            except PackageNotFoundError:
                versions.append(f"{pkg}=-")
        name = getattr(check, "func", check).__name__
        return self.memo_dir / hashlib.sha256(f"{key}:{name}:{','.join(versions)}".encode()).hexdigest()

    def add(self, stage: str, params: dict, inputs: dict[str, str], label: str, runtime: dict | None = None) -> Node:
        key = node_key(stage, stage_version(stage), params, inputs)
        node = self.nodes.get(key)
        if node is None:
            node = self.nodes[key] = Node(key, stage, params, inputs, runtime or {})
        if label not in node.labels:
            node.labels.append(label)
        return node


# What each deferred check judges, as `plan` lists the ones still pending.
CHECK_LABELS = {"_preflight_adapters": "adapters against the base model", "_preflight_quantize": "the quantization plan"}


def compile_specs(specs: list[BuildSpec], cache: Cache, defer_checks: bool = False) -> Graph:
    """With `defer_checks` the slow preflight checks stay in `graph.checks` for the runner."""
    graph = Graph(memo_dir=cache.root / "checks")
    for spec in specs:
        graph.targets.append(_compile_target(graph, spec, cache))
    if not defer_checks:
        graph.run_checks()
    return graph


def _compile_target(graph: Graph, spec: BuildSpec, cache: Cache) -> Target:
    from loadgraph.stages.fetch import resolve_source, weights_local

    params, runtime = resolve_source(spec.source, cache)
    code = ", ".join(f"{name} {digest[:12]}" for name, digest in params.get("code", {}).items())
    label = f"{spec.name}: fetch {Path(spec.source.model).name}" + (f" (trusted code, pinned by digest: {code})" if code else "")
    fetched = graph.add("fetch", params, {}, label, runtime)
    inspected = graph.add("inspect", {}, {"model": fetched.key}, f"{spec.name}: inspect")
    # Original-format LLaVA (issue 9): convert to transformers' Llava; later stages see only that.
    current, checked_dir = _llava_convert(graph, spec, cache, runtime["path"], inspected, list(params["files"]))
    # Weights still on the hub: the adapter checks read their headers there (range requests);
    # the quantize check, which needs the files, is left to the units (no download to plan).
    base_hub = runtime["hub"] if current is inspected and not weights_local(runtime) else None
    weight_files = [f for f in params["files"] if f.endswith(".safetensors")]
    base = current
    # A converted source's class is not the one in its files: its adapters' base class is not checked.
    adapters = _adapter_nodes(graph, spec, cache, runtime["path"] if current is inspected else None)
    merged = [(a, n) for a, n in zip(spec.adapters, adapters) if a.mode == "merge"]
    attached = [(a, n) for a, n in zip(spec.adapters, adapters) if a.mode == "attach"]
    cast_done = False
    stages: dict[str, Node] = {}  # the transforming nodes verify checks: merge, quantize, export
    if merged:
        params = {"scales": [a.scale for a, _ in merged], "dtype": spec.dtype, "allow_pickle": spec.source.allow_pickle,
                  "base_roundtrip": spec.merge.base_roundtrip, **({"backend": "cuda"} if spec.merge.backend == "cuda" else {}), **_rounding(spec)}
        inputs = {"model": current.key, **{f"adapter{i}": n.key for i, (_, n) in enumerate(merged)}}
        current = stages["merge"] = graph.add("merge", params, inputs, f"{spec.name}: merge {len(merged)} adapter(s)")
        cast_done = True
        if cache.lookup(current.key) is None and checked_dir:
            args = (checked_dir, [n for _, n in merged], [a.scale for a, _ in merged], spec.source.allow_pickle, base_hub, weight_files, cache.root)
            graph.checks.append((current.key, partial(_preflight_adapters, *args)))
            if base_hub is None:
                graph.guesses[current.key] = (partial(_guess_adapters, *args), partial(_confirm_adapters, *args))
    if spec.quantize is not None:
        from loadgraph.stages.quantize import offset_threads, resolve_backend, settings_params

        qparams = {"settings": settings_params(spec.quantize, spec.dtype), "backend": resolve_backend(spec.quantize.backend)}
        qparams |= offset_threads(qparams["settings"], qparams["backend"])
        of_base = current is inspected
        current = stages["quantize"] = graph.add("quantize", qparams, {"model": current.key}, f"{spec.name}: quantize {spec.quantize.method}")
        cast_done = True
        if cache.lookup(current.key) is None:
            graph.checks.append((current.key, partial(_preflight_quantize, qparams["settings"], None if base_hub else checked_dir, cache.root)))
            if of_base and checked_dir and not base_hub:  # the units plan from the base's own files
                args = (qparams["settings"], checked_dir, cache.root)
                graph.guesses[current.key] = (partial(_guess_quantize, *args), partial(_confirm_quantize, *args))
            elif current.inputs["model"] in graph.guesses:  # a guessed merge's output: planned once its files exist
                args = (qparams["settings"], current.key, str(cache.object_dir(current.inputs["model"])), cache.root)
                graph.guesses[current.key] = (partial(_guess_quantize_later, *args), partial(_confirm_quantize_later, *args))
    if attached:
        params = {"scales": [a.scale for a, _ in attached], "allow_pickle": spec.source.allow_pickle}
        inputs = {"model": current.key, **{f"adapter{i}": n.key for i, (_, n) in enumerate(attached)}}
        current = graph.add("attach", params, inputs, f"{spec.name}: attach {len(attached)} adapter(s)")
        if cache.lookup(current.key) is None and spec.quantize is None and checked_dir:
            graph.checks.append((current.key, partial(_preflight_adapters, checked_dir, [n for _, n in attached], [a.scale for a, _ in attached],
                                                       spec.source.allow_pickle, base_hub, weight_files, cache.root)))
    export_path = None
    if spec.export is not None:
        export_params = {
            "max_shard_size": parse_size(spec.export.max_shard_size, "export.max_shard_size"),
            # merge/quantize already applied the dtype; quantized bytes must never be cast.
            "dtype": spec.export.dtype or ("auto" if cast_done else spec.dtype),
            "copy_tokenizer": spec.export.copy_tokenizer,
        }
        if export_params["dtype"] == "auto":
            # The node before the export writes its files in the export's layout: the export links them.
            current.runtime.setdefault("shard_bytes", export_params["max_shard_size"])
        if spec.export.template is not None:
            export_params["template"] = chat_template(spec)
            export_params["trust_remote_code"] = spec.source.trust_remote_code
        if spec.export.use_cache is not None or spec.export.top_level_hidden_size:
            export_params["config_patch"] = {"use_cache": spec.export.use_cache, "top_level_hidden_size": spec.export.top_level_hidden_size}
        current = stages["export"] = graph.add("export", export_params, {"model": current.key}, f"{spec.name}: export")
        export_path = spec.export.path
    if spec.verify is not None:
        _verify_node(graph, spec, current, base, stages, [n for _, n in merged])
    return Target(spec.name, spec, current.key, export_path)


def chat_template(spec: BuildSpec) -> dict:
    """The export's LLaMA-Factory template, by value: its data is part of the export's key."""
    from loadgraph.llamafactory_templates import TEMPLATES

    entry = {"name": spec.export.template, **TEMPLATES[spec.export.template]}
    if spec.export.default_system is not None:
        entry["default_system"] = spec.export.default_system
    return entry


# --- LLaVA original-format conversion (issue 9) -------------------------------------------------
def _llava_convert(graph: Graph, spec: BuildSpec, cache: Cache, source_dir: str, inspected: Node, files: list[str]) -> tuple[Node, str | None]:
    """A convert node after inspect when the source is an original LLaVA checkpoint, else `inspected`.

    Also returns the directory preflight checks may read (the source's, or the converted
    artifact's once cached; None before that: the units check at run time).
    """
    from loadgraph.errors import InputError
    from loadgraph.formats.checkpoint import load_json
    from loadgraph.formats.llava_original import is_original_llava, parse_original
    from loadgraph.spec import Source
    from loadgraph.stages.fetch import resolve_source, weights_local

    config_path = Path(source_dir) / "config.json"
    config = load_json(config_path) if config_path.is_file() else {}
    if not is_original_llava(config):
        if spec.convert is not None:
            raise InputError(f"convert: {config_path} is not an original-format LLaVA config (no mm_* fields); remove the convert block")
        return inspected, source_dir
    options = spec.convert or ConvertSpec()
    info = parse_original(config, str(config_path), options.layout)
    tower = options.vision_tower or info.vision_tower
    if not tower:
        raise InputError(f"{config_path}: mm_vision_tower is not set; name the CLIP vision tower (local dir or hub id) there or in convert.vision_tower")
    inputs = {"model": inspected.key}
    for name, model, revision, what in (("vision", tower, options.vision_tower_revision, "mm_vision_tower"), ("base", options.model_base, options.model_base_revision, "convert.model_base")):
        if model is None:
            continue
        try:
            params, runtime = resolve_source(Source(model=model, revision=revision, allow_pickle=spec.source.allow_pickle), cache, what)
        except InputError as exc:
            raise InputError(str(exc) if str(exc).startswith(what) else f"{what} {model}: {exc}") from None
        fetched = graph.add("fetch", params, {}, f"{spec.name}: fetch {what} {Path(model).name}", runtime)
        inputs[name] = graph.add("inspect", {}, {"model": fetched.key}, f"{spec.name}: inspect {what}").key
        if name == "base" and options.base_adapters:
            base_hub = None if weights_local(runtime) else runtime["hub"]
            weight_files = [f for f in params["files"] if f.endswith(".safetensors")]
            inputs[name] = _base_merge(graph, spec, cache, options, inputs[name], runtime["path"], base_hub, weight_files).key
    # The source's files by name (a hub repo's weights may not be downloaded yet).
    names = sorted({p.name for p in Path(source_dir).iterdir()} | set(files))
    weights = [n for n in names if n.endswith((".safetensors", ".bin")) and not n.startswith("training_args")]
    if weights and all(n.startswith("mm_projector") for n in weights) and "base" not in inputs:
        raise InputError(f"{source_dir}: holds only projector weights ({', '.join(sorted(weights))}); set convert.model_base to the language model it was trained on")
    if options.base_adapters and "base" not in inputs:
        raise InputError("convert.base_adapters: merging adapters before the conversion needs convert.model_base")
    params = {"seed": options.seed, **({"layout": options.layout} if options.layout != "hf" else {})}  # hf keys stay as they were
    node = graph.add("convert", params, inputs, f"{spec.name}: convert LLaVA ({info.text_type}, {info.projector_type}) -> LlavaForConditionalGeneration")
    converted = cache.get(node.key)
    return node, (str(converted.path) if converted else None)


def _base_merge(graph: Graph, spec: BuildSpec, cache: Cache, options: ConvertSpec, base: str, base_dir: str,
                base_hub: dict | None = None, weight_files: list[str] | None = None) -> Node:
    """convert.base_adapters merged onto model_base: the merge node a plain-LM LoRA gets."""
    adapters = _adapter_nodes(graph, spec.model_copy(update={"adapters": options.base_adapters}), cache, base_dir)
    params = {"scales": [a.scale for a in options.base_adapters], "dtype": spec.dtype, "allow_pickle": spec.source.allow_pickle,
              "base_roundtrip": spec.merge.base_roundtrip, **_rounding(spec)}
    node = graph.add("merge", params, {"model": base, **{f"adapter{i}": n.key for i, n in enumerate(adapters)}},
                     f"{spec.name}: merge {len(adapters)} adapter(s) onto convert.model_base")
    if cache.lookup(node.key) is None:
        graph.checks.append((node.key, partial(_preflight_adapters, base_dir, adapters, params["scales"], spec.source.allow_pickle, base_hub, weight_files, cache.root)))
    return node


def _rounding(spec: BuildSpec) -> dict:
    """The merge's delta rounding, in its params (and key) only when not the default."""
    return {"delta_rounding": "twice"} if spec.merge.delta_rounding == "twice" else {}


def scan_is_safetensors(path: str) -> bool:
    return any(Path(path).glob("*.safetensors"))


def _adapter_nodes(graph: Graph, spec: BuildSpec, cache: Cache, base_dir: str | None) -> list[Node]:
    from loadgraph.errors import InputError
    from loadgraph.stages.adapter import check_adapter_base, resolve_adapter

    modes = [a.mode for a in spec.adapters]
    if "attach" in modes and "merge" in modes[modes.index("attach"):]:
        raise InputError("adapters: a merged adapter cannot follow an attached one; list merge adapters first")
    nodes = []
    for i, adapter in enumerate(spec.adapters):
        params, runtime = resolve_adapter(adapter, i, cache, spec.source.allow_pickle)
        if base_dir and not adapter.allow_other_base:
            check_adapter_base(Path(runtime["path"]), Path(base_dir), i)
        nodes.append(graph.add("fetch", params, {}, f"{spec.name}: fetch adapter {Path(adapter.path).name}", runtime))
    return nodes


def run_checks(checks: list[tuple[str, Callable[[], None], Path | None]]) -> None:
    """Run taken checks (Graph.take_checks), remembering each that passes; raises InputError."""
    for _, check, memo in checks:
        check()
        if memo is not None:
            try:
                memo.parent.mkdir(parents=True, exist_ok=True)
                memo.touch()
            except OSError:
                pass  # a read-only cache: the next plan checks again


def _preflight_quantize(settings_params: dict, checked_dir: str | None, memo_root: Path | None = None) -> None:
    """Refuses unsupported methods, options and untileable shapes before any work (the plan is
    memoised in the cache: the quantize units of the same base reuse it)."""
    from loadgraph.stages.derived_plans import quant_plan
    from loadgraph.stages.quantize import make_settings

    settings = make_settings(settings_params)
    if checked_dir and scan_is_safetensors(checked_dir):
        quant_plan(checked_dir, settings, memo_root)


def _guess_quantize(settings_params: dict, checked_dir: str, memo_root: Path | None = None, send=None) -> bool:
    """_preflight_quantize's plan guessed without transformers (formats/quant_guess.py)."""
    from loadgraph.stages.derived_plans import guess_quant
    from loadgraph.stages.quantize import make_settings

    tensors = _local_tensors(checked_dir, False) if scan_is_safetensors(checked_dir) else None
    return tensors is not None and guess_quant(Path(checked_dir), tensors, make_settings(settings_params))


def _confirm_quantize(settings_params: dict, checked_dir: str, memo_root: Path | None = None) -> bool:
    """Whether the guessed quantization plan writes what _preflight_quantize's plan writes."""
    from loadgraph.stages.derived_plans import confirm_quant
    from loadgraph.stages.quantize import make_settings

    return confirm_quant(Path(checked_dir), make_settings(settings_params), memo_root)


def _guess_quantize_later(settings_params: dict, key: str, merged_dir: str, memo_root: Path, send) -> bool:
    """A merge's quantization, guessed when its plan is first asked for (the merge's prospect, or
    its output): the checks' child is then sent _preflight_quantize of those files."""
    from loadgraph.stages.derived_plans import guess_quant_later
    from loadgraph.stages.quantize import make_settings

    return guess_quant_later(make_settings(settings_params), lambda d: send([(key, partial(_preflight_quantize, settings_params, str(d), memo_root), None)]))


def _confirm_quantize_later(settings_params: dict, key: str, merged_dir: str, memo_root: Path) -> bool:
    """Whether the guess for the merge's published output writes what the checks' plan writes."""
    from loadgraph.stages.derived_plans import confirm_quant_later
    from loadgraph.stages.quantize import make_settings

    return confirm_quant_later(Path(merged_dir), make_settings(settings_params), memo_root)


def _preflight_adapters(base_dir: str, adapters: list[Node], scales: list[float], allow_pickle: bool,
                        hub: dict | None = None, weight_files: list[str] | None = None, memo_root: Path | None = None) -> None:
    """Adapter vs base shapes, targets and types, from headers: fails in seconds, before any work.
    `hub`: the base's weights are not downloaded; their headers are read on the hub."""
    from loadgraph.stages.derived_plans import plan_adapters

    if hub is not None:
        if not weight_files:
            return  # pickled base: checked by the merge units once converted
        from loadgraph.stages.hub import remote_tensors

        tensors = remote_tensors(hub, weight_files)
    else:
        tensors = _local_tensors(base_dir, allow_pickle)
        if tensors is None:
            return  # pickled base: checked by the merge units once converted
    plan_adapters(Path(base_dir), tensors, [Path(n.runtime["path"]) for n in adapters], scales, allow_pickle, memo_root)


def _local_tensors(base_dir: str, allow_pickle: bool) -> dict[str, dict] | None:
    """The base's tensor table from its headers; None for a pickled base."""
    from loadgraph.formats.checkpoint import scan_checkpoint

    ckpt = scan_checkpoint(base_dir, allow_pickle=allow_pickle)
    return {n: {"dtype": e.dtype, "shape": list(e.shape)} for n, (_, e) in ckpt.tensors.items()} if ckpt.headers else None


def _guess_adapters(base_dir: str, adapters: list[Node], scales: list[float], allow_pickle: bool, *_, send=None) -> bool:
    """_preflight_adapters' plans guessed without transformers or PEFT (stages/derived_plans.guess_plans)."""
    from loadgraph.stages.derived_plans import guess_plans

    tensors = _local_tensors(base_dir, allow_pickle)
    return tensors is not None and guess_plans(Path(base_dir), tensors, [Path(n.runtime["path"]) for n in adapters], scales, allow_pickle)


def _confirm_adapters(base_dir: str, adapters: list[Node], scales: list[float], allow_pickle: bool, hub: dict | None = None,
                      weight_files: list[str] | None = None, memo_root: Path | None = None) -> bool:
    """Whether the guessed plans equal those _preflight_adapters derived (stages/derived_plans.confirm_plans)."""
    from loadgraph.stages.derived_plans import confirm_plans

    tensors = _local_tensors(base_dir, allow_pickle)
    return tensors is not None and confirm_plans(Path(base_dir), tensors, [Path(n.runtime["path"]) for n in adapters], scales, allow_pickle, memo_root)


def _verify_node(graph: Graph, spec: BuildSpec, final: Node, base: Node, stages: dict[str, Node], adapters: list[Node]) -> None:
    """One verify node over the whole chain: each transforming node checked against its own input."""
    checks = spec.verify
    params: dict = {"tensors": checks.tensors, "load": checks.load, "finite": checks.finite, "logits": checks.logits, "rtol": checks.rtol,
                    "method": spec.quantize.method.lower() if spec.quantize else None, "scales": [],
                    "allow_pickle": spec.source.allow_pickle, "base_roundtrip": spec.merge.base_roundtrip, **_rounding(spec)}
    inputs = {"model": final.key}
    if "merge" in stages:
        params["scales"] = list(stages["merge"].params["scales"])
        inputs.update(merge_base=base.key, merged=stages["merge"].key, **{f"adapter{i}": n.key for i, n in enumerate(adapters)})
    if "quantize" in stages:
        params["quant_settings"] = stages["quantize"].params["settings"]
        inputs.update(quant_input=stages["quantize"].inputs["model"], quantized=stages["quantize"].key)
    if "export" in stages:
        params["export_dtype"] = stages["export"].params["dtype"]
        inputs.update(export_input=stages["export"].inputs["model"], exported=stages["export"].key)
    graph.add("verify", params, inputs, f"{spec.name}: verify")
