"""Bad checkpoints and configs fail before any engine starts, naming expected vs found."""

from __future__ import annotations

import json
import shutil

import pytest

from qwen2_audio_vllm.checkpoint import validate_checkpoint
from qwen2_audio_vllm.tiny import TinySpec

AUDIO_DIM = TinySpec().encoder_dim  # the default tiny tower's width (Whisper tiny.en: 384)


@pytest.fixture
def copy_of(tiny_base, tmp_path):
    def edit(config_change=None, tokenizer_change=None):
        d = tmp_path / "ckpt"
        shutil.copytree(tiny_base, d)
        if config_change:
            cfg = json.loads((d / "config.json").read_text())
            config_change(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        if tokenizer_change:
            tok = json.loads((d / "tokenizer.json").read_text())
            tokenizer_change(tok)
            (d / "tokenizer.json").write_text(json.dumps(tok))
        return d

    return edit


def test_valid_checkpoint_passes(tiny_base):
    assert validate_checkpoint(tiny_base).projector["name"] == "linear"


def test_unknown_projector_name(copy_of):
    d = copy_of(lambda c: c["projector"].update(name="perceiver"))
    with pytest.raises(ValueError, match=r"unknown projector name 'perceiver'; expected one of \['attention', 'linear', 'mlp'\]"):
        validate_checkpoint(d)


def test_projector_dims_that_do_not_fit_the_base(copy_of):
    d = copy_of(lambda c: c["projector"].update(in_dim=1280))
    with pytest.raises(ValueError, match=rf"declares in_dim=1280, but the base model needs {AUDIO_DIM}"):
        validate_checkpoint(d)


def test_weights_that_do_not_fit_the_projector(copy_of):
    ckpt = copy_of(lambda c: c["projector"].update(stack=2))
    t, d = TinySpec().text_dim, AUDIO_DIM
    with pytest.raises(ValueError, match=rf"multi_modal_projector\.linear\.weight.*\({t}, {2 * d}\), \({t}, {d}\)"):
        validate_checkpoint(ckpt)


def test_missing_special_token(copy_of):
    def drop_audio_token(tok):
        tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|AUDIO|>"]

    d = copy_of(tokenizer_change=drop_audio_token)
    with pytest.raises(ValueError, match=r"lacks special tokens \['<\|AUDIO\|>'\]"):
        validate_checkpoint(d)


def test_missing_projector_block(copy_of):
    d = copy_of(lambda c: c.pop("projector"))
    with pytest.raises(ValueError, match=r"no 'projector' block"):
        validate_checkpoint(d)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        validate_checkpoint(tmp_path)
