"""The real model's path on a tiny stand-in: a directory laid out exactly like the hub's
Qwen/Qwen2-Audio-7B-Instruct, adopted, loaded by transformers' own class, served by
upstream vLLM's own class and by the fork, and run through the whole pipeline with
`model=qwen2-audio-7b` pointed at it by QWEN2_AUDIO_7B_DIR."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qwen2_audio_vllm.adoption import adopt_checkpoint
from qwen2_audio_vllm.checkpoint import (
    ARCHITECTURE,
    HUB_FILES,
    UPSTREAM_ARCHITECTURE,
    WEIGHTS_INDEX,
    load_model,
    load_processor,
    save_checkpoint,
    weight_files,
)

# Top-level keys of the released config.json (Qwen2-Audio-7B-Instruct) and of its text part
HUB_CONFIG_KEYS = {"architectures", "audio_config", "audio_token_index", "model_type", "text_config"}
HUB_TEXT_KEYS = {"bos_token_id", "eos_token_id", "intermediate_size", "max_position_embeddings",
                 "model_type", "rms_norm_eps", "vocab_size"}


def test_hub_tiny_has_the_hub_layout(hub_tiny):
    names = {p.name for p in hub_tiny.iterdir()}
    assert set(HUB_FILES) <= names
    assert "processor_config.json" not in names and "model.safetensors" not in names
    config = json.loads((hub_tiny / "config.json").read_text())
    assert HUB_CONFIG_KEYS <= set(config) and HUB_TEXT_KEYS <= set(config["text_config"])
    assert config["architectures"] == [UPSTREAM_ARCHITECTURE] and "projector" not in config
    assert config["audio_config"]["model_type"] == "qwen2_audio_encoder"
    index = json.loads((hub_tiny / WEIGHTS_INDEX).read_text())
    shards = weight_files(hub_tiny)
    assert [s.name for s in shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    stored = {}
    for s in shards:
        with safe_open(str(s), "pt") as f:
            stored |= {k: (s.name, f.get_slice(k).get_dtype()) for k in f.keys()}
    assert {k: v[0] for k, v in stored.items()} == index["weight_map"]
    assert {v[1] for v in stored.values()} == {"BF16"}
    # the released tensor names: the twin's module names are the hub's
    assert set(stored) == set(load_model(adopt_checkpoint(hub_tiny, hub_tiny.parent.parent / "adopted")).state_dict())
    assert "multi_modal_projector.linear.weight" in stored and "language_model.lm_head.weight" in stored
    assert "chat_template" in (hub_tiny / "tokenizer_config.json").read_text() or (hub_tiny / "chat_template.jinja").exists()


def test_transformers_loads_hub_adopted_and_exported_without_key_mismatch(hub_tiny, tmp_path):
    from transformers import Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

    adopted = adopt_checkpoint(hub_tiny, tmp_path / "base")
    exported = save_checkpoint(load_model(adopted), load_processor(adopted), tmp_path / "exported")
    for d in (hub_tiny, adopted, exported):
        model, info = Qwen2AudioForConditionalGeneration.from_pretrained(d, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (d, info)
        assert Qwen2AudioProcessor.from_pretrained(d).feature_extractor.chunk_length == 30
    twin = load_model(exported)
    ours = dict(twin.multi_modal_projector.named_parameters())
    theirs = dict(model.model.multi_modal_projector.named_parameters())
    assert torch.equal(ours["linear.weight"], theirs["linear.weight"])


def test_adopt_links_weights_and_is_idempotent(hub_tiny, tmp_path):
    a = adopt_checkpoint(hub_tiny, tmp_path)
    config = json.loads((a / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and config["projector"] == {"name": "linear", "stack": 1}
    assert all((a / s.name).resolve() == s.resolve() for s in weight_files(hub_tiny))  # nothing copied
    stamp = (a / "config.json").stat().st_mtime_ns
    assert adopt_checkpoint(hub_tiny, tmp_path) == a and (a / "config.json").stat().st_mtime_ns == stamp
    assert adopt_checkpoint(a, tmp_path / "again") == a  # already has a projector block


def test_bad_model_directories_get_clear_errors(tmp_path):
    from experiments.training.base import ensure_base

    model = {"name": "qwen2-audio-7b", "path": str(tmp_path / "nowhere"), "path_env": "QWEN2_AUDIO_7B_DIR"}
    with pytest.raises(FileNotFoundError, match=r"does not exist; set QWEN2_AUDIO_7B_DIR to a local directory of Qwen/Qwen2-Audio-7B-Instruct"):
        ensure_base(model, {}, tmp_path)
    other = tmp_path / "whisper"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"]}))
    with pytest.raises(ValueError, match=r"model_type 'whisper', expected 'qwen2_audio'"):
        ensure_base(model | {"path": str(other)}, {}, tmp_path)
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "qwen2_audio"}))
    with pytest.raises(FileNotFoundError, match=r"holds no \*.safetensors weights"):
        ensure_base(model | {"path": str(empty)}, {}, tmp_path)


@pytest.mark.engine
def test_upstream_class_on_hub_dir_equals_fork_on_adopted(hub_tiny, speech_clips, tmp_path):
    """Adopting keeps the model's behaviour: upstream vLLM's own Qwen2-Audio class on the
    released layout and the fork (linear projector) on the adopted directory give the same
    prompts and greedy tokens."""
    from vllm import LLM, SamplingParams

    from experiments.serving.engine import (
        audio_request,
        chat_prompt,
        close_llm,
        engine_kwargs,
        make_llm,
    )

    def generate(d: Path, fork: bool):
        llm = make_llm(d) if fork else LLM(**engine_kwargs(d))  # make_llm checks the projector block
        try:
            prompt = chat_prompt(llm.get_tokenizer())
            outs = llm.generate([audio_request(prompt, a) for _, a, _ in speech_clips], SamplingParams(max_tokens=16, temperature=0))
            arch = llm.llm_engine.model_config.architectures
            return outs, arch
        finally:
            close_llm(llm)

    upstream, arch_u = generate(hub_tiny, fork=False)
    fork, arch_f = generate(adopt_checkpoint(hub_tiny, tmp_path), fork=True)
    assert arch_u == [UPSTREAM_ARCHITECTURE] and arch_f == [ARCHITECTURE]
    for u, f in zip(upstream, fork, strict=True):
        assert u.prompt_token_ids == f.prompt_token_ids
        assert len(u.outputs[0].token_ids) > 0 and u.outputs[0].token_ids == f.outputs[0].token_ids


@pytest.mark.engine
def test_seven_b_config_runs_the_whole_pipeline_on_the_hub_tiny(hub_tiny, tmp_path, monkeypatch):
    """`model=qwen2-audio-7b` unchanged, its directory the hub-shaped tiny model."""
    from experiments.run import run
    from tests.test_pipeline import composed, smoke_overrides

    monkeypatch.setenv("QWEN2_AUDIO_7B_DIR", str(hub_tiny))
    overrides = smoke_overrides(tmp_path, "model=qwen2-audio-7b", "projector=linear", "model.engine.max_model_len=2048")
    state = run(composed(overrides))
    r = state["stage_results"]
    assert list(r) == ["prepare", "align", "export", "evaluate", "bench", "report"]
    base = Path(r["prepare"]["base_dir"])
    assert base.parent == tmp_path / "artifacts" / "base"
    assert json.loads((base / "config.json").read_text())["architectures"] == [ARCHITECTURE]
    assert r["align"]["encoder_cache"]["train"]["clips"] == 2 * 96  # 96 clean + 96 augmented copies
    assert r["evaluate"]["n_utts"] == 16 and r["evaluate"]["n_failed"] == 0
    assert r["bench"]["variant"]["successful_requests"] == r["bench"]["baseline"]["successful_requests"] == 8
    from transformers import Qwen2AudioForConditionalGeneration

    _, info = Qwen2AudioForConditionalGeneration.from_pretrained(r["export"]["checkpoint"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_interrupted_export_leaves_no_checkpoint(hub_tiny, tmp_path, monkeypatch):
    """A run killed while writing a checkpoint (here: the second shard fails) leaves no
    directory that looks like a checkpoint; the next export removes the debris of dead runs."""
    import qwen2_audio_vllm.checkpoint as ckpt

    model, processor = load_model(adopt_checkpoint(hub_tiny, tmp_path / "a")), load_processor(hub_tiny)
    real, calls = ckpt.save_file, []

    def dies_on_second_shard(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-export")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", dies_on_second_shard)
    out = tmp_path / "out" / "checkpoint"
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, processor, out, shards=2)
    assert not out.exists() and len(calls) == 2
    dead = out.with_name("checkpoint.tmp-999999999")  # what a killed process (gone pid) left
    dead.mkdir()
    monkeypatch.setattr(ckpt, "save_file", real)
    save_checkpoint(model, processor, out, shards=2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["checkpoint"]
    assert len(weight_files(out)) == 2


def test_twin_equals_transformers_own_class_on_adopted_checkpoint(hub_tiny, speech_clips, tmp_path):
    """The reference is transformers' own Qwen2AudioForConditionalGeneration (its processor,
    its 30 s padded encoder), not only the in-repo twin: for the linear projector the twin
    on the adopted directory gives the same placeholder counts, next-token logits and
    greedy tokens."""
    from transformers import Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

    from experiments.serving.engine import chat_prompt
    from qwen2_audio_vllm.hf import (
        STOP_TOKENS,
        clip_embeddings,
        expand_audio_placeholders,
        greedy_transcribe,
    )

    theirs = Qwen2AudioForConditionalGeneration.from_pretrained(hub_tiny, dtype=torch.float32).eval()
    their_proc = Qwen2AudioProcessor.from_pretrained(hub_tiny)
    adopted = adopt_checkpoint(hub_tiny, tmp_path)
    twin, proc = load_model(adopted), load_processor(adopted)
    prompt = chat_prompt(proc.tokenizer)
    clips = [a for _, a, _ in speech_clips]
    ours, counts = greedy_transcribe(twin, proc, clips, prompt, max_new_tokens=12)
    eos = proc.tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    ids = proc.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for clip, tokens, n, emb in zip(clips, ours, counts, clip_embeddings(twin, proc, clips), strict=True):
        inputs = their_proc(text=prompt, audio=clip, sampling_rate=16000, return_tensors="pt")
        assert int((inputs["input_ids"] == twin.audio_token_id).sum()) == n
        with torch.no_grad():
            ref = theirs(**inputs).logits[0, -1]
            row = torch.tensor([expand_audio_placeholders(ids, [n], twin.audio_token_id)])
            got = twin(row, torch.ones_like(row), [emb]).logits[0, -1]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        out = theirs.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                              pad_token_id=their_proc.tokenizer.pad_token_id)
        assert out[0, inputs["input_ids"].shape[1]:].tolist() == tokens
