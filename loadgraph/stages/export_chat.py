"""An export's tokenizer and Ollama Modelfile under a LLaMA-Factory chat template.

What `llamafactory-cli export` does after saving the weights (data/template.py, train/tuner.py,
llamafactory 0.9.5): the template's first stop word replaces the eos token (`replace_eos`), the
other stop words become additional special tokens, a missing pad token becomes the eos, the
jinja chat template is replaced by one built from the template's slots where the template says so
(`replace_jinja_template`) or the tokenizer has none, the padding side is set to left, the
tokenizer is saved, and a `Modelfile` is written from the template's slots. The template's data
(loadgraph/llamafactory_templates.py) is LLaMA-Factory's own; templates with token-id slots, which
neither a chat template nor a Modelfile can hold, are refused at plan time (spec.ExportSpec).
"""

from __future__ import annotations

from pathlib import Path

from loadgraph.errors import InputError


def apply_template(out: Path, template: dict, trust_remote_code: bool) -> None:
    from transformers import AutoTokenizer

    # LLaMA-Factory's load_tokenizer arguments: they are recorded in tokenizer_config.json.
    tokenizer = AutoTokenizer.from_pretrained(str(out), use_fast=True, split_special_tokens=False, padding_side="right",
                                              trust_remote_code=trust_remote_code)
    _fix_special_tokens(tokenizer, template)
    if tokenizer.chat_template is None or template["replace_jinja_template"]:
        tokenizer.chat_template = jinja_template(tokenizer, template)
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"
    tokenizer.save_pretrained(str(out))
    (out / "Modelfile").write_text(modelfile(tokenizer, template), encoding="utf-8")


def _set_eos(tokenizer, eos: str) -> None:
    if tokenizer.eos_token != eos:
        tokenizer.add_special_tokens({"eos_token": eos})


def _fix_special_tokens(tokenizer, template: dict) -> None:
    stop_words = list(template["stop_words"])
    if template["replace_eos"]:
        if not stop_words:
            raise InputError(f"template {template['name']!r}: replace_eos needs stop words")
        _set_eos(tokenizer, stop_words.pop(0))
    if tokenizer.eos_token_id is None:
        _set_eos(tokenizer, "<|endoftext|>")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if stop_words:
        try:
            tokenizer.add_special_tokens({"additional_special_tokens": stop_words}, replace_additional_special_tokens=False)
        except TypeError:  # tokenizers without that argument, as LLaMA-Factory falls back
            tokenizer.add_special_tokens({"additional_special_tokens": stop_words})


def _jinja_escape(text: str) -> str:
    return text.replace("'", r"\'")


def _pieces(slots: list, tokenizer, placeholder: str) -> list[tuple[bool, str]]:
    """The slots as (is_variable, text) pieces, split as LLaMA-Factory's _convert_slots_to_jinja
    and _convert_slots_to_ollama both split them: a token slot is the token's text (not
    {{ eos_token }}: the eos may have been replaced), a dict slot cannot be rendered."""
    items: list[tuple[bool, str]] = []
    for slot in slots:
        if isinstance(slot, str):
            pieces = slot.split("{{content}}")
            if pieces[0]:
                items.append((False, pieces[0]))
            if len(pieces) > 1:
                items.append((True, placeholder))
                if pieces[1]:
                    items.append((False, pieces[1]))
        elif "token" in slot:
            if slot["token"] == "bos_token" and tokenizer.bos_token_id is not None:
                items.append((False, tokenizer.bos_token))
            elif slot["token"] == "eos_token" and tokenizer.eos_token_id is not None:
                items.append((False, tokenizer.eos_token))
        else:
            raise InputError("template: a dict slot cannot go into a chat template or Modelfile (LLaMA-Factory refuses it too)")
    return items


def _jinja_slots(slots: list, tokenizer, placeholder: str = "content") -> str:
    """LLaMA-Factory's _convert_slots_to_jinja: a jinja expression joining the slots."""
    return " + ".join(text if var else "'" + _jinja_escape(text) + "'" for var, text in _pieces(slots, tokenizer, placeholder))


def jinja_template(tokenizer, template: dict) -> str:
    """LLaMA-Factory's _get_jinja_template (Template's, or Llama2Template's that fuses the system
    prompt into the first user turn), character for character."""
    prefix = _jinja_slots(template["prefix"], tokenizer)
    system = _jinja_slots(template["system"], tokenizer, placeholder="system_message")
    user = _jinja_slots(template["user"], tokenizer)
    assistant = _jinja_slots(template["assistant"], tokenizer)
    out = "{{ " + prefix + " }}" if prefix else ""
    if template["default_system"]:
        out += "{% set system_message = '" + _jinja_escape(template["default_system"]) + "' %}"
    out += ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
            "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% endif %}")
    if template["jinja"] == "llama2":
        out += ("{% for message in loop_messages %}{% if loop.index0 == 0 and system_message is defined %}"
                "{% set content = " + system + " + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}")
    else:
        out += "{% if system_message is defined %}{{ " + system + " }}{% endif %}{% for message in loop_messages %}{% set content = message['content'] %}"
    return out + ("{% if message['role'] == 'user' %}{{ " + user + " }}{% elif message['role'] == 'assistant' %}{{ " + assistant + " }}"
                  "{% endif %}{% endfor %}")


def _slots(slots: list, tokenizer, placeholder: str) -> str:
    """LLaMA-Factory's _convert_slots_to_ollama."""
    return "".join("{{ " + text + " }}" if var else text for var, text in _pieces(slots, tokenizer, placeholder))


def modelfile(tokenizer, template: dict) -> str:
    """LLaMA-Factory's get_ollama_modelfile, character for character."""
    prefix = _slots(template["prefix"], tokenizer, "content")
    system = _slots(template["system"], tokenizer, ".System")
    user = _slots(template["user"], tokenizer, ".Content")
    assistant = _slots(template["assistant"], tokenizer, ".Content")
    text = (f"{prefix}{{{{ if .System }}}}{system}{{{{ end }}}}"
            f"""{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{user}"""
            f"""{{{{ else if eq .Role "assistant" }}}}{assistant}{{{{ end }}}}{{{{ end }}}}""")
    out = "# ollama modelfile auto-generated by llamafactory\n\n"
    out += f'FROM .\n\nTEMPLATE """{text}"""\n\n'
    if template["default_system"]:
        out += f'SYSTEM """{template["default_system"]}"""\n\n'
    stop_ids = {tokenizer.eos_token_id}  # a set, iterated as LLaMA-Factory iterates it
    for token in template["stop_words"]:
        stop_ids.add(tokenizer.convert_tokens_to_ids(token))
    for token_id in list(stop_ids):
        out += f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(token_id)}"\n'
    return out + "PARAMETER num_ctx 4096\n"
