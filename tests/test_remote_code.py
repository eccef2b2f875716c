"""`trust_remote_code` by what it would run: no code, local code pinned by digest, hub code at a commit."""

from __future__ import annotations

import json
import shutil

from conftest import run_cli, write_spec

CODE = "from transformers import LlamaForCausalLM\n\n\nclass AcmeForCausalLM(LlamaForCausalLM):\n    pass\n"


def _with_code(src, dest, code: str = CODE):
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"}
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "modeling_acme.py").write_text(code)
    return dest


def _hub_cache(root, repo: str, commit: str, files_from):
    """A huggingface_hub cache holding `repo` at `commit` (refs/main points at it), as a download leaves it."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(files_from, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return root


def _plan(tmp_path, source: dict, env: dict | None = None, name: str = "s.yaml"):
    spec = write_spec(tmp_path / name, {"source": source, "verify": False})
    return run_cli("plan", spec, "--json", "--cache", tmp_path / "cache", env=env)


def test_no_custom_code_needs_no_pin(models, tmp_path):
    proc = _plan(tmp_path, {"model": str(models("llama")), "trust_remote_code": True})
    assert proc.returncode == 0, proc.stderr
    plain = _plan(tmp_path, {"model": str(models("llama"))}, name="plain.yaml")
    # Trusting code that is not there changes nothing: same fetch key.
    assert json.loads(proc.stdout)["nodes"][0]["key"] == json.loads(plain.stdout)["nodes"][0]["key"]


def test_local_custom_code_is_pinned_by_digest(models, tmp_path):
    src = _with_code(models("llama"), tmp_path / "acme")
    source = {"model": str(src), "trust_remote_code": True}
    proc = run_cli("plan", write_spec(tmp_path / "s.yaml", {"source": source, "verify": False}), "--cache", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "trusted code, pinned by digest: modeling_acme.py" in proc.stdout
    key = json.loads(_plan(tmp_path, source).stdout)["nodes"][0]["key"]
    build = run_cli("build", write_spec(tmp_path / "s.yaml", {"source": source, "verify": False}), "--executor", "local", "--cache", tmp_path / "cache")
    assert build.returncode == 0, build.stderr
    manifest = json.loads((tmp_path / "cache" / "objects" / key / "manifest.json").read_text())
    assert set(manifest["params"]["code"]) == {"modeling_acme.py"}
    assert manifest["files"]["modeling_acme.py"]["blake3"] == manifest["params"]["code"]["modeling_acme.py"]
    (src / "modeling_acme.py").write_text(CODE + "\nEVIL = True\n")
    assert json.loads(_plan(tmp_path, source).stdout)["nodes"][0]["key"] != key  # other code, other key
    # Without trust the same directory is a plain llama (model_type known): no code in the key.
    assert "code" not in json.dumps(json.loads(_plan(tmp_path, {"model": str(src)}).stdout)["nodes"][0])


def test_local_auto_map_naming_missing_or_foreign_code_is_refused(models, tmp_path):
    src = _with_code(models("llama"), tmp_path / "acme")
    (src / "modeling_acme.py").unlink()
    proc = _plan(tmp_path, {"model": str(src), "trust_remote_code": True})
    assert proc.returncode == 2 and "modeling_acme.py" in proc.stderr and "config.json" in proc.stderr
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "other/repo--modeling.Acme"}
    (src / "config.json").write_text(json.dumps(config))
    proc = _plan(tmp_path, {"model": str(src), "trust_remote_code": True})
    assert proc.returncode == 2 and "other/repo" in proc.stderr


def test_hub_custom_code_needs_a_commit(models, tmp_path):
    commit = "a" * 40
    hub = _hub_cache(tmp_path / "hub", "acme/tiny", commit, _with_code(models("llama"), tmp_path / "acme"))
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    unpinned = _plan(tmp_path, {"model": "acme/tiny", "trust_remote_code": True}, env)
    assert unpinned.returncode == 2 and "hub repo with custom code (modeling_acme.py)" in unpinned.stderr and commit in unpinned.stderr
    pinned = _plan(tmp_path, {"model": "acme/tiny", "trust_remote_code": True, "revision": commit}, env)
    assert pinned.returncode == 0, pinned.stderr
    # A hub repo without code needs no pin.
    plain = _hub_cache(tmp_path / "hub2", "acme/plain", commit, models("llama"))
    proc = _plan(tmp_path, {"model": "acme/plain", "trust_remote_code": True}, {**env, "HF_HUB_CACHE": str(plain)})
    assert proc.returncode == 0, proc.stderr


def test_revision_on_a_local_path_names_it(models, tmp_path):
    proc = _plan(tmp_path, {"model": str(models("llama")), "revision": "0" * 40})
    assert proc.returncode == 2 and "source.revision" in proc.stderr and "local directory" in proc.stderr
    lf = write_spec(tmp_path / "lf.yaml", {"model_name_or_path": str(models("llama")), "model_revision": "0" * 40, "trust_remote_code": True})
    proc = run_cli("plan", lf, "--cache", tmp_path / "cache")
    assert proc.returncode == 2 and "model_revision" in proc.stderr
