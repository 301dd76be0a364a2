"""How a request's compute splits between the audio encoder and the LLM, per clip length.

    python -m experiments.benchmarks.cost_split                    # tiny and small: measured + FLOPs; 7B: FLOPs
    python -m experiments.benchmarks.cost_split models=[small] lengths_s=[1,4,8]

A projector that emits fewer audio tokens saves LLM work only; what that buys end to end
depends on the LLM's share of a request. On the 128-wide tiny model the LLM costs little,
so the testbed would understate the gain on Qwen2-Audio-7B. `model=small` is sized so its
share is close to 7B's; this benchmark shows both ways:

- FLOPs per request from the dims (arithmetic, no weights): the encoder over the clip's
  real frames (as the fork serves it) and over the 30 s window (as upstream vLLM does),
  the LLM over the prompt, the clip's audio tokens (25 per second) and the transcript
  (`text_tokens_per_s`, about 3 words a second), including the LM head at each generated
  token and attention;
- measured on this machine with the HF twin at the same dims and random weights: encoder
  forward over the real frames, and the LLM's prefill plus greedy decoding of the same
  number of tokens with its KV cache, in alternating rounds (encoder, LLM, encoder, ...),
  median and min-max of the LLM's share across rounds.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from experiments.benchmarks.offline import check_rounds
from experiments.benchmarks.training import PROMPT_TOKENS, llm_params
from qwen2_audio_vllm.tiny import TinySpec

FRAMES_PER_S = 100  # mel frames
POSITIONS_PER_S = 50  # encoder positions after the stride-2 convolution
TOKENS_PER_S = 25  # audio tokens after Qwen2-Audio's 2x pooling (linear projector, stack 1)


def encoder_flops(d: TinySpec, positions: int) -> float:
    """Forward FLOPs of the encoder over one item of `positions` positions (50 a second of
    real frames as the fork serves it; the window's 1500 as upstream vLLM does)."""
    conv = 2 * 3 * d.n_mels * d.encoder_dim * 2 * positions + 2 * 3 * d.encoder_dim**2 * positions
    layers = d.encoder_layers * (2 * (4 * d.encoder_dim**2 + 2 * d.encoder_dim * d.encoder_ffn) * positions
                                 + 4 * positions**2 * d.encoder_dim)
    return float(conv + layers)


def llm_flops(d: TinySpec, prefill: int, generated: int, cached: int = 0) -> float:
    """Forward FLOPs of the LLM computing `prefill` prompt tokens after `cached` ones whose KV
    it already holds, then `generated` tokens: the body at every computed token, the LM head
    at each generated one, attention as 4 L d (end^2 - cached^2) (QK and AV over the square)."""
    body = llm_params(d) - 2 * d.vocab_size * d.text_dim  # without the embedding table and the LM head
    end = cached + prefill + generated
    return float(2 * body * (prefill + generated) + 2 * d.vocab_size * d.text_dim * generated
                 + 4 * d.text_layers * (end**2 - cached**2) * d.text_dim)


def flops(d: TinySpec, clip_s: float, text_tokens_per_s: float, padded: bool, frames_per_token: int = 1) -> dict[str, float]:
    """FLOPs of one request (forward only): encoder over the clip (or the 30 s window when
    `padded`), LLM prefill (the prompt and ceil(25 clip_s / frames_per_token) audio tokens:
    a stack-k projector's count) + decode. Multiply-add = 2 FLOPs."""
    positions = d.chunk_length * POSITIONS_PER_S if padded else round(clip_s * POSITIONS_PER_S)
    generated = max(1, round(clip_s * text_tokens_per_s)) + 1  # + <|im_end|>
    prefill = PROMPT_TOKENS + math.ceil(round(clip_s * TOKENS_PER_S) / frames_per_token)
    return {"encoder": encoder_flops(d, positions), "llm": llm_flops(d, prefill, generated),
            "llm_prefill": llm_flops(d, prefill, 0)}


def flops_split(d: TinySpec, lengths_s: list[float], text_tokens_per_s: float) -> dict[str, dict]:
    """{"<s>s": {llm_share_trimmed, llm_share_padded, encoder_gflops_*, llm_gflops}} per length."""
    out = {}
    for s in lengths_s:
        trimmed, padded = flops(d, s, text_tokens_per_s, False), flops(d, s, text_tokens_per_s, True)
        out[f"{s:g}s"] = {
            "llm_share_trimmed": trimmed["llm"] / (trimmed["llm"] + trimmed["encoder"]),
            "llm_share_padded": padded["llm"] / (padded["llm"] + padded["encoder"]),
            "encoder_gflops_trimmed": trimmed["encoder"] / 1e9, "encoder_gflops_padded": padded["encoder"] / 1e9,
            "llm_gflops": trimmed["llm"] / 1e9,
        }
    return out


@torch.inference_mode()
def measured_split(d: TinySpec, lengths_s: list[float], text_tokens_per_s: float, rounds: int, seed: int = 0) -> dict:
    """The HF twin at dims `d`, random weights, float32 on the CPU: seconds in the encoder
    (real frames) and in the LLM (prefill + greedy decode with KV cache) per request,
    measured in alternating rounds; the LLM's share per round, its median and min-max."""
    from qwen2_audio_vllm.hf import Qwen2AudioSwap
    from qwen2_audio_vllm.tiny import make_config

    check_rounds(rounds)
    torch.manual_seed(seed)
    model = Qwen2AudioSwap(make_config(d)).eval()
    return {f"{s:g}s": _time_one_length(model, d, s, text_tokens_per_s, rounds) for s in lengths_s}


def _time_one_length(model, d: TinySpec, clip_s: float, text_tokens_per_s: float, rounds: int) -> dict[str, float]:
    frames = round(clip_s * FRAMES_PER_S)
    mels, mask = torch.randn(1, d.n_mels, frames), torch.ones(1, frames, dtype=torch.long)
    generated = max(1, round(clip_s * text_tokens_per_s)) + 1
    prompt = torch.randint(0, d.vocab_size, (1, PROMPT_TOKENS + round(clip_s * TOKENS_PER_S)))

    def encoder() -> None:
        model.audio_embeddings(mels, mask)

    def llm() -> None:
        past, ids = None, prompt
        for _ in range(generated):  # prefill, then one token at a time (no early stop: fixed work)
            o = model.language_model(input_ids=ids, past_key_values=past, use_cache=True)
            past, ids = o.past_key_values, o.logits[:, -1:].argmax(-1)

    encoder(), llm()  # warm-up
    shares, enc_s, llm_s = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        encoder()
        t1 = time.perf_counter()
        llm()
        t2 = time.perf_counter()
        enc_s.append(t1 - t0)
        llm_s.append(t2 - t1)
        shares.append((t2 - t1) / (t2 - t0))
    return {"llm_share": statistics.median(shares), "llm_share_min": min(shares), "llm_share_max": max(shares),
            "encoder_ms": 1e3 * statistics.median(enc_s), "llm_ms": 1e3 * statistics.median(llm_s)}


def model_dims(name: str) -> TinySpec:
    """TinySpec of conf/model/<name>.yaml's dims."""
    path = Path(__file__).resolve().parents[2] / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SystemExit(f"models: no conf/model/{name}.yaml; choose from {known}")
    dims = OmegaConf.to_container(OmegaConf.load(path).get("dims") or {}, resolve=True)
    if not dims:
        raise SystemExit(f"models: conf/model/{name}.yaml has no dims (a local checkpoint); give a model with dims")
    return TinySpec(**dims)


def format_split(results: dict) -> str:
    lines = ["| model | clip | LLM share, FLOPs (trimmed encoder) | LLM share, FLOPs (30 s window) | LLM share, measured (median [min, max]) |",
             "|---|---|---|---|---|"]
    for model, r in results.items():
        for length, f in r["flops"].items():
            m = r.get("measured", {}).get(length)
            measured = f"{m['llm_share']:.0%} [{m['llm_share_min']:.0%}, {m['llm_share_max']:.0%}]" if m else "-"
            lines.append(f"| {model} | {length} | {f['llm_share_trimmed']:.0%} | {f['llm_share_padded']:.0%} | {measured} |")
    return "\n".join(lines)


@hydra.main(config_path="../../conf/apps", config_name="cost_split", version_base=None)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.report import write_json_atomic

    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    results = {}
    for name in cfg.models:
        d = model_dims(name)
        results[name] = {"flops": flops_split(d, list(cfg.lengths_s), cfg.text_tokens_per_s)}
        if name in cfg.measure:
            results[name]["measured"] = measured_split(d, list(cfg.lengths_s), cfg.text_tokens_per_s, cfg.rounds)
    out = Path(HydraConfig.get().runtime.output_dir)
    write_json_atomic(out / "cost_split.json", results)
    print(format_split(results))
    print(f"-> {out / 'cost_split.json'}")


if __name__ == "__main__":
    main()
