"""Benchmark: projector-alignment step time with the encoder-output cache vs recomputing
the frozen encoder every step, measured side by side in one run.

    .venv/bin/python -m experiments.benchmarks.cache [steps=20] [batch_size=32] [projector=mlp]

Three ways to get a batch's encoder frames, then the same projector forward/backward
through the frozen LLM:
  cached         frames read from the cache (what `align` does)
  recompute      mel + encoder each step, encoder over the batch's clips only (trimmed)
  recompute_30s  mel + encoder each step over the full 30 s window (as vLLM runs it)
Prints seconds per step and the speed-up of the cache over each.
"""

from __future__ import annotations

import statistics
from functools import partial

import hydra
import torch
from omegaconf import DictConfig


@hydra.main(config_path="../../conf/apps", config_name="bench_cache", version_base=None)
def main(cfg: DictConfig) -> None:

    from experiments.benchmarks.offline import check_rounds, interleaved_rounds, speedup

    check_rounds(cfg.steps)
    from experiments.data import read_manifest
    from experiments.data.audio import load_audio
    from experiments.data.prepare import ensure_synthetic
    from experiments.training.base import ensure_random_tiny
    from experiments.training.cache import load_or_build, pad_frames
    from experiments.training.train import TextBatcher
    from qwen2_audio_vllm.checkpoint import cache_root, load_model, load_processor
    from qwen2_audio_vllm.encoder import mel_features, pad_mels

    base = ensure_random_tiny()
    rows = read_manifest(ensure_synthetic()["train"])[: cfg.batch_size * 4]
    model = load_model(base, projector={"name": cfg.projector}, load_projector=False)
    processor = load_processor(base)
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    opt = torch.optim.AdamW(model.multi_modal_projector.parameters(), lr=1e-4)
    batcher = TextBatcher(processor.tokenizer, model.audio_token_id)
    frames, _ = load_or_build(model, processor, rows, cache_root() / "encoder" / "bench-cache")
    fe = processor.feature_extractor

    def encode(idx: list[int], full_window: bool):
        audios = [load_audio(rows[i]["audio_filepath"]) for i in idx]
        with torch.no_grad():
            if full_window:
                f = fe(audios, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
                return model.encode_audio(f["input_features"], f["attention_mask"], trim=False)
            return model.encode_audio(*pad_mels([mel_features(fe, a) for a in audios]), trim=True)

    sources = {
        "cached": lambda idx: pad_frames([frames[i].float() for i in idx]),  # stored float16
        "recompute": lambda idx: encode(idx, full_window=False),
        "recompute_30s": lambda idx: encode(idx, full_window=True),
    }

    def step(name: str, k: int) -> None:
        idx = [(k * cfg.batch_size + j) % len(rows) for j in range(cfg.batch_size)]
        x, lengths = sources[name](idx)
        audio = model.project(x, lengths)
        batch = batcher([rows[i]["text"] for i in idx], [a.shape[0] for a in audio])
        loss = model(audio_embeds=audio, **batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    for name in sources:
        step(name, 0)  # warm-up
    seconds = interleaved_rounds({name: partial(step, name) for name in sources}, cfg.steps)  # one step a round
    for n, per_step in seconds.items():
        print(f"{n:14s} {statistics.median(per_step) * 1000:8.1f} ms/step (median)")
    trimmed, full = speedup(seconds["recompute"], seconds["cached"]), speedup(seconds["recompute_30s"], seconds["cached"])
    print(f"speed-up of the cache, median [min, max] over {cfg.steps} alternating steps: "
          f"{trimmed['median']:.1f}x [{trimmed['min']:.1f}, {trimmed['max']:.1f}] vs recompute (trimmed), "
          f"{full['median']:.1f}x [{full['min']:.1f}, {full['max']:.1f}] vs recompute over the 30 s window "
          f"(batch {cfg.batch_size}, projector {cfg.projector}, torch threads {torch.get_num_threads()})")

if __name__ == "__main__":
    main()
