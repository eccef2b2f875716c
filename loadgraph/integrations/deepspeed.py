"""DeepSpeed ZeRO-3 hand-off: the cached artifact loaded straight into partitioned parameters.

transformers builds a model under `deepspeed.zero.Init` when an `HfDeepSpeedConfig` with stage 3
is alive at `from_pretrained` time, so each rank only ever holds its partition. The config
must therefore be registered *before* the model is loaded, and kept alive (transformers keeps
only a weak reference) for as long as the model is used. Install with the `[deepspeed]` extra
after torch, without build isolation (DESIGN.md: otherwise pip pulls a CUDA torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loadgraph.loading.dispatch import LoadingError


def zero_stage(config: dict) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def register_zero3(config: dict):
    """Register `config` with transformers; returns the handle the caller must keep alive."""
    if zero_stage(config) != 3:
        raise LoadingError("deepspeed_config: zero_optimization.stage must be 3 for the ZeRO-3 hand-off")
    try:
        from transformers.integrations import HfDeepSpeedConfig
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise LoadingError(f"deepspeed is not installed: pip install 'loadgraph[deepspeed]' after torch, with --no-build-isolation ({exc})") from None
    return HfDeepSpeedConfig(config)


@dataclass
class Zero3Training:
    engine: Any  # deepspeed.DeepSpeedEngine wrapping the model
    optimizer: Any
    loaded: Any  # loadgraph.loading.training.LoadedModel (model, tokenizer, artifact key)


def prepare_zero3(
    spec: Any,
    ds_config: dict,
    *,
    optimizer_factory=None,
    training: dict | None = None,
    cache: Any = None,
    key: str | None = None,
) -> Zero3Training:
    """Build (or take by `key`) the artifact, load it under ZeRO-3 ready to train, and
    `deepspeed.initialize` it. torch.distributed must already be initialised (e.g. by
    `deepspeed.init_distributed`); every rank calls this with the same arguments. Builds on
    several ranks at once are safe: the cache's per-key lock computes each node once.

    `optimizer_factory(params)` gives a client optimizer (e.g. torch.optim.AdamW, which
    DeepSpeed accepts with `zero_allow_untested_optimizer`); without it `ds_config["optimizer"]`
    decides.
    """
    import deepspeed

    from loadgraph.loading.training import load, resolve_spec

    build, _ = resolve_spec(spec, True, training)
    if build.quantize is not None:
        raise LoadingError("ZeRO-3 with a quantized base is not supported: bitsandbytes weights cannot be partitioned here; drop quantize")
    loaded = load(spec, trainable=True, training=training, cache=cache, key=key, device_map=None, deepspeed_config=ds_config)
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    optimizer = optimizer_factory(params) if optimizer_factory is not None else None
    engine, optimizer, _, _ = deepspeed.initialize(model=loaded.model, model_parameters=params, optimizer=optimizer, config=ds_config)
    return Zero3Training(engine, optimizer, loaded)
