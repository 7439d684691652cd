"""The fastllm command line: generate, chat, info and its error handling."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest

from checkpoints import make_checkpoint
from fastllm import Model
from fastllm.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    make_checkpoint(path, "qwen2")
    return path


def test_generate_streams_same_text_as_api(ckpt, capsys):
    args = ["generate", "--model", str(ckpt), "ROMEO:", "--max-new-tokens", "12", "--ignore-eos", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    expected = Model.from_pretrained(ckpt, device="cpu").generate("ROMEO:", max_new_tokens=12, ignore_eos=True).text
    assert out == expected + "\n"
    assert main(args + ["--no-stream"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_generate_reads_stdin_and_sampling_flags(ckpt, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("JULIET: O"))
    flags = ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--min-p", "0.01", "--seed", "5",
             "--frequency-penalty", "0.5", "--presence-penalty", "-0.25", "--logit-bias", "9=3.5", "--logit-bias", "4=-100",
             "--min-new-tokens", "3"]
    assert main(["generate", "--model", str(ckpt), "--max-new-tokens", "9", "--ignore-eos", "--device", "cpu",
                 *flags]) == 0
    out = capsys.readouterr().out
    expected = Model.from_pretrained(ckpt, device="cpu").generate(
        "JULIET: O", max_new_tokens=9, ignore_eos=True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, seed=5,
        frequency_penalty=0.5, presence_penalty=-0.25, logit_bias={9: 3.5, 4: -100.0}, min_new_tokens=3,
    )
    assert out == expected.text + "\n"


def test_chat_repl_from_stdin(ckpt, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n/reset\nAnd again\n"))
    assert main(["chat", "--model", str(ckpt), "--max-new-tokens", "6", "--ignore-eos", "--system", "Be kind.",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    model = Model.from_pretrained(ckpt, device="cpu")
    sys_msg = {"role": "system", "content": "Be kind."}
    first = model.chat([sys_msg, {"role": "user", "content": "Hello there"}], max_new_tokens=6, ignore_eos=True).text
    second = model.chat([sys_msg, {"role": "user", "content": "And again"}], max_new_tokens=6, ignore_eos=True).text
    assert "\n".join(out) == f"{first}\n{second}"


def test_chat_template_kwargs_flag(ckpt, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n"))
    args = ["chat", "--model", str(ckpt), "--max-new-tokens", "6", "--ignore-eos", "--device", "cpu",
            "--chat-template-kwargs", '{"bos_token": "<|user|>"}']
    assert main(args) == 0
    model = Model.from_pretrained(ckpt, device="cpu")
    msgs = [{"role": "user", "content": "Hello there"}]
    want = model.chat(msgs, max_new_tokens=6, ignore_eos=True, chat_template_kwargs={"bos_token": "<|user|>"})
    assert want.prompt_token_ids != model.apply_chat_template(msgs)
    assert capsys.readouterr().out == want.text + "\n"
    with pytest.raises(SystemExit):
        main(args[:-1] + ["[1, 2]"])
    assert "expected a JSON object" in capsys.readouterr().err


def test_generate_quantized(ckpt, capsys):
    args = ["generate", "--model", str(ckpt), "ROMEO:", "--max-new-tokens", "5", "--ignore-eos", "--device", "cpu",
            "-q", "int8"]
    assert main(args) == 0
    expected = Model.from_pretrained(ckpt, device="cpu", quantization="int8")
    assert capsys.readouterr().out == expected.generate("ROMEO:", max_new_tokens=5, ignore_eos=True).text + "\n"
    assert main(args[:-1] + ["int3"]) == 2
    assert "unknown quantization" in capsys.readouterr().err


def test_generate_with_draft_model(ckpt, tmp_path, capsys):
    draft = tmp_path / "draft"
    make_checkpoint(draft, "llama3")  # same tokenizer, other weights
    base = ["generate", "--model", str(ckpt), "ROMEO:", "--max-new-tokens", "10", "--ignore-eos", "--device", "cpu"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--draft-model", str(draft), "--num-speculative-tokens", "3"]) == 0
    assert capsys.readouterr().out == plain  # greedy: the draft changes the speed, not the text
    assert main(base + ["--draft-model", str(draft), "--num-speculative-tokens", "0"]) == 2
    assert "num_speculative_tokens" in capsys.readouterr().err


def test_errors_exit_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "hi", "--top-p", "2"]) == 2


def test_bad_sampling_flag_exit_2(ckpt, capsys):
    assert main(["generate", "--model", str(ckpt), "hi", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "--model", str(ckpt), "hi", "--device", "cpu", "--logit-bias", "5=200"]) == 2
    assert "logit_bias" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(ckpt), "hi", "--logit-bias", "five"])
    assert e.value.code == 2 and "TOKEN_ID=BIAS" in capsys.readouterr().err


def test_cuda_graphs_flag_needs_a_gpu(ckpt, capsys):
    assert main(["generate", "--model", str(ckpt), "hi", "--device", "cpu", "--cuda-graphs"]) == 2
    assert "cuda_graphs=True needs a CUDA device" in capsys.readouterr().err
    assert main(["generate", "--model", str(ckpt), "hi", "--device", "cpu", "--no-cuda-graphs",
                 "--max-new-tokens", "2"]) == 0


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert isinstance(info["extension_built"], bool) and isinstance(info["compiled_kernels"], list)
    assert main(["info"]) == 0
    assert "enabled_kernels:" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("fastllm") is None, reason="console script not installed")
def test_console_script(ckpt):
    run = subprocess.run(
        ["fastllm", "generate", "--model", str(ckpt), "ROMEO:", "--max-new-tokens", "4", "--ignore-eos"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith("\n")
