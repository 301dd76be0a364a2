"""Audio longer than the encoder window (fork + HF twin): windows, token counts, parity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from experiments.serving.engine import audio_request, chat_prompt, close_llm, make_llm
from qwen2_audio_vllm import windows
from qwen2_audio_vllm.checkpoint import load_model, load_processor
from qwen2_audio_vllm.derive import derive_checkpoint
from qwen2_audio_vllm.hf import clip_embeddings, greedy_transcribe


def with_long_audio(src, dst, block):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["long_audio"] = block
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_split_covers_every_sample_once():
    from types import SimpleNamespace

    fe = SimpleNamespace(sampling_rate=16000, chunk_length=30)
    w = windows.windowing(SimpleNamespace(long_audio={"max_windows": 3}), fe)
    audio = np.arange(75 * 16000, dtype=np.float32)
    parts = windows.split(audio, w)
    assert [len(p) for p in parts] == [480000, 480000, 240000]
    assert np.array_equal(np.concatenate(parts), audio)
    w2 = windows.windowing(SimpleNamespace(long_audio={"max_windows": 3, "overlap_s": 2.0}), fe)
    assert (w2.hop, w2.drop) == (28 * 16000, 50) and len(windows.split(audio, w2)) == 3
    with pytest.raises(ValueError, match="multiple of 0.04"):
        windows.windowing(SimpleNamespace(long_audio={"overlap_s": 0.05}), fe)


@pytest.mark.engine
@pytest.mark.parametrize("block,projector", [
    ({"max_windows": 3}, {"name": "linear", "stack": 1}),
    ({"max_windows": 3, "overlap_s": 1.0}, {"name": "mlp", "stack": 2}),
])
def test_75s_clip_through_vllm_matches_twin(block, projector, tiny_base, speech_clips, tmp_path):
    base = derive_checkpoint(tiny_base, projector, tmp_path / "p", seed=2)
    ckpt = with_long_audio(base, tmp_path / "long", block)
    model, processor = load_model(ckpt), load_processor(ckpt)
    speech = np.concatenate([a for _, a, _ in speech_clips])
    long_clip = np.resize(speech, 75 * 16000).astype(np.float32)
    clips = [long_clip, speech_clips[0][1]]
    with torch.no_grad():
        emb = clip_embeddings(model, processor, clips)
    w = windows.windowing(model.config, processor.feature_extractor)
    parts = windows.split(long_clip, w)
    assert len(parts) == 3
    fe = processor.feature_extractor
    kept = []
    for j, part in enumerate(parts):
        mel = int(fe(part, sampling_rate=16000, return_attention_mask=True, padding="max_length")["attention_mask"].sum())
        kept.append(((mel - 1) // 2 + 1 - 2) // 2 + 1 - (w.drop if j else 0))
    # 25 pooled frames per second of the whole 75 s: nothing past the first window is lost
    assert abs(sum(kept) - 75 * 25) <= 3
    proj = model.multi_modal_projector
    assert emb[0].shape[0] == sum(int(proj.output_lengths(torch.tensor([k]))) for k in kept)

    llm = make_llm(ckpt, max_model_len=4096)
    try:
        prompt = chat_prompt(processor.tokenizer)
        from vllm import SamplingParams

        outs = llm.generate([audio_request(prompt, c) for c in clips], SamplingParams(max_tokens=8, temperature=0))
    finally:
        close_llm(llm)
    hf_tokens, hf_counts = greedy_transcribe(model, processor, clips, prompt, max_new_tokens=8)
    for out, toks, count in zip(outs, hf_tokens, hf_counts, strict=True):
        assert out.prompt_token_ids.count(model.audio_token_id) == count
        assert list(out.outputs[0].token_ids) == toks
