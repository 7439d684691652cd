"""The fastllm command line: generate, chat, info and its error handling;
tools/eval_quality.py's windows and arguments."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import fastllm
from checkpoints import make_checkpoint
from fastllm import Model
from fastllm.cli import EXIT_BROKEN_PIPE, check_bindable, main

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import eval_quality  # noqa: E402
import shakespeare_data as sd  # noqa: E402


def _python_m_fastllm(*args: str, **kwargs) -> subprocess.Popen:
    """``python -m fastllm ARGS`` with this checkout's fastllm first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "fastllm", *args], env=env, text=True, **kwargs)


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
    with pytest.raises(SystemExit) as e:  # argparse: before anything loads
        main(args[:-1] + ["int3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown quantization 'int3'" in err
    assert "int8, int4, int4-g32, int4-g64, int4-g128" in err  # every name the loader accepts
    assert main(args[:-1] + ["int4-g32"]) == 0


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


def test_errors_exit_2(ckpt, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(ckpt / "config.json"), "hi"]) == 2
    assert "config.json is a file; give the model directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(ckpt), "--draft-model", str(ckpt / "config.json"), "hi"]) == 2
    assert "config.json is a file" in capsys.readouterr().err
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


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"fastllm {fastllm.__version__}\n"
    proc = _python_m_fastllm("--version", stdout=subprocess.PIPE)
    assert proc.communicate(timeout=300)[0] == f"fastllm {fastllm.__version__}\n" and proc.returncode == 0


@pytest.mark.parametrize("args", [["generate"], ["generate", "--no-stream", "--echo"], ["info"]])
def test_closed_stdout_exits_quietly(ckpt, args):
    """`fastllm ... | head -c 20`: the reader goes away; no traceback, status 141.
    The read end is closed before the child writes, so every write of it fails."""
    if args[0] == "generate":
        args = [*args, "--model", str(ckpt), "ROMEO:", "--ignore-eos", "--device", "cpu", "--max-new-tokens", "8"]
    proc = _python_m_fastllm(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == EXIT_BROKEN_PIPE, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


def test_serve_rejects_bad_ports_before_loading(tmp_path, capsys):
    missing = ["serve", "--model", str(tmp_path / "missing")]  # loading it would fail with "does not exist"
    for port in ("99999", "-1", "http"):
        with pytest.raises(SystemExit) as e:
            main([*missing, "--port", port])
        assert e.value.code == 2 and "argument --port" in capsys.readouterr().err
    check_bindable("127.0.0.1", 0)  # a free port passes
    if any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn")):
        pytest.skip("the server's dependencies are not installed")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([*missing, "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "does not exist" not in err


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


# --- tools/eval_quality.py (scored with the corpus in test_training_tools.py) -----------------


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """The held-out works' names (and one training work) with a little ASCII text each."""
    out = tmp_path_factory.mktemp("corpus")
    for i, name in enumerate((*sd.VALIDATION_WORKS, "hamlet")):
        (out / f"{name}.txt").write_text(f"ROMEO {i}: the king is dead; long live the king.\n" * (3 + i),
                                         encoding="utf-8")
    return out


def test_eval_quality_bytes_are_the_scored_windows(ckpt, small_corpus):
    """bits/byte divides by the bytes of the windows scored, not of all the works."""
    tok = Model.from_pretrained(ckpt, device="cpu").tokenizer
    every = eval_quality.validation_windows(tok, small_corpus, 16, 0)
    texts = [sd.read_text(small_corpus / f"{w}.txt") for w in sd.VALIDATION_WORKS]
    assert every["bytes"] == sd.utf8_bytes(texts)
    some = eval_quality.validation_windows(tok, small_corpus, 16, 3)
    targets = [[t for t in row if t != sd.IGNORE_INDEX] for row in some["y"].tolist()]
    assert some["x"].shape == (3, 16) and some["bytes"] == sum(len(tok.decode(t).encode()) for t in targets)
    assert some["bytes"] < every["bytes"] / 4
    report = eval_quality.main(["--model", str(ckpt), "--data", str(small_corpus), "--quantization", "none",
                                "--seq-len", "16", "--max-windows", "3", "--new-tokens", "2"])
    result = report["results"][0]
    assert report["bytes"] == some["bytes"]
    assert result["bits_per_byte"] == pytest.approx(
        result["nats_per_token"] * result["tokens"] / math.log(2) / some["bytes"])


def test_eval_quality_missing_corpus_is_a_usage_error(ckpt, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        eval_quality.main(["--model", str(ckpt), "--data", str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "pass --data DIR" in capsys.readouterr().err
    monkeypatch.setenv(sd.ENV_DATA_DIR, str(tmp_path / "nowhere"))  # the default path, missing
    with pytest.raises(SystemExit) as e:
        eval_quality.main(["--model", str(ckpt)])
    assert e.value.code == 2 and "pass --data DIR" in capsys.readouterr().err
    (tmp_path / "hamlet.txt").write_text("To be.\n", encoding="utf-8")  # no held-out works in it
    with pytest.raises(SystemExit) as e:
        eval_quality.main(["--model", str(ckpt), "--data", str(tmp_path)])
    assert e.value.code == 2 and "pass --data DIR" in capsys.readouterr().err
