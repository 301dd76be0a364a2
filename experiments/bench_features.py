"""Benchmark: serving requests from raw audio vs from cached pooled encoder frames
(`{"audio_frames": [...]}`, the model then runs only the projector), same engine, same
clips, alternating rounds in one run.

    .venv/bin/python -m experiments.bench_features [checkpoint] --requests 64 --rounds 2
"""

from __future__ import annotations

import argparse

from experiments.bench import add_request_args, interleaved_seconds, request_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_request_args(parser, max_tokens=16)
    args = parser.parse_args()

    from vllm import SamplingParams

    from experiments.cache import encoder_frames
    from experiments.engine import audio_request, chat_prompt, close_llm, make_llm
    from qwen2_audio_vllm.checkpoint import load_model, load_processor

    ckpt, audios = request_set(args)
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
        seconds = interleaved_seconds(
            {name: lambda _round, reqs=reqs: llm.generate(reqs, params, use_tqdm=False) for name, reqs in requests.items()},
            args.rounds,
        )
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
