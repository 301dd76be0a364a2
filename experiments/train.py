"""Training on CPU or GPU with the HF twin: base-model pretraining and projector alignment.

    pretrain(...)  all weights of a tiny Qwen2-Audio (encoder + linear projector + LLM) from
                   scratch on transcripts: builds the `model=tiny` base checkpoint.
    align(...)     only the projector (encoder and LLM frozen), on cached encoder outputs
                   (experiments.cache), LM loss on the transcript: the `align` stage.

Both use the same prompt as serving (`engine.chat_prompt`), AdamW with linear warmup and
cosine decay, gradient clipping, a tqdm bar with the loss, periodic dev loss, and export
the best (lowest dev loss) weights as a vLLM checkpoint.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from experiments.engine import chat_prompt
from qwen2_audio_vllm.hf import Qwen2AudioSwap, expand_audio_placeholders

IGNORE = -100


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    clip_norm: float = 1.0
    eval_every: int = 100
    seed: int = 0


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup to s.lr, then cosine decay to 10 % of it."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class TextBatcher:
    """Prompt + transcript token rows for a batch, labels only on the transcript + <|im_end|>."""

    def __init__(self, tokenizer, audio_token_id: int) -> None:
        self.tokenizer = tokenizer
        self.audio_token_id = audio_token_id
        self.prompt_ids = tokenizer(chat_prompt(tokenizer), add_special_tokens=False)["input_ids"]
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, texts: list[str], n_audio_tokens: list[int]) -> dict[str, torch.Tensor]:
        rows, labels = [], []
        for text, n in zip(texts, n_audio_tokens, strict=True):
            prompt = expand_audio_placeholders(self.prompt_ids, [n], self.audio_token_id)
            answer = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.end_id]
            rows.append(prompt + answer)
            labels.append([IGNORE] * len(prompt) + answer)
        width = max(map(len, rows))
        pad = lambda r, v: r + [v] * (width - len(r))  # noqa: E731  right-padded for training
        return {
            "input_ids": torch.tensor([pad(r, self.pad_id) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows]),
            "labels": torch.tensor([pad(r, IGNORE) for r in labels]),
        }


def batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless shuffled index batches (reshuffled every epoch)."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            extra = list(range(n))
            rng.shuffle(extra)
            order += extra
        yield order[:batch_size]
        order = order[batch_size:]


def fit(
    model: Qwen2AudioSwap,
    params: list[torch.nn.Parameter],
    loss_on: Callable[[list[int]], torch.Tensor],
    dev_loss: Callable[[], float],
    n_train: int,
    s: TrainSettings,
    on_best: Callable[[int, float], None],
    desc: str,
) -> dict:
    """The shared loop. `loss_on(indices)` is the training loss of one batch; `dev_loss()`
    the mean dev loss; `on_best(step, loss)` is called when the dev loss improves."""
    torch.manual_seed(s.seed)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    best, history, t0 = float("inf"), [], time.perf_counter()
    bar = tqdm(zip(range(s.steps), batches(n_train, s.batch_size, s.seed), strict=False), total=s.steps, desc=desc)
    for step, idx in bar:
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        loss = loss_on(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.clip_norm)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            model.eval()
            with torch.no_grad():
                dev = dev_loss()
            history.append({"step": step + 1, "train_loss": loss.item(), "dev_loss": dev})
            bar.write(f"[{desc}] step {step + 1}: train {loss.item():.3f}  dev {dev:.3f}")
            if dev < best:
                best = dev
                on_best(step + 1, dev)
    elapsed = time.perf_counter() - t0
    return {"best_dev_loss": best, "history": history, "train_seconds": elapsed, "seconds_per_step": elapsed / s.steps}


def save_best(model: Qwen2AudioSwap, processor, out_dir: Path) -> Callable[[int, float], None]:
    from qwen2_audio_vllm.checkpoint import save_checkpoint

    def on_best(step: int, loss: float) -> None:
        save_checkpoint(model, processor, out_dir)

    return on_best


def _mean_loss(loss_on: Callable[[list[int]], torch.Tensor], n: int, batch_size: int) -> float:
    losses = [loss_on(list(range(i, min(n, i + batch_size)))).item() for i in range(0, n, batch_size)]
    return sum(losses) / len(losses)


def pretrain(
    base_dir: Path, train_rows: list[dict], dev_rows: list[dict], out_dir: Path, s: TrainSettings
) -> dict:
    """Train every weight of the (random) checkpoint at `base_dir` on the transcripts and
    export the best one to `out_dir`. Encoder inputs are trimmed mel features, so a step
    costs the clip lengths, not the 30 s window."""
    from experiments.audio import load_audio
    from experiments.cache import mel_features, pad_mels
    from qwen2_audio_vllm.checkpoint import load_model, load_processor

    model, processor = load_model(base_dir), load_processor(base_dir)
    fe = processor.feature_extractor
    mels = {
        name: [mel_features(fe, load_audio(r["audio_filepath"])) for r in tqdm(rows, desc=f"mel {name}")]
        for name, rows in (("train", train_rows), ("dev", dev_rows))
    }
    texts = {"train": [r["text"] for r in train_rows], "dev": [r["text"] for r in dev_rows]}
    batcher = TextBatcher(processor.tokenizer, model.audio_token_id)

    def loss_for(split: str) -> Callable[[list[int]], torch.Tensor]:
        def loss_on(idx: list[int]) -> torch.Tensor:
            feats, mask = pad_mels([mels[split][i] for i in idx])
            audio = model.audio_embeddings(feats, mask)
            batch = batcher([texts[split][i] for i in idx], [a.shape[0] for a in audio])
            return model(audio_embeds=audio, **batch).loss

        return loss_on

    result = fit(
        model, list(model.parameters()), loss_for("train"),
        lambda: _mean_loss(loss_for("dev"), len(dev_rows), s.batch_size),
        len(train_rows), s, save_best(model, processor, out_dir), "pretrain",
    )
    return result


def align(
    base_dir: Path,
    projector: dict,
    train: tuple[list[torch.Tensor], list[str]],
    dev: tuple[list[torch.Tensor], list[str]],
    out_dir: Path,
    s: TrainSettings,
    init_from_base: bool = False,
) -> dict:
    """Train only `projector` on cached pooled encoder frames ([(T_i, d_audio)], texts), the
    encoder and the LLM of `base_dir` frozen; export the best weights to `out_dir`.
    init_from_base: start from the base checkpoint's own projector weights (same block)."""
    from experiments.cache import pad_frames
    from qwen2_audio_vllm.checkpoint import load_model, load_processor

    torch.manual_seed(s.seed)
    model = load_model(base_dir, projector=projector, load_projector=init_from_base)
    processor = load_processor(base_dir)
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    params = list(model.multi_modal_projector.parameters())
    batcher = TextBatcher(processor.tokenizer, model.audio_token_id)

    def loss_for(frames: list[torch.Tensor], texts: list[str]) -> Callable[[list[int]], torch.Tensor]:
        def loss_on(idx: list[int]) -> torch.Tensor:
            x, lengths = pad_frames([frames[i] for i in idx])
            audio = model.project(x, lengths)
            batch = batcher([texts[i] for i in idx], [a.shape[0] for a in audio])
            return model(audio_embeds=audio, **batch).loss

        return loss_on

    result = fit(
        model, params, loss_for(*train),
        lambda: _mean_loss(loss_for(*dev), len(dev[1]), s.batch_size),
        len(train[1]), s, save_best(model, processor, out_dir), f"align {projector['name']}",
    )
    result["trainable_params"] = sum(p.numel() for p in params)
    return result
