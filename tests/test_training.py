"""Encoder-output cache and projector alignment on the tiny model (CPU, seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from experiments.data import SyntheticSpec, build_synthetic, read_manifest
from experiments.training.cache import load_or_build
from experiments.training.train import AlignRecipe, TextBatcher, TrainSettings, align
from qwen2_audio_vllm.checkpoint import load_config, load_model, load_processor


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    m = build_synthetic(tmp_path_factory.mktemp("syn") / "d", SyntheticSpec(seed=5, train=32, dev=8, test=2), workers=2)
    return read_manifest(m["train"]), read_manifest(m["dev"])


@pytest.mark.parametrize(("store", "tol"), [(torch.float32, 1e-4), (torch.float16, 2e-3)])
def test_cache_round_trip_matches_full_window_encoder(tiny_base, rows, tmp_path, store, tol):
    """Batched over clips of different lengths, each batch trimmed, stored in `store`: equal
    to the 30 s window encoder to float rounding (float16: 2^-11 relative)."""
    model, processor = load_model(tiny_base), load_processor(tiny_base)
    train = rows[0][:6]
    frames, lengths = load_or_build(model, processor, train, tmp_path / "cache", batch_size=4, store_dtype=store)
    assert all(f.dtype == store for f in frames)
    from experiments.data.audio import load_audio
    from experiments.training.cache import cache_info

    info = cache_info(tmp_path / "cache")
    assert info["clips"] == 6 and info["dtype"] == str(store)
    assert info["bytes"] >= sum(f.numel() for f in frames) * store.itemsize

    fe = processor.feature_extractor
    audios = [load_audio(r["audio_filepath"]) for r in train]
    full = fe(audios, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    with torch.no_grad():  # the 30 s window, as vLLM runs it
        ref, ref_len = model.encode_audio(full["input_features"], full["attention_mask"], trim=False)
    assert lengths.tolist() == ref_len.tolist()
    for f, r, n in zip(frames, ref, ref_len.tolist(), strict=True):
        torch.testing.assert_close(f.float(), r[:n], atol=tol, rtol=tol)


def test_cache_reused_and_corruption_rebuilt(tiny_base, rows, tmp_path, capsys):
    model, processor = load_model(tiny_base), load_processor(tiny_base)
    train = rows[0][:4]
    d = tmp_path / "cache"
    first, _ = load_or_build(model, processor, train, d)
    stamp = (d / "index.json").stat().st_mtime_ns
    load_or_build(model, processor, train, d)
    assert (d / "index.json").stat().st_mtime_ns == stamp  # reused
    shard = d / json.loads((d / "index.json").read_text())["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\xff" * 8
    shard.write_bytes(bytes(data))
    again, _ = load_or_build(model, processor, train, d)
    assert "stale or corrupt; rebuilding" in capsys.readouterr().out
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    # another model (different tower weights) never reads this cache
    with torch.no_grad():
        model.audio_tower.layer_norm.bias.add_(1.0)
    changed, _ = load_or_build(model, processor, train, d)
    assert "stale or corrupt" in capsys.readouterr().out
    assert not torch.equal(changed[0], first[0])


def test_align_trains_only_the_projector(tiny_base, rows, tmp_path):
    model, processor = load_model(tiny_base), load_processor(tiny_base)
    train, dev = rows
    tf, _ = load_or_build(model, processor, train, tmp_path / "c_train")
    df, _ = load_or_build(model, processor, dev, tmp_path / "c_dev")
    block = {"name": "mlp", "stack": 2, "hidden_dim": 128}
    s = TrainSettings(steps=24, batch_size=8, lr=3e-3, warmup=4, eval_every=8)
    out = tmp_path / "aligned"
    result = align(tiny_base, block, (tf, [r["text"] for r in train]), (df, [r["text"] for r in dev]), out, s)
    dev_losses = [h["dev_loss"] for h in result["history"]]
    assert len(dev_losses) == 3 and min(dev_losses[1:]) < dev_losses[0]
    assert result["trainable_params"] == sum(p.numel() for p in load_model(out).multi_modal_projector.parameters())

    base = load_file(tiny_base / "model.safetensors")
    aligned = load_file(out / "model.safetensors")
    frozen = [k for k in base if not k.startswith("multi_modal_projector.")]
    assert frozen and all(torch.equal(base[k], aligned[k]) for k in frozen)  # bit-identical
    assert json.loads((out / "config.json").read_text())["projector"]["name"] == "mlp"
    assert any(k.startswith("multi_modal_projector.layers.") for k in aligned)


def test_mean_pool_init_starts_from_the_base_projector(tiny_base):
    """train.init=mean_pool: a stack-4 linear built on the base projects real encoder frames
    exactly as the base's linear does their 4-frame means; other projectors are refused."""
    from experiments.training.train import _init_from_base

    base = load_model(tiny_base)
    model = load_model(tiny_base, projector={"name": "linear", "stack": 4}, load_projector=False)
    _init_from_base(model.multi_modal_projector, tiny_base, "mean_pool")
    frames = torch.randn(1, 40, base.config.audio_config.d_model)
    mask = torch.ones(1, 40, dtype=torch.bool)
    with torch.no_grad():
        pooled = base.multi_modal_projector(frames.reshape(1, 10, 4, -1).mean(2), torch.ones(1, 10, dtype=torch.bool))
        torch.testing.assert_close(model.multi_modal_projector(frames, mask), pooled)
    mlp = load_model(tiny_base, projector={"name": "mlp", "stack": 4}, load_projector=False)
    with pytest.raises(ValueError, match="train.init=mean_pool.*MLPProjector.*projector.stack=K"):
        _init_from_base(mlp.multi_modal_projector, tiny_base, "mean_pool")


