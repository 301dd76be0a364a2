"""What an align step costs at a model's dims: measured, and estimated on paper.

    python -m experiments.run stages=[train_bench]                               # tiny, this machine
    python -m experiments.run model=qwen2-audio-7b-random stages=[train_bench]   # 7B dims, a GPU
    python -m experiments.run model=qwen2-audio-7b-random stages=[train_bench] train_bench.estimate_only=true

`measure` builds the twin at the configured dims with random weights directly on the
device (frozen encoder and LLM in the trainer's precision, or in each of
`train_bench.precisions` side by side; each projector float32), feeds
random pooled frames of `clip_s` seconds (align trains on cached frames: no encoder in the
step) and a transcript of `text_tokens`, and times forward + backward + AdamW step for every
projector in alternating rounds (A B C A B C ...): median and min-max seconds per step,
trained (transcript) tokens/s and LLM tokens/s, peak memory (CUDA max allocated, or this
process's peak RSS on CPU), and each projector's step time relative to the first.

`estimate` is arithmetic on the dims, no weights: parameter and optimizer bytes,
activation bytes saved for backward (with and without gradient checkpointing), FLOPs per
step, a step time at an assumed fraction of the card's peak, and the encoder FLOPs per clip
with and without the 30 s padding (what the cache pays once). Labelled as an estimate.
"""

from __future__ import annotations

import resource
import statistics
from functools import partial

import torch

from experiments.benchmarks.offline import interleaved_rounds
from experiments.training.devices import Placement
from qwen2_audio_vllm.checkpoint import default_dtype
from qwen2_audio_vllm.hf import IGNORE, Qwen2AudioSwap
from qwen2_audio_vllm.tiny import TinySpec, make_config

PROMPT_TOKENS = 24  # the chat prompt around the audio placeholder, about what chat_prompt gives


def dims_of(config) -> TinySpec:
    """The dims of a checkpoint's Qwen2AudioConfig (e.g. the adopted 7B directory)."""
    a, t = config.audio_config, config.text_config
    return TinySpec(n_mels=a.num_mel_bins, chunk_length=a.max_source_positions // 50, encoder_dim=a.d_model,
                    encoder_layers=a.encoder_layers, encoder_heads=a.encoder_attention_heads, encoder_ffn=a.encoder_ffn_dim,
                    text_dim=t.hidden_size, text_layers=t.num_hidden_layers, text_heads=t.num_attention_heads,
                    text_ffn=t.intermediate_size, vocab_size=t.vocab_size, encoder_weights=None)


def llm_params(d: TinySpec) -> int:
    layer = 4 * d.text_dim * d.text_dim + 3 * d.text_dim * d.text_ffn + 2 * d.text_dim
    return d.text_layers * layer + 2 * d.vocab_size * d.text_dim  # + embeddings and LM head


def encoder_params(d: TinySpec) -> int:
    layer = 4 * d.encoder_dim * d.encoder_dim + 2 * d.encoder_dim * d.encoder_ffn
    convs = 3 * d.n_mels * d.encoder_dim + 3 * d.encoder_dim * d.encoder_dim
    positions = d.chunk_length * 50 * d.encoder_dim
    return d.encoder_layers * layer + convs + positions


