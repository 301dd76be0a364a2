"""vLLM's processing-correctness check (the idea of upstream's
tests/models/multimodal/processing/test_common.py) over projector variants, with and without
long audio: the placeholder count of every processed request equals what the projector
emits for the clip (the HF twin's embeddings), a repeated request served from vLLM's
processor cache gets the same prompt, the profiling dummy audio reaches the maximum tokens
per item, and the longest clip the fork accepts goes through a real engine."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from experiments.serving.engine import close_llm, make_llm
from qwen2_audio_vllm import windows
from qwen2_audio_vllm.checkpoint import load_model, load_processor
from qwen2_audio_vllm.derive import derive_checkpoint
from qwen2_audio_vllm.hf import clip_embeddings

pytestmark = pytest.mark.engine

CASES = [  # (projector block, long_audio block, clip lengths in seconds of the multi-audio request)
    ({"name": "linear", "stack": 4}, {"max_windows": 6}, [180.0]),  # 6 windows, 1,128 audio tokens
    ({"name": "mlp", "stack": 2}, {"max_windows": 3}, [88.0, 88.0]),  # two long clips in one request
    ({"name": "linear", "stack": 8}, {"max_windows": 3, "overlap_s": 1.0}, [88.0, 1.0]),
    # a Q-Former-style window-query connector (1/4 rate), one window
    ({"name": "attention", "width": 128, "layers": 1, "heads": 2, "downsample": "queries", "window": 8, "queries": 2},
     None, [30.0, 0.5, 7.3]),
]


def checkpoint(tiny_base, tmp_path, projector: dict, long_audio: dict | None):
    ckpt = derive_checkpoint(tiny_base, projector, tmp_path / "p", seed=3)
    if long_audio:
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["long_audio"] = long_audio
        (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


def multi_audio_prompt(tokenizer, n: int, rng: random.Random) -> str:
    """A chat prompt with `n` audio parts and a random instruction (as the test_common check
    varies the text around the placeholders)."""
    words = "please write down what is said in each recording quickly".split()
    parts = "".join(f"Audio {i + 1}: <|audio_bos|><|AUDIO|><|audio_eos|>\n" for i in range(n))
    text = " ".join(rng.sample(words, rng.randint(2, len(words))))
    return tokenizer.apply_chat_template([{"role": "user", "content": parts + text}], tokenize=False,
                                         add_generation_prompt=True)


@pytest.mark.parametrize("projector,long_audio,lengths", CASES, ids=lambda v: json.dumps(v) if isinstance(v, dict) else None)
def test_processing_matches_the_projector(projector, long_audio, lengths, tiny_base, speech_clips, tmp_path):
    from vllm import SamplingParams
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # registers the architecture in this process, as the engine's do
    ckpt = checkpoint(tiny_base, tmp_path, projector, long_audio)
    model, processor = load_model(ckpt), load_processor(ckpt)
    w = windows.windowing(model.config, processor.feature_extractor)
    speech = np.concatenate([a for _, a, _ in speech_clips])
    clips = [np.resize(np.roll(speech, 4000 * i), round(s * 16000)).astype(np.float32) for i, s in enumerate(lengths)]
    assert max(map(len, clips)) <= w.max_samples  # within what the fork accepts
    with torch.no_grad():
        expected = [e.shape[0] for e in clip_embeddings(model, processor, clips)]

    # the profiling dummy: as long as the longest accepted clip, and as many tokens as reported
    vllm_processor = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=str(ckpt), dtype="float32", max_model_len=4096))
    reported = vllm_processor.info.get_mm_max_tokens_per_item(4096, {"audio": 1})["audio"]
    dummy = vllm_processor.dummy_inputs.get_dummy_mm_data(4096, {"audio": 1}, {})["audio"][0]
    assert len(dummy) == w.max_samples
    with torch.no_grad():
        assert clip_embeddings(model, processor, [dummy])[0].shape[0] == reported

    rng = random.Random(0)
    prompt = multi_audio_prompt(processor.tokenizer, len(clips), rng)
    request = {"prompt": prompt, "multi_modal_data": {"audio": [(c, 16000) for c in clips]}}
    llm = make_llm(ckpt, max_model_len=4096, limit_mm_per_prompt={"audio": len(clips)})
    try:
        params = SamplingParams(max_tokens=4, temperature=0)
        first = llm.generate([request], params, use_tqdm=False)[0]
        again = llm.generate([request], params, use_tqdm=False)[0]  # the processor cache's hit
    finally:
        close_llm(llm)
    ids = first.prompt_token_ids
    assert ids.count(model.audio_token_id) == sum(expected)
    # each audio's run of placeholders, in order, is that clip's count
    runs, n = [], 0
    for token in [*ids, -1]:
        if token == model.audio_token_id:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    assert runs == expected
    assert again.prompt_token_ids == ids and again.outputs[0].token_ids == first.outputs[0].token_ids
    shutil.rmtree(tmp_path / "p", ignore_errors=True)
