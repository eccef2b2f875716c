from pathlib import Path

import pytest

from loadgraph.errors import InputError
from loadgraph.spec import load_spec_file, parse_spec


def err(doc) -> str:
    with pytest.raises(InputError) as exc:
        parse_spec(doc, "spec.yaml")
    return str(exc.value)


def test_unknown_key_suggests_nearest():
    msg = err({"source": {"model": "x"}, "export": {"path": "o", "max_shard_sise": "1GB"}})
    assert "export.max_shard_sise" in msg and "'max_shard_size'" in msg
    assert "did you mean 'source'" in err({"sourc": {"model": "x"}})
    assert "targets.0.source.revison" in err({"targets": [{"source": {"model": "x", "revison": "a"}}]})


def test_wrong_types_and_missing_keys():
    assert "dtype" in err({"source": {"model": "x"}, "dtype": "int4"})
    assert "missing required key 'source.model'" in err({"source": {}})
    assert "YAML mapping" in err(["not", "a", "mapping"])


def test_verify_forms():
    assert parse_spec({"source": {"model": "x"}}, "s")[0].verify.logits is True
    assert parse_spec({"source": {"model": "x"}, "verify": False}, "s")[0].verify is None
    assert parse_spec({"source": {"model": "x"}, "verify": {"logits": False}}, "s")[0].verify.logits is False


def test_yaml_syntax_error_names_line(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("source:\n  model: x\n export: [\n")
    with pytest.raises(InputError, match=r"bad.yaml:.*line \d+.*YAML syntax error"):
        load_spec_file(bad)


def test_relative_paths_resolve_against_spec_dir(tmp_path: Path):
    (tmp_path / "m").mkdir()
    spec = tmp_path / "s.yaml"
    spec.write_text("source: {model: ./m}\nexport: {path: ./out}\n")
    [target] = load_spec_file(spec)
    assert target.source.model == str(tmp_path / "m")
    assert target.export.path == str(tmp_path / "out")
    # a hub repo id stays a repo id
    spec.write_text("source: {model: meta-llama/Llama-2-7b-hf}\n")
    assert load_spec_file(spec)[0].source.model == "meta-llama/Llama-2-7b-hf"


def test_missing_spec_file(tmp_path: Path):
    with pytest.raises(InputError, match="spec file not found"):
        load_spec_file(tmp_path / "nope.yaml")


def test_batch_targets_need_distinct_names():
    doc = {"targets": [{"source": {"model": "x"}}, {"source": {"model": "y"}}]}
    assert "distinct" in err(doc)