def estimate(d: TinySpec, projector_params: int, batch: int, clip_s: float, text_tokens: int,
             audio_tokens_per_s: float = 25.0, peak_tflops: float = 989.0, mfu: float = 0.4) -> dict:
    """Memory and time of one align step at dims `d` in bf16 (frozen weights 2 bytes each;
    the projector float32 with its gradient and two AdamW moments, 16 bytes per parameter)."""
    tokens = batch * (PROMPT_TOKENS + round(clip_s * audio_tokens_per_s) + text_tokens + 1)
    seq = tokens / batch
    n_llm, n_enc = llm_params(d), encoder_params(d)
    # saved for the input gradient per token and layer (bf16): norm inputs/outputs, q k v,
    # attention output, gate/up/activation/product of the MLP: about 8 d + 4 ffn values
    per_token_layer = 2 * (8 * d.text_dim + 4 * d.text_ffn)
    activations = tokens * d.text_layers * per_token_layer
    checkpointed = tokens * d.text_layers * 2 * d.text_dim + tokens * per_token_layer  # layer inputs + one layer
    logits = batch * (text_tokens + 1) * d.vocab_size * 4  # float32, labelled positions only
    # frozen weights: forward 2 N T, backward only to the inputs (no weight gradients) 2 N T;
    # attention scores 4 L T^2 d per sequence each way
    flops = 4 * n_llm * tokens + 8 * d.text_layers * batch * seq * seq * d.text_dim
    flops_ckpt = flops + 2 * n_llm * tokens
    enc_flops = lambda s: 2 * n_enc * s * 50 + 4 * d.encoder_layers * (s * 50) ** 2 * d.encoder_dim  # noqa: E731
    return {
        "kind": "estimate (arithmetic on the dims, not a measurement)",
        "batch": batch, "clip_s": clip_s, "text_tokens": text_tokens, "llm_tokens_per_step": tokens,
        "llm_params": n_llm, "encoder_params": n_enc, "projector_params": projector_params,
        "weights_bytes": 2 * (n_llm + n_enc) + 16 * projector_params,
        "activation_bytes": activations + logits,
        "activation_bytes_checkpointed": checkpointed + logits,
        "flops_per_step": flops, "flops_per_step_checkpointed": flops_ckpt,
        "step_s_at_mfu": flops / (peak_tflops * 1e12 * mfu), "assumed_peak_tflops": peak_tflops, "assumed_mfu": mfu,
        "encoder_flops_per_clip_trimmed": enc_flops(clip_s), "encoder_flops_per_clip_30s": enc_flops(30.0),
        "cache_bytes_per_audio_hour": 3600 * audio_tokens_per_s * d.encoder_dim * 2,  # float16 frames
    }