def test_align_recipes_that_cannot_work_are_refused_before_training(tiny_base, tmp_path):
    """check_recipe names both values: chunks that end on a partial token group, an init the
    projector cannot take, a KD teacher with another vocabulary, LLM width or tower."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from experiments.data import tokenizer_corpus
    from experiments.training.train import AlignRecipe, check_recipe
    from qwen2_audio_vllm.tiny import TinySpec, build_tiny_checkpoint

    stack4 = {"name": "linear", "stack": 4}
    with pytest.raises(ValueError, match=r"chunk_s=1.0 gives chunks of 25 encoder frames, not a multiple of the "
                                         r"projector's 4 frames.*multiple of 0.16 s"):
        check_recipe(tiny_base, stack4, AlignRecipe(chunk_s=1.0))
    check_recipe(tiny_base, stack4, AlignRecipe(chunk_s=0.96))  # 24 frames: six whole groups
    with pytest.raises(ValueError, match=r"train.init=window_mean cannot start the projector .*'linear'.*mean_shortcut=true"):
        check_recipe(tiny_base, stack4, AlignRecipe(init="window_mean"))
    qformer = {"name": "attention", "downsample": "queries", "window": 8, "queries": 2}
    with pytest.raises(ValueError, match=r"train.init=window_mean cannot start"):
        check_recipe(tiny_base, qformer, AlignRecipe(init="window_mean"))
    check_recipe(tiny_base, qformer | {"mean_shortcut": True}, AlignRecipe(init="window_mean"))

    spec = TinySpec(encoder_weights=None)
    kd = AlignRecipe(kd_teacher="base", kd_checkpoint=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="is not a checkpoint directory"):
        check_recipe(tiny_base, stack4, kd)
    other_vocab = build_tiny_checkpoint(tmp_path / "vocab", tokenizer_corpus(), replace(spec, vocab_size=700))
    with pytest.raises(ValueError, match=r"teacher's vocabulary \(text_config.vocab_size\) is 700, the student's 1000"):
        check_recipe(tiny_base, stack4, replace(kd, kd_checkpoint=str(other_vocab)))
    wider = build_tiny_checkpoint(tmp_path / "wide", tokenizer_corpus(), replace(spec, text_dim=192, text_heads=3))
    with pytest.raises(ValueError, match=r"teacher's LLM width \(text_config.hidden_size\) is 192, the student's 128"):
        check_recipe(tiny_base, stack4, replace(kd, kd_checkpoint=str(wider)))
    other_tower = tmp_path / "tower"
    shutil.copytree(tiny_base, other_tower)
    weights = load_file(other_tower / "model.safetensors")
    weights["audio_tower.layer_norm.bias"] = weights["audio_tower.layer_norm.bias"] + 1
    save_file(weights, other_tower / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="its audio tower's weights differ from the base's"):
        check_recipe(tiny_base, stack4, replace(kd, kd_checkpoint=str(other_tower)))
    with pytest.raises(ValueError, match="needs train.kd.teacher=base or whole, got 'text'"):
        AlignRecipe(kd_teacher="text", kd_checkpoint=str(tiny_base))


def test_align_window_mean_qformer_and_a_checkpoint_teacher(tiny_base, rows, tmp_path):
    """A Q-Former started as window means, distilled from a teacher checkpoint (here the
    base itself, loaded as its own model): the first dev loss is the window-mean-pooled
    base's, the run trains and exports a checkpoint whose Q-Former keeps its shortcut."""
    from experiments.training.train import AlignRecipe

    model, processor = load_model(tiny_base), load_processor(tiny_base)
    train, dev = rows
    tf, _ = load_or_build(model, processor, train, tmp_path / "c_train")
    df, _ = load_or_build(model, processor, dev, tmp_path / "c_dev")
    block = {"name": "attention", "downsample": "queries", "window": 8, "queries": 2, "mean_shortcut": True,
             "width": 64, "layers": 1, "heads": 2}
    s = TrainSettings(steps=8, batch_size=8, lr=3e-3, warmup=2, eval_every=4)
    recipe = AlignRecipe(init="window_mean", kd_teacher="base", kd_checkpoint=str(tiny_base))
    out = tmp_path / "aligned"
    result = align(tiny_base, block, (tf, [r["text"] for r in train]), (df, [r["text"] for r in dev]), out, s, recipe)
    assert len(result["history"]) == 2 and result["recipe"]["kd_checkpoint"] == str(tiny_base)
    saved = json.loads((out / "config.json").read_text())["projector"]
    assert saved["mean_shortcut"] is True and saved["window"] == 8
    assert "multi_modal_projector.mean_projection.weight" in load_file(out / "model.safetensors")


