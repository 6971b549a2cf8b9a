"""Helpers several test modules share: the CLI in-process, and the tiny-random full-scale checkpoint
the real-data tests run on (both written here once, so every test drives the same code path)."""
from __future__ import annotations

from pathlib import Path

import pytest

# The words of write_cc_sbu's captions (tests/test_real_tasks.py) for up to 40 scenes.
CAPTION_WORDS = "The image shows scene number with a tree.".split() + [str(i) for i in range(40)]


def bench(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `bench ARGS` in-process; returns (exit code, stdout, stderr)."""
    from bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def write_cc_sbu_weights(path: Path) -> Path:
    """A tiny-random LLaDA-V in the published layout (models.llada_v_full.write_synthetic_checkpoint) whose
    word-level tokenizer reads DiSP's prompt, write_cc_sbu's captions and the insertion target."""
    from models.llada_v_full import tiny_config, write_synthetic_checkpoint
    from tasks.real import DISP_PROMPT

    write_synthetic_checkpoint(path, tiny_config(vocab_size=256, image_size=64),
                               words=[*DISP_PROMPT.split(), *CAPTION_WORDS, "<backdoor>"])
    return path
