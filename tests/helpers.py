"""Helpers several test modules share: the CLI in-process, and the tiny-random full-scale checkpoint
the real-data tests run on (both written here once, so every test drives the same code path)."""
from __future__ import annotations

from pathlib import Path

import pytest

# The words of write_cc_sbu's captions (tests/test_real_tasks.py) for up to 40 scenes.
CAPTION_WORDS = "The image shows scene number with a tree.".split() + [str(i) for i in range(40)]


# A grid file's `fixed:` block for the smallest replica that still takes every stage of the real pipeline
# (seconds a cell on one thread): the grid and executor tests check structure on it, not timing.
TINY = """
fixed:
  attack: badnets
  target: insertion
  model_args: {enc_dim: 16, enc_layers: 2, enc_heads: 1, d_model: 16, n_layers: 1, n_heads: 1, mlp_hidden: 32,
               mim_epochs: 1, base_epochs: 1}
  task_args: {n_base: 32, n_pool: 40, n_test: 4, n_mc: 4, n_encoder: 32}
  recipe: {epochs: 1}
  decoding: {steps: 4}
"""


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
