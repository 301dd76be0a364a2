"""The `trainer` settings: device and precision, bf16 on CPU (the GPU code path), gradient
checkpointing, token-budget batches, the token-summed loss data parallelism relies on."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from experiments.data import SyntheticSpec, build_synthetic, read_manifest
from experiments.training.devices import placement
from experiments.training.train import TextBatcher, TrainerSettings, TrainSettings, align, batches
from qwen2_audio_vllm.checkpoint import load_model, load_processor
from tests.conftest import cached_splits


def test_auto_placement_and_clear_errors():
    place = placement("auto", "auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert place.device.type == expected
    assert place.dtype == (torch.bfloat16 if expected == "cuda" else torch.float32)
    assert placement("cpu", "bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="expected auto, cpu or cuda"):
        placement("tpu", "auto")
    with pytest.raises(ValueError, match="expected auto, fp32 or bf16"):
        placement("auto", "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"sees no CUDA device.*set trainer.device=auto"):
            placement("cuda", "auto")


def test_token_budget_batches_cover_every_row_within_budget():
    lengths = [20 + (i * 37) % 300 for i in range(500)]
    it = batches(lengths, batch_size=64, max_tokens=2000, seed=3)
    seen: list[int] = []
    while len(seen) < len(lengths):
        b = next(it)
        assert len(b) * max(lengths[i] for i in b) <= 2000 and len(b) <= 64
        seen += b
    assert sorted(seen) == list(range(500))  # one epoch: every row exactly once
    # sorted pools keep padding small: far below fixed-size batches of shuffled rows
    padded = sum(len(b) * max(lengths[i] for i in b) for b in _epoch(lengths, 2000))
    fixed = sum(8 * max(lengths[i] for i in b) for b in _chunks(list(range(500)), 8))
    assert padded < 0.8 * fixed
    with pytest.raises(ValueError, match=r"longer \(319 tokens\) than trainer.max_tokens_per_batch=300"):
        next(batches(lengths, 64, 300, 0))


def _epoch(lengths, budget):
    it, n, out = batches(lengths, 64, budget, 0), 0, []
    while n < len(lengths):
        out.append(next(it))
        n += len(out[-1])
    return out


def _chunks(xs, k):
    return [xs[i : i + k] for i in range(0, len(xs), k)]


def test_fixed_batches_are_batch_size_rows_of_similar_length():
    """max_tokens None: every batch is batch_size rows; the rows a pool cannot fill a batch
    with go to the next pool, so two epochs' worth of batches hold every row twice; rows of
    similar length go together (far less padding than shuffled batches)."""
    it = batches([10] * 10, batch_size=4, max_tokens=None, seed=0)
    got = [next(it) for _ in range(5)]
    assert all(len(b) == 4 for b in got)
    assert sorted(sum(got, [])) == sorted(list(range(10)) * 2)
    lengths = [20 + (i * 37) % 300 for i in range(1600)]
    it = batches(lengths, batch_size=8, max_tokens=None, seed=0)
    bucketed = [next(it) for _ in range(200)]
    assert all(len(b) == 8 for b in bucketed) and sorted(sum(bucketed, [])) == list(range(1600))
    padded = sum(8 * max(lengths[i] for i in b) for b in bucketed)
    shuffled = sum(8 * max(lengths[i] for i in b) for b in _chunks(list(range(1600)), 8))
    assert padded < 0.6 * shuffled


@pytest.fixture(scope="module")
def data(tiny_base, tmp_path_factory):
    return cached_splits(tiny_base, tmp_path_factory.mktemp("trainer"), seed=7, train=32)


def test_token_loss_is_the_summed_hf_loss(tiny_base, data):
    model, processor = load_model(tiny_base), load_processor(tiny_base)
    frames, texts = data["train"]
    from experiments.training.cache import pad_frames

    x, lengths = pad_frames([f.float() for f in frames[:4]])
    audio = model.project(x, lengths)
    batch = TextBatcher(processor.tokenizer, model.audio_token_id)(texts[:4], [a.shape[0] for a in audio])
    with torch.no_grad():
        total, count = model.token_loss(audio_embeds=audio, **batch)
        mean = model(audio_embeds=audio, **batch).loss
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum()) > 0
    torch.testing.assert_close(total / count, mean, atol=1e-5, rtol=1e-5)


STEPS = TrainSettings(steps=12, batch_size=8, lr=3e-3, warmup=2, eval_every=4)
BLOCK = {"name": "mlp", "stack": 2, "hidden_dim": 128}


def test_bf16_align_on_cpu_trains_fp32_projector_and_keeps_frozen_weights(tiny_base, data, tmp_path):
    """The GPU recipe on the CPU: encoder/LLM in bfloat16, projector float32 under autocast."""
    out = tmp_path / "bf16"
    result = align(tiny_base, BLOCK, data["train"], data["dev"], out, STEPS, trainer=TrainerSettings(device="cpu", precision="bf16"))
    assert result["precision"] == "bf16" and result["device"] == "cpu"
    dev = [h["dev_loss"] for h in result["history"]]
    assert min(dev[1:]) < dev[0]  # it learns in bf16
    aligned, base = load_file(out / "model.safetensors"), load_file(tiny_base / "model.safetensors")
    proj = [k for k in aligned if k.startswith("multi_modal_projector.")]
    assert proj and all(aligned[k].dtype == torch.float32 for k in proj)
    frozen = [k for k in base if not k.startswith("multi_modal_projector.")]
    assert all(aligned[k].dtype == base[k].dtype and torch.equal(aligned[k], base[k]) for k in frozen)
    # fp32 from the same start reaches a similar dev loss: bf16 changes rounding, not the recipe
    ref = align(tiny_base, BLOCK, data["train"], data["dev"], tmp_path / "fp32", STEPS, trainer=TrainerSettings(device="cpu", precision="fp32"))
    assert abs(ref["best_dev_loss"] - result["best_dev_loss"]) < 0.1 * ref["best_dev_loss"]


def test_gradient_checkpointing_gives_the_same_training(tiny_base, data, tmp_path):
    runs = [
        align(tiny_base, BLOCK, data["train"], data["dev"], tmp_path / f"gc{gc}", STEPS,
              trainer=TrainerSettings(device="cpu", precision="fp32", gradient_checkpointing=gc))
        for gc in (False, True)
    ]
    for a, b in zip(runs[0]["history"], runs[1]["history"], strict=True):
        assert a["dev_loss"] == pytest.approx(b["dev_loss"], rel=1e-4)


def test_token_budget_align_runs_and_exports(tiny_base, data, tmp_path):
    t = TrainerSettings(device="cpu", precision="fp32", max_tokens_per_batch=600)
    result = align(tiny_base, BLOCK, data["train"], data["dev"], tmp_path / "budget", STEPS, trainer=t)
    assert result["target_tokens_per_s"] > 0 and len(result["history"]) == 3
    assert json.loads((tmp_path / "budget" / "config.json").read_text())["projector"]["name"] == "mlp"


@pytest.mark.slow  # two twins, bf16 emulated on CPUs without native bf16
def test_train_bench_alternates_precisions(tmp_path):
    """train_bench.precisions: each projector at each precision, on one twin per precision
    with the same weights, in the same alternating rounds."""
    from experiments.run import run
    from tests.test_pipeline import composed

    cfg = composed(["stages=[train_bench]", "logger=none", "train_bench.rounds=2", "train_bench.steps=1",
                    "train_bench.clip_s=1.0", "train_bench.projectors=[{name:linear}]", "train_bench.precisions=[fp32,bf16]",
                    f"run_dir={tmp_path}", "trainer.device=cpu"])
    m = run(cfg)["stage_results"]["train_bench"]["measured"]
    assert list(m["per_projector"]) == ["linear@fp32", "linear@bf16"] and m["precision"] == "fp32/bf16"
    fp32, bf16 = m["per_projector"].values()
    assert fp32["step_time_vs_linear@fp32_median"] == 1.0 and bf16["step_time_vs_linear@fp32_median"] > 0
    assert fp32["projector_params"] == bf16["projector_params"] and fp32["llm_tokens_per_step"] == bf16["llm_tokens_per_step"]


def test_train_bench_stage_measures_every_projector_and_estimates(tmp_path):
    from experiments.benchmarks.training import encoder_params, llm_params
    from experiments.run import run
    from qwen2_audio_vllm.hf import Qwen2AudioSwap
    from qwen2_audio_vllm.tiny import TinySpec, make_config
    from tests.test_pipeline import composed

    cfg = composed(["stages=[train_bench]", "logger=none", "train_bench.rounds=2", "train_bench.steps=1",
                    "train_bench.clip_s=2.0", f"run_dir={tmp_path}", "trainer.device=cpu"])
    r = run(cfg)["stage_results"]["train_bench"]
    m = r["measured"]
    assert list(m["per_projector"]) == ["linear", "mlp", "attention", "linear-stack4"]
    first = m["per_projector"]["linear"]
    assert first["step_time_vs_linear_median"] == 1.0 and first["llm_tokens_per_step"] == 8 * (24 + 50 + 33)
    assert m["per_projector"]["linear-stack4"]["llm_tokens_per_step"] == 8 * (24 + 13 + 33)  # 4x fewer audio tokens
    assert all(p["step_s_min"] <= p["step_s_median"] <= p["step_s_max"] and p["trained_tokens_per_s"] > 0
               for p in m["per_projector"].values())
    assert m["peak_rss_bytes"] > 0 and m["device"] == "cpu"
    assert json.loads((tmp_path / "train_bench.json").read_text())["estimate"] == r["estimate"]
    # the estimate's parameter counts are those of the model it describes
    d = TinySpec(**cfg.model.dims)
    twin = Qwen2AudioSwap(make_config(d))
    assert llm_params(d) == pytest.approx(sum(p.numel() for p in twin.language_model.parameters()), rel=0.01)
    assert encoder_params(d) == pytest.approx(sum(p.numel() for p in twin.audio_tower.parameters()), rel=0.01)


def test_seven_b_estimate_counts_the_real_architecture():
    """model=qwen2-audio-7b-random's dims, built on the meta device (no memory): the
    estimate's parameter counts match the modules, and the totals are Qwen2-Audio-7B's."""
    from omegaconf import OmegaConf

    from experiments.benchmarks.training import encoder_params, estimate, llm_params
    from qwen2_audio_vllm.hf import Qwen2AudioSwap
    from qwen2_audio_vllm.tiny import TinySpec, make_config
    from tests.test_pipeline import CONF

    d = TinySpec(**OmegaConf.load(CONF / "model" / "qwen2-audio-7b-random.yaml").dims)
    with torch.device("meta"):
        twin = Qwen2AudioSwap(make_config(d))
    llm = sum(p.numel() for p in twin.language_model.parameters())
    enc = sum(p.numel() for p in twin.audio_tower.parameters())
    assert llm_params(d) == pytest.approx(llm, rel=0.01) and encoder_params(d) == pytest.approx(enc, rel=0.01)
    assert 8.2e9 < llm + enc < 8.5e9  # Qwen2-Audio-7B: 8.4 B parameters
    e = estimate(d, 5_246_976, batch=8, clip_s=8.0, text_tokens=32)
    assert e["activation_bytes_checkpointed"] < e["activation_bytes"] < 80 * 2**30
    assert e["weights_bytes"] == 2 * (llm_params(d) + encoder_params(d)) + 16 * 5_246_976


@pytest.mark.slow
@pytest.mark.parametrize("units", ["tokens", "chars"])
def test_pretrain_with_ctc_exports_the_plain_checkpoint(tiny_base, tmp_path, units):
    """The CTC head trains beside the model (its loss falls on a fixed batch) and is not in
    the exported checkpoint, which has exactly the base's weights' names."""
    from experiments.training.train import CtcHead, pretrain
    from qwen2_audio_vllm.checkpoint import read_weights

    m = build_synthetic(tmp_path / "syn", SyntheticSpec(seed=7, train=16, dev=4, test=3, augment=0.0), workers=2)
    out = tmp_path / "base"
    result = pretrain(tiny_base, read_manifest(m["train"]), read_manifest(m["dev"]), out,
                      TrainSettings(steps=4, batch_size=8, lr=3e-3, warmup=1, eval_every=2), ctc_weight=0.5,
                      ctc_units=units)
    assert result["ctc_weight"] == 0.5 and result["ctc_units"] == units and len(result["history"]) == 2
    assert set(read_weights(out)) == set(read_weights(tiny_base))

    torch.manual_seed(0)
    head = CtcHead(16, 10)
    frames, lengths = torch.randn(2, 20, 16), torch.tensor([20, 15])
    targets = [[1, 2, 3], [4, 4]]
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = float(head.loss(frames, lengths, targets).detach())
    for _ in range(20):
        opt.zero_grad()
        head.loss(frames, lengths, targets).backward()
        opt.step()
    assert float(head.loss(frames, lengths, targets).detach()) < 0.5 * first


def test_ctc_character_targets_spell_the_transcript(tiny_base):
    """chars: one class per character of the training transcripts, in sorted order, so every
    transcript (names and digits included) is its own spelling; tokens: the tokenizer's ids."""
    from transformers import AutoTokenizer

    from experiments.training.train import ctc_targets

    texts = ["my number is 42", "anna saw the zebra"]
    targets, n = ctc_targets(texts, "chars", tokenizer=None)
    alphabet = sorted(set("".join(texts)))
    assert n == len(alphabet) == 17
    assert ["".join(alphabet[i] for i in t) for t in targets] == texts
    tok = AutoTokenizer.from_pretrained(tiny_base)
    ids, n_tok = ctc_targets(texts, "tokens", tok)
    assert n_tok == len(tok) and ids == tok(texts, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="ctc_units='phones'"):
        ctc_targets(texts, "phones", tok)


