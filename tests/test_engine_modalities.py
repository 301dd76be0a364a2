"""Extra modalities through a real vLLM engine: two embedding inputs of different widths
(768 through an MLP with 2x stacking, 512 through a linear projector) in one prompt with
audio, checked against the HF twin; a third modality fed the audio encoder's own frames
through a copy of the audio projector must give exactly the audio request's output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.serving.engine import (
    EmbedModality,
    audio_request,
    chat_prompt,
    close_llm,
    make_llm,
)
from experiments.training.cache import encoder_frames
from qwen2_audio_vllm.checkpoint import load_model, load_processor, save_checkpoint
from qwen2_audio_vllm.derive import add_modalities
from qwen2_audio_vllm.hf import STOP_TOKENS, clip_embeddings
from qwen2_audio_vllm.modalities import modality_specs
from qwen2_audio_vllm.tiny import TinySpec

pytestmark = pytest.mark.engine

SPECS = {
    "m1": {"in_dim": 768, "projector": {"name": "mlp", "stack": 2}},
    "m2": {"in_dim": 512, "projector": {"name": "linear"}},
    "frames": {"in_dim": TinySpec().encoder_dim, "projector": {"name": "linear"}},  # the tiny encoder's width
}
PROMPT = (
    "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "first <|M1|> then <|M2|> and <|M1|> again<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def engine(tiny_base, tmp_path_factory):
    """(twin, processor, engine) for a checkpoint with three extra modalities; "frames"
    carries the audio projector's weights."""
    ckpt = add_modalities(tiny_base, tmp_path_factory.mktemp("mm") / "ckpt", SPECS, seed=2)
    model, processor = load_model(ckpt), load_processor(ckpt)
    model.modality_projectors["frames"].load_state_dict(model.multi_modal_projector.state_dict())
    save_checkpoint(model, processor, ckpt)
    llm = make_llm(ckpt, max_num_seqs=8)
    yield load_model(ckpt), processor, llm
    close_llm(llm)


def inputs(seed: int) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m1": [torch.randn(5 + seed, 768, generator=g), torch.randn(12, 768, generator=g)],
        "m2": [torch.randn(3 + seed, 512, generator=g)],
    }


def test_two_modalities_and_audio_match_the_twin(engine, speech_clips):
    from vllm import SamplingParams

    model, processor, llm = engine
    specs = modality_specs(model.config)
    audios = [a for _, a, _ in speech_clips[:4]]
    requests = [
        {"prompt": PROMPT, "multi_modal_data": {"audio": (a, 16000), **inputs(i)}} for i, a in enumerate(audios)
    ]
    outs = llm.generate(requests, SamplingParams(max_tokens=12, temperature=0))
    eos = processor.tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    for i, (out, audio) in enumerate(zip(outs, audios, strict=True)):
        data = inputs(i)
        projected = {name: model.project_modality(name, rows) for name, rows in data.items()}
        for name, rows in data.items():  # each placeholder became its projector's count
            want = sum(int(model.modality_projectors[name].output_lengths(torch.tensor([r.shape[0]]))) for r in rows)
            assert out.prompt_token_ids.count(specs[name].token_id) == want == sum(len(p) for p in projected[name])
        assert sum(len(p) for p in projected["m1"]) == (5 + i + 1) // 2 + 6  # stack 2
        audio_rows = clip_embeddings(model, processor, [audio])
        ids = torch.tensor([out.prompt_token_ids])
        hf = model.generate_greedy(ids, torch.ones_like(ids), audio_rows, 12, eos_token_id=eos, modality_embeds=projected)
        hf = hf[0].tolist()
        stop = next((j for j, t in enumerate(hf) if t in eos), None)
        assert list(out.outputs[0].token_ids) == (hf if stop is None else hf[: stop + 1])


def test_modality_embeddings_match_the_twin(engine):
    model, _, llm = engine
    for name, rows in inputs(3).items():
        (served,) = llm.apply_model(EmbedModality(name, rows))
        with torch.no_grad():
            reference = model.project_modality(name, rows)
        assert [s.shape for s in served] == [r.shape for r in reference]
        for s, r in zip(served, reference, strict=True):
            torch.testing.assert_close(s, r, atol=1e-5, rtol=1e-5)


