"""Print LLaMA-Factory's argument keys as TSV (class, dataclass that declares it, key, settable).

Run with the peer's own interpreter (make peer-check): the output is checked in as
llamafactory-keys.tsv, which the offline suite classifies key by key. Transformers'
Seq2SeqTrainingArguments keys are left out of TrainingArguments: they are the trainer's.
"""

import dataclasses
import importlib.metadata

from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments, TrainingArguments
from transformers import Seq2SeqTrainingArguments

hf = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
print(f"# llamafactory {importlib.metadata.version('llamafactory')}, transformers {importlib.metadata.version('transformers')}")
for cls in (ModelArguments, FinetuningArguments, DataArguments, TrainingArguments, GeneratingArguments):
    for f in dataclasses.fields(cls):
        if cls is TrainingArguments and f.name in hf:
            continue
        owner = next(k.__name__ for k in cls.__mro__ if f.name in getattr(k, "__annotations__", {}))
        print(cls.__name__, owner, f.name, "yaml" if f.init else "derived", sep="\t")