def test_ctc_prealignment_runs_before_the_lm_loss_and_lowers_its_dev_loss(tiny_base, rows, tmp_path):
    """train.prealign_steps: the projector's outputs are first trained by CTC against the
    frozen LLM's embeddings (its dev CTC loss falls), then the LM loss trains as usual, and
    only the projector changes."""
    from experiments.training.train import AlignRecipe

    model, processor = load_model(tiny_base), load_processor(tiny_base)
    train, dev = rows
    tf, _ = load_or_build(model, processor, train, tmp_path / "c_train")
    df, _ = load_or_build(model, processor, dev, tmp_path / "c_dev")
    s = TrainSettings(steps=4, batch_size=8, lr=3e-3, warmup=2, eval_every=4)
    out = tmp_path / "aligned"
    result = align(tiny_base, {"name": "linear", "stack": 2}, (tf, [r["text"] for r in train]),
                   (df, [r["text"] for r in dev]), out, s, AlignRecipe(init="random", prealign_steps=40))
    ctc = [h["dev_loss"] for h in result["prealign"]["history"]]
    assert len(ctc) == 10 and ctc[-1] < ctc[0]
    assert 0 < result["prealign"]["tokens"] < len(processor.tokenizer)
    assert len(result["history"]) == 1 and result["recipe"]["prealign_steps"] == 40
    base, aligned = load_file(tiny_base / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(base[k], aligned[k]) for k in base if not k.startswith("multi_modal_projector."))
    with pytest.raises(ValueError, match="prealign_steps=-1"):
        AlignRecipe(prealign_steps=-1)