def test_encoder_frames_as_a_modality_reproduce_the_audio_request(engine, speech_clips):
    """Placement check with meaning: the same rows at the same positions give the same
    output, whether they arrive as audio or as another modality's embeddings."""
    from vllm import SamplingParams

    model, processor, llm = engine
    audios = [a for _, a, _ in speech_clips]
    frames = encoder_frames(model, processor.feature_extractor, audios)
    audio_prompt = chat_prompt(processor.tokenizer)
    frames_prompt = audio_prompt.replace("<|AUDIO|>", "<|FRAMES|>")
    greedy = SamplingParams(max_tokens=12, temperature=0, logprobs=1)
    from_audio = llm.generate([audio_request(audio_prompt, a) for a in audios], greedy)
    from_frames = llm.generate([{"prompt": frames_prompt, "multi_modal_data": {"frames": f}} for f in frames], greedy)
    frames_id = modality_specs(model.config)["frames"].token_id
    for a, f in zip(from_audio, from_frames, strict=True):
        assert f.prompt_token_ids.count(frames_id) == a.prompt_token_ids.count(model.audio_token_id) > 0
        assert f.outputs[0].token_ids == a.outputs[0].token_ids
        assert f.outputs[0].cumulative_logprob == pytest.approx(a.outputs[0].cumulative_logprob, abs=1e-3)


def test_bad_requests_are_rejected_and_the_engine_survives(engine):
    from vllm import SamplingParams

    _, _, llm = engine
    greedy = SamplingParams(max_tokens=4, temperature=0)
    text_only = PROMPT.replace("Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n", "")
    bad = dict(inputs(0), m2=[torch.randn(3, 500)])
    with pytest.raises(ValueError, match=r"m2 item 0 has shape \(3, 500\); expected \(n, 512\)"):
        llm.generate([{"prompt": text_only, "multi_modal_data": bad}], greedy)
    with pytest.raises(ValueError, match=r"2 m1 item\(s\) but its prompt has 1 <\|M1\|> placeholder"):
        llm.generate([{"prompt": text_only.replace(" and <|M1|> again", ""), "multi_modal_data": inputs(0)}], greedy)
    with pytest.raises(ValueError, match=r"1 audio item\(s\) but its prompt has 0 <\|AUDIO\|>"):
        llm.generate([{"prompt": text_only, "multi_modal_data": {"audio": (np.zeros(16000, np.float32), 16000)}}], greedy)
    with pytest.raises(ValueError, match=r"1 m2 item\(s\) but its prompt has 2 <\|M2\|> placeholder"):
        llm.generate([{"prompt": text_only.replace("then <|M2|>", "then <|M2|><|M2|>"), "multi_modal_data": inputs(0)}], greedy)
    ok = llm.generate([{"prompt": text_only, "multi_modal_data": inputs(0)}], greedy)
    assert len(ok[0].outputs[0].token_ids) > 0


def test_extra_modalities_switched_off_still_load(engine, speech_clips):
    """With their limits at 0, vLLM skips the extra projectors; the checkpoint still loads
    (its projector weights are checked against config.json) and audio is served."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    model, processor, llm = engine
    ckpt = llm.llm_engine.model_config.model
    limits = {"audio": 1, **dict.fromkeys(SPECS, 0)}
    off = make_llm(ckpt, max_num_seqs=4, limit_mm_per_prompt=limits)
    try:
        prompt = chat_prompt(processor.tokenizer)
        greedy = SamplingParams(max_tokens=8, temperature=0)
        (served,) = off.generate([audio_request(prompt, speech_clips[0][1])], greedy)
        (reference,) = llm.generate([audio_request(prompt, speech_clips[0][1])], greedy)
        with pytest.raises(VLLMValidationError, match="At most 0 m1"):
            off.generate([{"prompt": PROMPT, "multi_modal_data": {"audio": (speech_clips[0][1], 16000), **inputs(0)}}], greedy)
    finally:
        close_llm(off)
    assert served.outputs[0].token_ids == reference.outputs[0].token_ids
