"""Compression recipes of the align stage (issue 19): distillation from the full-rate base or
from the LLM reading the transcript, LoRA adapters merged into the export, and the
`experiment=compression` / `experiment=lr_search` sweeps' configs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from experiments.training.cache import pad_frames
from experiments.training.lora import adapters_off, add_lora, merged_weights
from experiments.training.train import (
    AlignRecipe,
    TextBatcher,
    TrainSettings,
    _base_projector,
    align,
    kd_loss,
)
from qwen2_audio_vllm.checkpoint import load_model, load_processor
from qwen2_audio_vllm.hf import IGNORE
from tests.conftest import cached_splits

STEPS = TrainSettings(steps=8, batch_size=8, lr=3e-3, warmup=2, eval_every=4)
STACK4 = {"name": "linear", "stack": 4}


@pytest.fixture(scope="module")
def data(tiny_base, tmp_path_factory):
    return cached_splits(tiny_base, tmp_path_factory.mktemp("recipes"), seed=11, train=24)


def test_kd_loss_is_the_tempered_kl():
    student, teacher = torch.randn(6, 50), torch.randn(6, 50)
    assert float(kd_loss(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-5)
    ref = torch.nn.functional.kl_div(
        torch.log_softmax(student / 2, -1), torch.log_softmax(teacher / 2, -1), log_target=True, reduction="sum"
    )
    torch.testing.assert_close(kd_loss(student, teacher, 2.0), ref * 4)


def test_text_teacher_reads_the_transcript_where_the_audio_was(tiny_base):
    processor, model = load_processor(tiny_base), load_model(tiny_base)
    batcher = TextBatcher(processor.tokenizer, model.audio_token_id)
    texts = ["open the red door", "david has a blue car today"]
    student, teacher = batcher(texts, [7, 11]), batcher.text_teacher(texts)
    assert not (teacher["input_ids"] == model.audio_token_id).any()
    for s_row, t_row, s_lab, t_lab, text in zip(
        student["input_ids"], teacher["input_ids"], student["labels"], teacher["labels"], texts, strict=True
    ):
        words = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert t_row.tolist()[: len(t_row)].count(words[0]) >= 2  # in the prompt and in the answer
        assert s_lab[s_lab != IGNORE].tolist() == t_lab[t_lab != IGNORE].tolist()  # the same tokens to predict
        assert (s_row == model.audio_token_id).sum() in (7, 11)
    # both teachers give logits for exactly the student's labelled tokens
    with torch.no_grad():
        logits, target = model.labelled_logits(audio_embeds=[], **teacher)
    assert logits.shape[0] == target.numel() == int((student["labels"][:, 1:] != IGNORE).sum())


def test_base_teacher_is_the_base_projector(tiny_base, data):
    model = load_model(tiny_base)
    x, lengths = pad_frames([f.float() for f in data["train"][0][:3]])
    with torch.no_grad():
        ours = model.project(x, lengths, projector=_base_projector(tiny_base, torch.device("cpu")))
        ref = model.project(x, lengths)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("teacher", ["base", "text"])
def test_align_with_distillation_trains_the_projector_only(tiny_base, data, tmp_path, teacher):
    recipe = AlignRecipe(init="mean_pool", kd_teacher=teacher, kd_weight=1.0, kd_temperature=2.0)
    out = tmp_path / teacher
    result = align(tiny_base, STACK4, data["train"], data["dev"], out, STEPS, recipe)
    assert result["recipe"]["kd_teacher"] == teacher and len(result["history"]) == 2
    assert result["trainable_params"] == sum(p.numel() for p in load_model(out).multi_modal_projector.parameters())
    base, aligned = load_file(tiny_base / "model.safetensors"), load_file(out / "model.safetensors")
    frozen = [k for k in base if not k.startswith("multi_modal_projector.")]
    assert all(torch.equal(base[k], aligned[k]) for k in frozen)
    # the KD term is in the training loss: the first step's loss exceeds the LM-only run's
    plain = align(tiny_base, STACK4, data["train"], data["dev"], tmp_path / "plain", STEPS, AlignRecipe(init="mean_pool"))
    assert result["history"][0]["train_loss"] > plain["history"][0]["train_loss"]


def test_lora_merge_equals_the_adapted_llm(tiny_base, data):
    model = load_model(tiny_base)
    processor = load_processor(tiny_base)
    adapters = add_lora(model.language_model, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    assert len(adapters) == 2 * model.config.text_config.num_hidden_layers
    with torch.no_grad():
        for a in adapters.values():
            a.B.normal_(0, 0.05)  # a trained adapter: B is no longer zero
    x, lengths = pad_frames([f.float() for f in data["train"][0][:3]])
    with torch.no_grad():
        audio = model.project(x, lengths)
        batch = TextBatcher(processor.tokenizer, model.audio_token_id)(data["train"][1][:3], [a.shape[0] for a in audio])
        adapted, _ = model.labelled_logits(audio_embeds=audio, **batch)
        with adapters_off(adapters):
            frozen, _ = model.labelled_logits(audio_embeds=audio, **batch)
    assert not torch.allclose(adapted, frozen, atol=1e-3)

    merged = merged_weights(model.language_model, "language_model.")
    plain = load_model(tiny_base)
    assert set(merged) <= set(plain.state_dict())
    plain.load_state_dict(merged, strict=False)
    with torch.no_grad():
        again, _ = plain.labelled_logits(audio_embeds=plain.project(x, lengths), **batch)
    torch.testing.assert_close(again, adapted, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(plain.project(x, lengths)[0], audio[0])


def test_align_with_lora_exports_a_plain_checkpoint(tiny_base, data, tmp_path):
    recipe = AlignRecipe(init="random", lora_rank=4, lora_alpha=8)
    out = tmp_path / "lora"
    result = align(tiny_base, STACK4, data["train"], data["dev"], out, STEPS, recipe)
    base, aligned = load_file(tiny_base / "model.safetensors"), load_file(out / "model.safetensors")
    llm = [k for k in base if k.startswith("language_model.")]
    assert set(base) == set(aligned) and all(base[k].shape == aligned[k].shape for k in llm)
    adapted = [k for k in llm if k.endswith(("q_proj.weight", "v_proj.weight"))]
    assert adapted and all(not torch.equal(base[k], aligned[k]) for k in adapted)
    untouched = [k for k in base if not k.startswith("multi_modal_projector.") and k not in adapted]
    assert all(torch.equal(base[k], aligned[k]) for k in untouched)
    n_proj = sum(p.numel() for p in load_model(out).multi_modal_projector.parameters())
    assert result["trainable_params"] > n_proj  # the adapters trained too


def test_recipe_rejects_unknown_settings():
    with pytest.raises(ValueError, match=r"train.kd.teacher='teacher'.*\('none', 'base', 'text', 'whole'\)"):
        AlignRecipe(kd_teacher="teacher")
    with pytest.raises(ValueError, match="train.init='warm'"):
        AlignRecipe(init="warm")
    with pytest.raises(ValueError, match="match no Linear of the LLM"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), 2, 4, ("q_proj",))
    assert AlignRecipe().beyond_init() == {}  # runs without KD or LoRA keep their align keys
    assert AlignRecipe(lora_rank=8).beyond_init() == {"lora": [8, 16.0, ["q_proj", "v_proj"]]}


QFORMER_MEAN = {"name": "attention", "downsample": "queries", "window": 8, "queries": 2, "mean_shortcut": True,
                "width": 64, "layers": 1, "heads": 2}


@pytest.mark.engine
@pytest.mark.parametrize(("block", "recipe"), [
    (STACK4, AlignRecipe(init="mean_pool", lora_rank=4, lora_alpha=8)),
    (QFORMER_MEAN, AlignRecipe(init="window_mean", kd_teacher="base", lora_rank=4, lora_alpha=8)),
], ids=["stack4-lora", "qformer-window-mean-kd-lora"])
def test_vllm_serves_the_lora_merged_checkpoint_as_the_twin_does(tiny_base, data, tmp_path, speech_clips, block, recipe):
    """Plain vLLM (the fork, no LoRA support asked for) loads the merged export (a stack-4
    linear; a Q-Former with its window-mean shortcut) and decodes what the HF twin decodes."""
    from vllm import SamplingParams

    from experiments.serving.engine import audio_request, chat_prompt, close_llm, make_llm
    from qwen2_audio_vllm.hf import greedy_transcribe

    out = tmp_path / "lora"
    align(tiny_base, block, data["train"], data["dev"], out, STEPS, recipe)
    model, processor = load_model(out), load_processor(out)
    prompt = chat_prompt(processor.tokenizer)
    audios = [a for _, a, _ in speech_clips][:4]
    llm = make_llm(out, max_num_seqs=4)
    try:
        outs = llm.generate([audio_request(prompt, a) for a in audios], SamplingParams(max_tokens=12, temperature=0))
    finally:
        close_llm(llm)
    hf_tokens, _ = greedy_transcribe(model, processor, audios, prompt, max_new_tokens=12)
    assert [list(o.outputs[0].token_ids) for o in outs] == hf_tokens
