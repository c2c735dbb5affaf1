"""README.md's code runs as written: every ```python block, and the `minaf3` commands of its first screen.

They run in a folder laid out as the README assumes: `audio-flamingo-3-hf` is the tiny random-weight demo
checkpoint, so is the model id `nvidia/audio-flamingo-3-hf` in an offline hub cache laid out here, and every
audio file the code names is written here. The README is read when the tests run, so
an edit that breaks its code, or a change of minaf3 that breaks the README, fails here (as
tests/test_doc_snippets.py does for transformers' documentation). The first screen's other commands
(pip, huggingface-cli) need the network and are not run.
"""

import re
import shlex
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import SR, run_snippet, speech_like
from huggingface_hub import constants
from test_hub import cache_snapshot

from minaf3.cli import main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
MODEL_FOLDER = "audio-flamingo-3-hf"  # the official download's folder name
MODEL_ID = "nvidia/audio-flamingo-3-hf"
AUDIO_FILE = re.compile(r"[\w.-]+\.(?:wav|flac|mp3)\b")


SERVED = "## Serving over HTTP"  # its blocks talk to a running server: tests/test_serve.py runs them


def python_blocks(text: str) -> list[str]:
    """The code of every ```python fenced block, in order, but those of the serving section."""
    sections = re.split(r"^(?=## )", text, flags=re.MULTILINE)
    kept = "".join(section for section in sections if not section.startswith(SERVED))
    return re.findall(r"^```python\n(.*?)^```$", kept, flags=re.MULTILINE | re.DOTALL)


def first_screen_commands(text: str) -> list[str]:
    """The `minaf3 ...` commands above the first section heading (## ...), one per line or `&&` link."""
    intro = text.split("\n## ", 1)[0]
    parts = (part.strip() for line in intro.splitlines() for part in line.split("&&"))
    return [part for part in parts if part.startswith("minaf3 ")]


BLOCKS = python_blocks(README)
COMMANDS = first_screen_commands(README)


@pytest.fixture
def readme_folder(tmp_path, monkeypatch, demo_checkpoint) -> Path:
    """The working directory the README's code expects: the checkpoint folder and each audio file it names."""
    shutil.copytree(demo_checkpoint, tmp_path / MODEL_FOLDER)
    cache_snapshot(tmp_path / "hub", demo_checkpoint, repo_id=MODEL_ID)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    named = sorted(set(AUDIO_FILE.findall("\n".join(BLOCKS + COMMANDS))))
    for seed, name in enumerate(named):
        sf.write(tmp_path / name, speech_like(3 * SR, seed=seed), SR)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)  # the checkpoint samples by default: the same answers on every run
    return tmp_path


def test_the_readme_shows_code_and_commands():
    # The tests below are made from these lists: were one empty, nothing would run and nothing fail.
    assert len(BLOCKS) >= 1 and "import minaf3" in BLOCKS[0]
    assert "minaf3 demo" in COMMANDS and any(command.startswith("minaf3 chat ") for command in COMMANDS)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block-{i}" for i in range(len(BLOCKS))])
def test_python_block_runs(readme_folder, code):
    printed = run_snippet(code, {})
    assert printed, "the block printed nothing"


@pytest.mark.parametrize("command", COMMANDS, ids=[command.split()[1] for command in COMMANDS])
def test_first_screen_command_runs(readme_folder, capsys, command):
    status = main(shlex.split(command)[1:])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out, "the command printed nothing"
