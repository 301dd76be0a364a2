"""The fork through a real vLLM engine (CPU), for every projector family x stack:
token counts, greedy parity with the HF twin, audio-embedding parity."""

from __future__ import annotations

import pytest
import torch

from experiments.serving.engine import EmbedAudio, audio_request, chat_prompt, close_llm, make_llm
from qwen2_audio_vllm.checkpoint import load_model, load_processor
from qwen2_audio_vllm.derive import derive_checkpoint
from qwen2_audio_vllm.encoder import output_lengths as encoder_lengths
from qwen2_audio_vllm.hf import greedy_transcribe

pytestmark = pytest.mark.engine

VARIANTS = {
    "linear-s1": {"name": "linear", "stack": 1},
    "linear-s2": {"name": "linear", "stack": 2},
    "linear-s4": {"name": "linear", "stack": 4},
    "mlp-s1": {"name": "mlp", "stack": 1, "hidden_dim": 256},
    "mlp-s2-swiglu": {"name": "mlp", "stack": 2, "activation": "swiglu", "pre_norm": True},
    "mlp-s4": {"name": "mlp", "stack": 4, "depth": 3},
    "attention-s1": {"name": "attention", "width": 128, "layers": 1, "heads": 2},
    "attention-s2": {"name": "attention", "width": 128, "layers": 1, "heads": 2, "stack": 2},
    "attention-s4": {"name": "attention", "width": 128, "layers": 2, "heads": 2, "stack": 4},
    "attention-q4x2": {"name": "attention", "width": 128, "layers": 1, "heads": 2, "downsample": "queries", "window": 4, "queries": 2},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tiny_base, tmp_path_factory):
    """(checkpoint dir, HF twin, processor, engine) for one projector variant."""
    ckpt = derive_checkpoint(tiny_base, VARIANTS[request.param], tmp_path_factory.mktemp(request.param) / "ckpt", seed=1)
    llm = make_llm(ckpt, max_num_seqs=16)
    yield ckpt, load_model(ckpt), load_processor(ckpt), llm
    close_llm(llm)


def expected_tokens(model, processor, audio) -> int:
    """Audio tokens for one clip: mel frames -> encoder/pool rule -> projector.output_lengths."""
    fe = processor.feature_extractor
    mel = fe(audio, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    _, pooled = encoder_lengths(mel["attention_mask"].sum(-1))
    return int(model.multi_modal_projector.output_lengths(pooled))


def test_token_counts_over_lengths(variant, length_sweep):
    _, model, processor, llm = variant
    from vllm import SamplingParams

    prompt = chat_prompt(processor.tokenizer)
    names = list(length_sweep)
    outs = llm.generate([audio_request(prompt, length_sweep[n]) for n in names], SamplingParams(max_tokens=1, temperature=0))
    for name, out in zip(names, outs, strict=True):
        audio = length_sweep[name]
        want = expected_tokens(model, processor, audio)
        fe = processor.feature_extractor
        mel = fe(audio, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
        rows = model.audio_embeddings(mel["input_features"], mel["attention_mask"])[0].shape[0]
        placeholders = out.prompt_token_ids.count(model.audio_token_id)
        assert want > 0, name
        assert rows == want == placeholders, (name, rows, want, placeholders)
        assert len(out.outputs[0].token_ids) == 1
    # the whole window: 30 s -> 750 pooled frames -> output_lengths(750)
    assert expected_tokens(model, processor, length_sweep["30.0s"]) == int(
        model.multi_modal_projector.output_lengths(torch.tensor([750]))
    )


def test_greedy_outputs_match_hf_twin(variant, speech_clips):
    _, model, processor, llm = variant
    from vllm import SamplingParams

    prompt = chat_prompt(processor.tokenizer)
    audios = [a for _, a, _ in speech_clips]
    outs = llm.generate([audio_request(prompt, a) for a in audios], SamplingParams(max_tokens=12, temperature=0))
    hf_tokens, hf_counts = greedy_transcribe(model, processor, audios, prompt, max_new_tokens=12)
    assert len(outs) == len(audios) >= 8
    for out, toks, count in zip(outs, hf_tokens, hf_counts, strict=True):
        assert out.prompt_token_ids.count(model.audio_token_id) == count
        assert list(out.outputs[0].token_ids) == toks


def test_audio_embeddings_match_hf_twin(variant, speech_clips):
    _, model, processor, llm = variant
    fe = processor.feature_extractor
    audios = [a for _, a, _ in speech_clips]
    mel = fe(audios, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    (vllm_emb,) = llm.apply_model(EmbedAudio(mel["input_features"], mel["attention_mask"]))
    with torch.no_grad():
        hf_emb = model.audio_embeddings(mel["input_features"], mel["attention_mask"])
    assert len(vllm_emb) == len(hf_emb) == len(audios)
    for v, h in zip(vllm_emb, hf_emb, strict=True):
        assert v.shape == h.shape
        torch.testing.assert_close(v, h, atol=1e-4, rtol=1e-4)