def measure(d: TinySpec, projectors: list[dict], places: list[Placement], batch: int, clip_s: float,
            text_tokens: int, steps: int, rounds: int, gradient_checkpointing: bool = False) -> dict:
    """Seconds per align step for each projector block, and for each precision of `places`
    (one twin each, the same random weights), in alternating rounds; with several
    precisions a case is labelled `<projector>@<precision>`."""
    from projectors import build_projector, projector_block

    config = make_config(d)
    config.projector = {"name": "linear"}
    models = {}
    for place in places:
        torch.manual_seed(0)
        with torch.device(place.device), default_dtype(place.dtype):
            models[place] = Qwen2AudioSwap(config)  # random weights, never on disk
        models[place].requires_grad_(False).train()
        if gradient_checkpointing:
            models[place].language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    place = places[0]
    n_frames = round(clip_s * 25)
    frames = torch.randn(batch, n_frames, d.encoder_dim, device=place.device)
    lengths = torch.full((batch,), n_frames)
    audio_id = config.audio_token_id
    words = min(config.text_config.bos_token_id, audio_id)  # ordinary tokens lie below the specials
    cases = {}
    for block in projectors:
        with torch.device(place.device):
            proj = build_projector(block, d.encoder_dim, d.text_dim).float()
        n_audio = int(proj.output_lengths(torch.tensor([n_frames])))
        text = torch.randint(0, words, (batch, text_tokens + 1), device=place.device)
        prompt = torch.randint(0, words, (batch, PROMPT_TOKENS), device=place.device)
        ids = torch.cat([prompt[:, :PROMPT_TOKENS // 2], torch.full((batch, n_audio), audio_id, device=place.device),
                         prompt[:, PROMPT_TOKENS // 2:], text], 1)
        labels = torch.full_like(ids, IGNORE)
        labels[:, -text.shape[1]:] = text
        label = "-".join(f"{k}{v}" if k != "name" else str(v) for k, v in block.items())
        for where in places:
            with torch.device(where.device):
                copy = build_projector(block, d.encoder_dim, d.text_dim).float()
            copy.load_state_dict(proj.state_dict())
            cases[label if len(places) == 1 else f"{label}@{where.precision}"] = {
                "proj": copy, "opt": torch.optim.AdamW(copy.parameters(), lr=1e-4), "ids": ids, "labels": labels,
                "block": projector_block(copy), "params": sum(p.numel() for p in copy.parameters()), "place": where}

    def step(case: dict) -> None:
        model = models[case["place"]]
        model.multi_modal_projector = case["proj"]
        with case["place"].autocast():
            audio = model.project(frames, lengths)
            total, count = model.token_loss(case["ids"], torch.ones_like(case["ids"]), audio, case["labels"])
        (total / count).backward()
        case["opt"].step()
        case["opt"].zero_grad(set_to_none=True)

    def sync() -> None:
        if place.device.type == "cuda":
            torch.cuda.synchronize(place.device)

    peak: dict[str, int] = dict.fromkeys(cases, 0)

    def timed(label: str, _round: int) -> None:
        if place.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(place.device)
        for _ in range(steps):
            step(cases[label])
        sync()
        if place.device.type == "cuda":
            peak[label] = max(peak[label], torch.cuda.max_memory_allocated(place.device))

    for case in cases.values():  # warm-up: allocator, kernels, AdamW state
        step(case)
    sync()
    seconds = {k: [t / steps for t in v] for k, v in interleaved_rounds({k: partial(timed, k) for k in cases}, rounds).items()}
    first = next(iter(cases))
    llm_tokens = {k: c["ids"].numel() for k, c in cases.items()}
    out = {}
    for label, case in cases.items():
        s = seconds[label]
        ratios = [a / b for a, b in zip(s, seconds[first], strict=True)]
        out[label] = {
            "projector": case["block"], "projector_params": case["params"],
            "step_s_median": statistics.median(s), "step_s_min": min(s), "step_s_max": max(s),
            "trained_tokens_per_s": batch * (text_tokens + 1) / statistics.median(s),
            "llm_tokens_per_step": llm_tokens[label], "llm_tokens_per_s": llm_tokens[label] / statistics.median(s),
            f"step_time_vs_{first}_median": statistics.median(ratios),
            f"step_time_vs_{first}_min": min(ratios), f"step_time_vs_{first}_max": max(ratios),
            "peak_cuda_bytes": peak[label] if place.device.type == "cuda" else None,
        }
    return {
        "per_projector": out, "batch": batch, "clip_s": clip_s, "text_tokens": text_tokens,
        "steps_per_round": steps, "rounds": rounds, "gradient_checkpointing": gradient_checkpointing,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "model_params": sum(p.numel() for p in models[place].parameters())
        - sum(p.numel() for p in models[place].multi_modal_projector.parameters()),
        **place.describe(), "precision": "/".join(p.precision for p in places),
    }


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    if m := result.get("measured"):
        t = Table(title=f"align step, measured on {m['device_name']} ({m['precision']}), batch {m['batch']} x {m['clip_s']} s")
        for col in ("projector", "params", "s/step median [min, max]", "trained tok/s", "LLM tok/s", "vs first", "peak CUDA GiB"):
            t.add_column(col)
        for label, r in m["per_projector"].items():
            vs = [v for k, v in r.items() if k.startswith("step_time_vs_")]
            peak = f"{r['peak_cuda_bytes'] / 2**30:.1f}" if r["peak_cuda_bytes"] else "-"
            t.add_row(label, f"{r['projector_params']:,}", f"{r['step_s_median']:.3f} [{r['step_s_min']:.3f}, {r['step_s_max']:.3f}]",
                      f"{r['trained_tokens_per_s']:.0f}", f"{r['llm_tokens_per_s']:.0f}", f"{vs[0]:.2f} [{vs[1]:.2f}, {vs[2]:.2f}]", peak)
        console.print(t)
        console.print(f"peak RSS of this process: {m['peak_rss_bytes'] / 2**30:.2f} GiB")
    e = result["estimate"]
    t = Table(title=f"align step, {e['kind']}: batch {e['batch']} x {e['clip_s']} s, bf16")
    t.add_column("quantity")
    t.add_column("value")
    gib = lambda b: f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    t.add_row("parameters: LLM / encoder / projector", f"{e['llm_params']:,} / {e['encoder_params']:,} / {e['projector_params']:,}")
    t.add_row("weights + projector grads/AdamW", gib(e["weights_bytes"]))
    t.add_row("activations (no checkpointing / checkpointed)", f"{gib(e['activation_bytes'])} / {gib(e['activation_bytes_checkpointed'])}")
    t.add_row("LLM tokens per step", f"{e['llm_tokens_per_step']:,}")
    t.add_row("TFLOPs per step (no ckpt / ckpt)", f"{e['flops_per_step'] / 1e12:.3g} / {e['flops_per_step_checkpointed'] / 1e12:.3g}")
    t.add_row(f"step time at {e['assumed_mfu']:.0%} of {e['assumed_peak_tflops']:.0f} TFLOP/s", f"{e['step_s_at_mfu']:.3g} s")
    t.add_row("encoder TFLOPs per clip: trimmed / 30 s window",
              f"{e['encoder_flops_per_clip_trimmed'] / 1e12:.3g} / {e['encoder_flops_per_clip_30s'] / 1e12:.3g}")
    t.add_row("encoder cache per hour of audio (float16)", gib(e["cache_bytes_per_audio_hour"]))
    console.print(t)