@pytest.mark.slow
def test_pretrain_with_a_frozen_tower_trains_only_projector_and_llm(tiny_base, tmp_path, monkeypatch):
    """freeze_encoder=True (the Whisper tower): pretraining reads the encoder-output cache,
    the exported tower is the input's bit for bit, the projector and the LLM change, and the
    dev loss falls; a CTC weight, which would only train a tower, is refused."""
    from experiments.training.train import pretrain
    from qwen2_audio_vllm.checkpoint import read_weights

    monkeypatch.setenv("Q2AP_CACHE", str(tmp_path / "cache"))
    m = build_synthetic(tmp_path / "syn", SyntheticSpec(seed=8, train=24, dev=4, test=2, augment=0.0), workers=2)
    out = tmp_path / "base"
    s = TrainSettings(steps=6, batch_size=8, lr=3e-3, warmup=1, eval_every=3)
    result = pretrain(tiny_base, read_manifest(m["train"]), read_manifest(m["dev"]), out, s, freeze_encoder=True)
    assert result["freeze_encoder"] and result["history"][-1]["dev_loss"] < result["history"][0]["dev_loss"] + 1e-6
    assert list((tmp_path / "cache" / "encoder").glob("tower-*/index.json"))  # the cache align reads too
    before, after = read_weights(tiny_base), read_weights(out)
    assert set(before) == set(after)
    tower = [k for k in before if k.startswith("audio_tower.")]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert not torch.equal(before["multi_modal_projector.linear.weight"], after["multi_modal_projector.linear.weight"])
    assert not torch.equal(before["language_model.lm_head.weight"], after["language_model.lm_head.weight"])
    with pytest.raises(ValueError, match="ctc_weight=0.5 trains the encoder.*freeze_encoder"):
        pretrain(tiny_base, read_manifest(m["train"]), read_manifest(m["dev"]), out, s, ctc_weight=0.5,
                 freeze_encoder=True)
