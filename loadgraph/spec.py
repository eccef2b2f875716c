"""The declarative build spec: pydantic models and YAML loading.

Unknown keys are errors that name the key and suggest the nearest valid one, because a
mistyped `max_shard_sise` silently ignored would export 5 GB shards nobody asked for.
Relative paths in a spec file are resolved against the spec file's directory.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loadgraph.errors import InputError

Dtype = Literal["auto", "bfloat16", "float16", "float32"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    model: str
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False


class AdapterSpec(_Strict):
    path: str
    revision: str | None = None
    mode: Literal["merge", "attach"] = "merge"
    scale: float = 1.0
    allow_other_base: bool = False  # adapter_config.json names another architecture than the base's


class MergeOptions(_Strict):
    base_roundtrip: Literal["none", "nf4"] = "none"
    # Where the LoRA arithmetic runs. The CPU is bit-identical to PEFT's merge_and_unload; the
    # GPU's float32 products round differently (measured: 8 of 9 cases of the adapter matrix differ
    # in some elements), so `cuda` enters the merge's key and is opt-in. DoRA always runs on the CPU.
    backend: Literal["cpu", "cuda"] = "cpu"
    # once: W + delta in float32, rounded once (PEFT's merge_and_unload today). twice: the delta is
    # rounded to the weight's dtype before the add, as PEFT 0.10 merges fp16 weights on the CPU
    # (LLaVA's builder pins it): where W and the delta nearly cancel the two differ by many ulps.
    delta_rounding: Literal["once", "twice"] = "once"


class QuantizeSpec(_Strict):
    method: str
    double_quant: bool = False
    blocksize: int = 64
    compute_dtype: Dtype | None = None
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"  # 4-bit packing dtype (FSDP QLoRA: the compute dtype)
    skip_modules: list[str] = Field(default_factory=list)
    llm_int8_threshold: float = 6.0
    fp8_block_size: tuple[int, int] = (128, 128)
    backend: Literal["auto", "cpu", "cuda"] = "auto"  # bnb bytes differ between CPU and CUDA


class VerifySpec(_Strict):
    tensors: bool = True  # per-tensor checks: merge, quantize and export against their inputs
    load: bool = True  # the whole-model smoke check (where the model fits)
    finite: bool = True
    logits: bool = True
    atol: float | None = None
    rtol: float | None = None


class ExportSpec(_Strict):
    path: str
    max_shard_size: Union[str, int] = "5GB"
    copy_tokenizer: bool = True
    # Cast floating tensors here, after merging at the source's dtype (LLaMA-Factory's export
    # order); the top-level dtype instead loads in that dtype before merging (PEFT's order).
    dtype: Dtype | None = None
    # A LLaMA-Factory chat template: its eos / padding side / jinja chat template in the exported
    # tokenizer and its Ollama Modelfile, as `llamafactory-cli export` writes them
    # (default_system: the SYSTEM line).
    template: str | None = None
    default_system: str | None = None
    # config.json as LLaMA-Factory's inference load patches it before saving: use_cache (top level
    # and text_config: its use_kv_cache) and a composite config's top-level hidden_size (copied
    # from text_config by its configure_visual_model). None/False: config.json as the input's.
    use_cache: bool | None = None
    top_level_hidden_size: bool = False

    @field_validator("template")
    @classmethod
    def _known_template(cls, v: str | None) -> str | None:
        from loadgraph.llamafactory_templates import TEMPLATES

        if v is not None and v not in TEMPLATES:
            close = difflib.get_close_matches(v, list(TEMPLATES), n=1)
            raise ValueError(f"unknown LLaMA-Factory template {v!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        if v is not None and any("dict" in slot for part in ("prefix", "system", "user", "assistant")
                                 for slot in TEMPLATES[v][part] if isinstance(slot, dict)):
            # LLaMA-Factory's export saves the weights, then fails writing the Modelfile ("Dict is not supported").
            raise ValueError(f"LLaMA-Factory template {v!r} has token-id slots that no Modelfile can hold "
                             "(llamafactory-cli export fails on it too); export without template")
        return v


class ConvertSpec(_Strict):
    """Inputs of the LLaVA convert stage that an original LLaVA checkpoint only names (or lacks)."""

    model_base: str | None = None  # language model for a projector-only checkpoint (mm_projector.*)
    model_base_revision: str | None = None
    vision_tower: str | None = None  # overrides config.json's mm_vision_tower (local dir or hub id)
    vision_tower_revision: str | None = None
    seed: int = 0  # seeds the rows drawn for added tokens: same seed, same bytes
    # "hf": transformers' conversion-script layout (<image>/<pad> tokens, vocabulary padded to 64);
    # "llava": LLaVA's own model kept as trained (what load_pretrained_model returns)
    layout: Literal["hf", "llava"] = "hf"
    # LoRA adapters merged onto model_base before the conversion (LLaVA's LoRA outputs: the
    # adapter was trained on the LLaVA model, whose language model has model_base's names)
    base_adapters: list[AdapterSpec] = Field(default_factory=list)


class BuildSpec(_Strict):
    """One target: a base model, what to do to it, where to put it."""

    name: str = "default"
    source: Source
    dtype: Dtype = "auto"
    adapters: list[AdapterSpec] = Field(default_factory=list)
    merge: MergeOptions = MergeOptions()
    quantize: QuantizeSpec | None = None
    verify: VerifySpec | None = VerifySpec()  # `verify: true|false` or a mapping of checks
    export: ExportSpec | None = None
    convert: ConvertSpec | None = None  # original-format LLaVA sources only

    @field_validator("verify", mode="before")
    @classmethod
    def _verify_bool(cls, v: object) -> object:
        if v is True:
            return {}
        return None if v is False else v


class MatrixSpec(_Strict):
    """One base x N adapter sets x M quantizations: N*M targets sharing everything else.

    Each `adapters` entry is one adapter, a list applied in order, or null (the base alone);
    each `quantize` entry is a quantization or null (none). `name` may use {adapters} and
    {quantize}; `export.path` may use those and {name}, and must when there are several targets.
    """

    name: str = "{adapters}-{quantize}"
    source: Source
    dtype: Dtype = "auto"
    adapters: list[Union[AdapterSpec, list[AdapterSpec], None]] = Field(default_factory=lambda: [None])
    merge: MergeOptions = MergeOptions()
    quantize: list[Union[QuantizeSpec, None]] = Field(default_factory=lambda: [None])
    verify: VerifySpec | None = VerifySpec()
    export: ExportSpec | None = None

    @field_validator("verify", mode="before")
    @classmethod
    def _verify_bool(cls, v: object) -> object:
        return BuildSpec._verify_bool(v)

    def expand(self, origin: str) -> list[BuildSpec]:
        n = len(self.adapters) * len(self.quantize)
        if self.export is not None and n > 1 and "{name}" not in self.export.path:
            raise InputError(f"{origin}: matrix.export.path must contain {{name}} so that each of the {n} targets exports to its own directory")
        shared = self.model_dump(include={"source", "dtype", "merge"})
        targets = []
        for entry in self.adapters:
            stack = [] if entry is None else entry if isinstance(entry, list) else [entry]
            for q in self.quantize:
                labels = {"adapters": "+".join(Path(a.path).name for a in stack) or "base", "quantize": q.method if q else "none"}
                try:
                    name = self.name.format(**labels)
                    export = self.export.model_copy(update={"path": self.export.path.format(name=name, **labels)}) if self.export else None
                except (KeyError, IndexError, ValueError) as exc:
                    raise InputError(f"{origin}: matrix: bad placeholder {exc} in name or export.path; use {{adapters}}, {{quantize}} or {{name}}") from None
                targets.append(BuildSpec(**shared, name=name, adapters=stack, quantize=q, verify=self.verify, export=export))
        return targets


class BatchSpec(_Strict):
    """Several targets compiled into one DAG: `targets:` as written, plus a `matrix:` expanded."""

    targets: list[BuildSpec] = Field(default_factory=list)
    matrix: MatrixSpec | None = None

    def all_targets(self, origin: str) -> list[BuildSpec]:
        targets = list(self.targets) + (self.matrix.expand(origin) if self.matrix else [])
        if not targets:
            raise InputError(f"{origin}: a batch spec needs at least one entry under 'targets' (or a 'matrix')")
        return targets


def _suggest(bad: str, model: type[BaseModel]) -> str:
    close = difflib.get_close_matches(bad, list(model.model_fields), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(model.model_fields)}"


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """Walk a pydantic error location to the model that owns its last key."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        for cand in getattr(ann, "__args__", ()) + (ann,):
            inner = getattr(cand, "__args__", (cand,))
            hit = next((c for c in (cand, *inner) if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if hit:
                current = hit
                break
        else:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


_UNION_TAGS = {"bool", "str", "int", "float"}


def _clean_loc(err: dict) -> tuple:
    # Union members show up in locations as tags ('bool', 'VerifySpec', 'function-after[...]'): drop them.
    return tuple(p for p in err["loc"] if isinstance(p, int) or not (p[:1].isupper() or "[" in p or p in _UNION_TAGS))


def format_validation_error(exc: ValidationError, origin: str, model: type[BaseModel]) -> str:
    """One line. Every unknown key at once (three typos must not take three runs); they come
    first because a mistyped required key is also reported "missing", which they explain."""
    unknown = []
    for err in exc.errors():
        if err["type"] != "extra_forbidden":
            continue
        loc = _clean_loc(err)
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        owner = _model_at(model, loc)
        entry = (dotted, _suggest(str(loc[-1]), owner) if owner else "")
        if entry not in unknown:
            unknown.append(entry)
    if len(unknown) == 1:
        return f"{origin}: unknown key {unknown[0][0]!r}{unknown[0][1]}"
    if unknown:
        return f"{origin}: {len(unknown)} unknown keys: " + ", ".join(f"{d!r} ({hint.lstrip('; ')})" if hint else repr(d) for d, hint in unknown)
    err = exc.errors()[0]
    dotted = ".".join(str(p) for p in _clean_loc(err)) or "(top level)"
    if err["type"] == "missing":
        return f"{origin}: missing required key {dotted!r}"
    return f"{origin}: {dotted}: {err['msg']}"


def parse_spec(doc: Any, origin: str, base_dir: Path | None = None) -> list[BuildSpec]:
    """A loaded YAML document -> the targets it defines (one for a plain spec)."""
    if not isinstance(doc, dict):
        raise InputError(f"{origin}: a spec must be a YAML mapping with 'source' (or 'targets')")
    if "model_name_or_path" in doc:
        from loadgraph.llamafactory import translate

        doc = translate(doc, origin, base_dir)
    model: type[BaseModel] = BatchSpec if ("targets" in doc or "matrix" in doc) else BuildSpec
    try:
        parsed = model.model_validate(doc)
    except ValidationError as exc:
        raise InputError(format_validation_error(exc, origin, model)) from None
    targets = parsed.all_targets(origin) if isinstance(parsed, BatchSpec) else [parsed]
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise InputError(f"{origin}: targets need distinct 'name's (got {names})")
    return [resolve_paths(t, base_dir) for t in targets] if base_dir else targets


def resolve_paths(spec: BuildSpec, base_dir: Path) -> BuildSpec:
    """Make local paths absolute relative to the spec file, leaving hub repo ids alone."""

    def local(p: str) -> str:
        path = Path(p).expanduser()
        if path.is_absolute():
            return str(path)
        candidate = base_dir / path
        looks_local = p.startswith((".", "/", "~")) or candidate.exists()
        return str(candidate.absolute()) if looks_local else p

    updates: dict[str, Any] = {"source": spec.source.model_copy(update={"model": local(spec.source.model)})}
    updates["adapters"] = [a.model_copy(update={"path": local(a.path)}) for a in spec.adapters]
    if spec.convert is not None:
        updates["convert"] = spec.convert.model_copy(update={k: local(v) for k in ("model_base", "vision_tower") if (v := getattr(spec.convert, k))})
    if spec.export and "://" not in spec.export.path:
        path = Path(spec.export.path).expanduser()
        dest = path if path.is_absolute() else (base_dir / path).absolute()
        # Replacing the export deletes its directory: never the one holding this spec (and the
        # inputs it names relative to it), nor one above it.
        real_dest, real_base = dest.resolve(), base_dir.absolute().resolve()
        if real_dest == real_base or real_dest in real_base.parents:
            raise InputError(f"export.path: {real_dest} is or contains the spec's own directory {real_base}; export to a new directory (e.g. ./out)")
        updates["export"] = spec.export.model_copy(update={"path": str(dest)})
    return spec.model_copy(update=updates)


def load_spec_file(path: str | Path) -> list[BuildSpec]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: spec file not found") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read spec ({exc.__class__.__name__})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path}:{where}: YAML syntax error: {problem}") from None
    return parse_spec(doc, str(path), path.parent.absolute())


def load_spec_files(paths: list[str | Path]) -> list[BuildSpec]:
    """Several spec files -> the targets of one DAG (`loadgraph build specs/*.yaml`).

    With more than one file, a plain spec's unnamed target takes its file's stem, so that the
    report names one target per file; a name defined twice is refused, naming both files.
    """
    targets: list[BuildSpec] = []
    defined: dict[str, Path] = {}
    for path in map(Path, paths):
        for target in load_spec_file(path):
            if len(paths) > 1 and target.name == "default":
                target = target.model_copy(update={"name": path.stem})
            if target.name in defined:
                raise InputError(f"{path}: target name {target.name!r} is also defined in {defined[target.name]}; give each target a distinct 'name'")
            defined[target.name] = path
            targets.append(target)
    return targets
