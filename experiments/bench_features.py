"""Benchmark: serving requests from raw audio vs from cached pooled encoder frames
(`{"audio_frames": [...]}`, the model then runs only the projector), same engine, same
clips, alternating rounds in one run.

    .venv/bin/python -m experiments.bench_features [checkpoint] --requests 64 --rounds 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", type=Path, help="default: the tiny random base")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lengths", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    args = parser.parse_args()

    from vllm import SamplingParams

    from experiments.bench import request_audio
    from experiments.cache import encoder_frames
    from experiments.data import read_manifest
    from experiments.engine import audio_request, chat_prompt, close_llm, make_llm
    from experiments.prepare import ensure_random_tiny, ensure_synthetic
    from qwen2_audio_vllm.checkpoint import load_model, load_processor

    ckpt = args.checkpoint or ensure_random_tiny()
    audios = request_audio(read_manifest(ensure_synthetic()["test"]), args.lengths, args.requests)
    model, processor = load_model(ckpt), load_processor(ckpt)
    cached = encoder_frames(model, processor.feature_extractor, audios)  # what the cache holds
    llm = make_llm(ckpt, max_num_seqs=args.requests, enable_mm_embeds=True)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    prompt = chat_prompt(llm.get_tokenizer())
    requests = {
        "audio": [audio_request(prompt, a) for a in audios],
        "frames": [{"prompt": prompt, "multi_modal_data": {"audio": {"audio_frames": [f]}}} for f in cached],
    }
    try:
        llm.generate(requests["audio"][:4], params, use_tqdm=False)  # warm-up
        seconds = {k: 0.0 for k in requests}
        for _ in range(args.rounds):
            for name, reqs in requests.items():
                t0 = time.perf_counter()
                llm.generate(reqs, params, use_tqdm=False)
                seconds[name] += time.perf_counter() - t0
    finally:
        close_llm(llm)
    rps = {k: args.requests * args.rounds / s for k, s in seconds.items()}
    for k, v in rps.items():
        print(f"{k:7s} {v:.2f} req/s")
    print(f"cached frames / raw audio throughput: {rps['frames'] / rps['audio']:.2f}x "
          f"({args.requests} requests x {args.rounds} rounds, lengths {args.lengths} s, "
          f"{args.max_tokens} output tokens)")


if __name__ == "__main__":
    main()
