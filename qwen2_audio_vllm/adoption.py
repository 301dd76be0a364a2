"""Adopt a released Qwen2-Audio directory (e.g. a local copy of
Qwen/Qwen2-Audio-7B-Instruct): check it is one, and make it servable by the fork without
copying weights (a directory of symlinks beside a config.json with a projector block)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qwen2_audio_vllm.checkpoint import fresh_tmp_dir, weight_files
from qwen2_audio_vllm.plugin import ARCHITECTURE


def check_qwen2_audio_dir(src: Path, env_var: str | None = None) -> dict[str, Any]:
    """config.json of a local Qwen2-Audio directory, or a ValueError/FileNotFoundError
    saying what was expected and what to set (`env_var`: where the path came from)."""
    src = Path(src)
    where = f" (from ${env_var})" if env_var else ""
    fix = f"set {env_var} to" if env_var else "point model.path at"
    if not src.is_dir():
        raise FileNotFoundError(
            f"{src}{where} does not exist; {fix} a local directory of Qwen/Qwen2-Audio-7B-Instruct "
            "(config.json, *.safetensors, tokenizer, preprocessor_config.json). Nothing is downloaded."
        )
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}{where} has no config.json; {fix} a local Qwen2-Audio directory")
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "qwen2_audio":
        raise ValueError(
            f"{src}/config.json{where} has model_type {config.get('model_type')!r}, expected 'qwen2_audio' "
            f"(architectures {config.get('architectures')}); {fix} a Qwen2-Audio checkpoint such as "
            "Qwen/Qwen2-Audio-7B-Instruct"
        )
    try:
        weight_files(src)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}{where}; {fix} a complete Qwen2-Audio directory") from err
    return config


def adopt_checkpoint(src: Path, out_root: Path, env_var: str | None = None) -> Path:
    """Make a released Qwen2-Audio directory servable by the fork without copying weights:
    a sibling directory of symlinks whose config.json names the fork's architecture and the
    original connector, {"name": "linear", "stack": 1}. A directory that already has a
    projector block is used as it is."""
    src = Path(src)
    config = check_qwen2_audio_dir(src, env_var)
    if isinstance(config.get("projector"), Mapping):
        return src
    config["architectures"] = [ARCHITECTURE]
    config["projector"] = {"name": "linear", "stack": 1}
    return linked_checkpoint(src, out_root, config)


def linked_checkpoint(src: Path, out_root: Path, config: Mapping[str, Any], suffix: str = "") -> Path:
    """`out_root/<src name>-<hash of src's path><suffix>`: symlinks to every file of `src`
    beside a different config.json. No weights are copied. Built in a temp dir and renamed,
    so processes adopting the same directory at once (a launcher's parallel jobs) each see
    a complete one; an existing one whose links and config already match is kept."""
    src = Path(src)
    out = out_root / f"{src.name}-{hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:8]}{suffix}"
    wanted = {f.name: f.resolve() for f in src.iterdir() if f.name != "config.json"}
    text = json.dumps(config, indent=2)
    if _links_match(out, wanted, text):
        return out
    tmp = fresh_tmp_dir(out)
    for name, target in wanted.items():
        (tmp / name).symlink_to(target)
    (tmp / "config.json").write_text(text)
    shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:  # another process renamed its identical copy first
        shutil.rmtree(tmp, ignore_errors=True)
        if not _links_match(out, wanted, text):
            raise
    return out


def _links_match(out: Path, wanted: Mapping[str, Path], config_text: str) -> bool:
    if not (out / "config.json").is_file() or (out / "config.json").read_text() != config_text:
        return False
    have = {f.name: f.resolve() for f in out.iterdir() if f.name != "config.json"}
    return have == dict(wanted)
