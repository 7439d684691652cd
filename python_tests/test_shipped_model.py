"""The models shipped in fastllm/assets: transformers loads them and agrees with
fastllm; the CLI uses the target model by default; the training record holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastllm import Model
from fastllm.cli import ASSETS, default_model_path, main

SHIPPED = sorted(p.parent for p in ASSETS.glob("*/config.json")) if ASSETS.is_dir() else []
pytestmark = pytest.mark.skipif(not SHIPPED, reason=f"no model shipped in {ASSETS}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_transformers_and_fastllm_agree(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(path)).float().eval()
    hf_tok = AutoTokenizer.from_pretrained(str(path))
    model = Model.from_pretrained(path, device="cpu", dtype="float32")
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
    ids = model.tokenizer.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    batch = torch.tensor([ids])
    with torch.no_grad():
        want = hf(batch).logits
        greedy = hf.generate(batch, do_sample=False, max_new_tokens=24, min_new_tokens=24)[0, len(ids):].tolist()
    assert _rel(model.forward(batch), want) < 1e-4
    assert model.generate(ids, max_new_tokens=24, temperature=0.0, ignore_eos=True).token_ids == greedy


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_training_record(path: Path):
    info = json.loads((path / "training_info.json").read_text())
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert sum(f.stat().st_size for f in path.iterdir()) < 40e6
    assert info["parameters"] > 0 and info["val_bits_per_byte"] > 0
    assert set(info["validation_works"]).isdisjoint(info["train_works"])
    if (path / "DEFAULT").exists():  # the target model: the quality aim of the issue
        assert 10e6 <= info["parameters"] <= 20e6
        assert info["val_bits_per_byte"] < 2.0


def test_default_model_is_the_target(monkeypatch):
    monkeypatch.delenv("FASTLLM_MODEL", raising=False)
    default = Path(default_model_path())
    assert (default / "DEFAULT").exists()
    assert [p for p in SHIPPED if (p / "DEFAULT").exists()] == [default]


def test_cli_generate_uses_the_shipped_model(monkeypatch, capsys):
    monkeypatch.delenv("FASTLLM_MODEL", raising=False)
    assert main(["generate", "ROMEO:", "--max-new-tokens", "24", "--device", "cpu", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip()) > 10
    expected = Model.from_pretrained(default_model_path(), device="cpu").generate("ROMEO:", max_new_tokens=24, seed=0)
    assert out == expected.text + "\n"


def test_shipped_models_load_by_name(capsys):
    for path in SHIPPED:
        assert Model.from_pretrained(path.name, device="cpu").path == path
    target, draft = Model.from_pretrained("shakespeare-15m", device="cpu"), "shakespeare-draft-2m"
    expected = target.generate("ROMEO:", max_new_tokens=12, temperature=0.0)  # greedy: the draft cannot change it
    assert main(["generate", "ROMEO:", "--model", "shakespeare-15m", "--draft-model", draft,
                 "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected.text + "\n"
    with pytest.raises(FileNotFoundError, match="shipped models: shakespeare-15m, shakespeare-draft-2m"):
        Model.from_pretrained("shakespeare-1b")