@pytest.mark.parametrize(("overrides", "steps"), [
    (["model=smollm2", "projector=mlp"], 2000),  # from random weights: the base recipe's pre-alignment
    (["model=smollm2", "projector=linear"], 0),  # the base's own block: starts from its weights
    (["model=smollm2", "projector=mlp", "train.init=mean_pool"], 0),
    (["model=smollm2", "projector=mlp", "train.prealign_steps=7"], 7),
    (["model=tiny", "projector=mlp"], 0),  # the tiny recipe has no pre-alignment
])
def test_every_projector_that_starts_from_scratch_gets_the_models_prealignment(tiny_base, overrides, steps):
    """train.prealign_steps=auto (conf/train/align.yaml): the align stage's recipe takes the
    model's pretrain.prealign_steps exactly when the projector starts from random weights."""
    from experiments.run import align_output
    from experiments.training.base import default_config

    cfg = default_config(overrides)
    state = {"base_dir": str(tiny_base), "manifests": {"train": "t.jsonl", "dev": "d.jsonl"}}
    _, _, recipe, out = align_output(cfg, state)
    assert recipe.prealign_steps == steps
    assert ("prealign" in str(recipe.beyond_init())) == bool(steps)


def test_dev_wer_against_steps_is_the_exported_checkpoints_greedy_wer(tiny_base, rows, tmp_path):
    """train.dev_wer_clips: at each evaluation the first N dev clips are decoded greedily from
    their cached frames; at the last (and only) evaluation that WER is the one the exported
    checkpoint gets decoding the same clips' audio as the reference path does."""
    from experiments.data.audio import load_audio
    from experiments.metrics import wer_cer
    from experiments.serving.engine import chat_prompt
    from experiments.training.train import greedy_wer
    from qwen2_audio_vllm.hf import greedy_transcribe

    model, processor = load_model(tiny_base), load_processor(tiny_base)
    train, dev = rows
    tf, _ = load_or_build(model, processor, train, tmp_path / "c_train", store_dtype=torch.float32)
    df, _ = load_or_build(model, processor, dev, tmp_path / "c_dev", store_dtype=torch.float32)
    texts = [r["text"] for r in dev]
    s = TrainSettings(steps=6, batch_size=8, lr=1e-4, warmup=2, eval_every=3, dev_wer_clips=5)
    out = tmp_path / "aligned"
    # random weights: the transcripts are word salad, but words (the check below is on them)
    result = align(tiny_base, load_config(tiny_base).projector, (tf, [r["text"] for r in train]), (df, texts), out, s,
                   AlignRecipe(init="base"))
    wers = [h["dev_wer"] for h in result["history"]]
    assert len(wers) == 2 and all(w > 0 for w in wers)

    aligned, proc = load_model(out), load_processor(out)
    max_new = max(len(ids) for ids in proc.tokenizer(texts[:5], add_special_tokens=False)["input_ids"]) + 8
    tokens, _ = greedy_transcribe(aligned, proc, [load_audio(r["audio_filepath"]) for r in dev[:5]],
                                  chat_prompt(proc.tokenizer), max_new)
    hyps = proc.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    assert all(h.split() for h in hyps)
    best = min(result["history"], key=lambda h: h["dev_loss"])
    assert best["dev_wer"] == pytest.approx(wer_cer(texts[:5], hyps)["wer"])
    assert greedy_wer(aligned, TextBatcher(proc.tokenizer, aligned.audio_token_id), df[:5], texts[:5], 2,
                      torch.device("cpu")) == pytest.approx(best["dev_wer"])


def test_dev_wer_keeps_the_align_keys_of_runs_without_it(tiny_base):
    from experiments.run import align_output
    from experiments.training.base import default_config

    state = {"base_dir": str(tiny_base), "manifests": {"train": "t.jsonl", "dev": "d.jsonl"}}
    plain = align_output(default_config(["projector=linear"]), state)
    off = align_output(default_config(["projector=linear", "train.dev_wer_clips=0"]), state)
    on = align_output(default_config(["projector=linear", "train.dev_wer_clips=50"]), state)
    assert plain[3] == off[3] != on[3] and on[1].dev_wer_clips == 50
    with pytest.raises(ValueError, match=r"train.dev_wer_clips=-1: expected 0 \(no dev WER\)"):
        align(tiny_base, {"name": "linear"}, ([], []), ([], []), Path("unused"), TrainSettings(dev_wer_clips=-1))
