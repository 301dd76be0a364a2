"""Benchmark: serving requests from raw audio vs from cached pooled encoder frames
(`{"audio_frames": [...]}`, the model then runs only the projector), same engine, same
clips, alternating rounds in one run.

    .venv/bin/python -m experiments.benchmarks.features [checkpoint=DIR] [requests=64] [rounds=5]
"""

from __future__ import annotations

import statistics

import hydra
from omegaconf import DictConfig

from experiments.benchmarks.offline import check_rounds, interleaved_rounds, request_set, speedup


@hydra.main(config_path="../../conf/apps", config_name="bench_features", version_base=None)
def main(cfg: DictConfig) -> None:
    check_rounds(cfg.rounds)

    from vllm import SamplingParams

    from experiments.serving.engine import audio_request, chat_prompt, close_llm, make_llm
    from experiments.training.cache import encoder_frames
    from qwen2_audio_vllm.checkpoint import load_model, load_processor

    ckpt, audios = request_set(cfg.checkpoint, list(cfg.lengths), cfg.requests)
    model, processor = load_model(ckpt), load_processor(ckpt)
    cached = encoder_frames(model, processor.feature_extractor, audios)  # what the cache holds
    llm = make_llm(ckpt, max_num_seqs=cfg.requests, enable_mm_embeds=True)
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0, ignore_eos=True)
    prompt = chat_prompt(llm.get_tokenizer())
    requests = {
        "audio": [audio_request(prompt, a) for a in audios],
        "frames": [{"prompt": prompt, "multi_modal_data": {"audio": {"audio_frames": [f]}}} for f in cached],
    }
    try:
        llm.generate(requests["audio"][:4], params, use_tqdm=False)  # warm-up
        seconds = interleaved_rounds(
            {name: lambda _round, reqs=reqs: llm.generate(reqs, params, use_tqdm=False) for name, reqs in requests.items()},
            cfg.rounds,
        )
    finally:
        close_llm(llm)
    for k, per_round in seconds.items():
        print(f"{k:7s} {cfg.requests / statistics.median(per_round):.2f} req/s (median round)")
    r = speedup(seconds["audio"], seconds["frames"])
    print(f"cached frames / raw audio throughput: {r['median']:.2f}x [{r['min']:.2f}, {r['max']:.2f}] "
          f"(median [min, max] over {cfg.rounds} alternating rounds of {cfg.requests} requests, "
          f"lengths {cfg.lengths} s, {cfg.max_tokens} output tokens)")

if __name__ == "__main__":
    main()
