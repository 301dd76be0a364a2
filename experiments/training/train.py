"""Training on CPU or GPU with the HF twin: base-model pretraining and projector alignment.

    pretrain(...)  all weights of a tiny Qwen2-Audio (encoder + linear projector + LLM) from
                   scratch on transcripts: builds the `model=tiny` base checkpoint.
    align(...)     only the projector (encoder and LLM frozen), on cached encoder outputs
                   (experiments.training.cache), LM loss on the transcript: the `align` stage.
                   Its AlignRecipe adds the compression recipes: the starting weights,
                   distillation from a teacher, LoRA adapters merged at export.

Both use the same prompt as serving (`engine.chat_prompt`), AdamW with linear warmup and
cosine decay, gradient clipping, a tqdm bar with the loss, periodic dev loss (token-weighted
mean), and export the best (lowest dev loss) weights as a vLLM checkpoint once, at the end
(the best weights are kept in memory until then; a killed run writes nothing).

Where and how they compute is the `trainer` config (TrainerSettings, experiments.training.devices):
device and precision (bf16: frozen weights in bfloat16, trainable ones float32 under
autocast), gradient checkpointing of the frozen LLM, batches by a padded-token budget, and
data-parallel processes under torchrun (each takes its share of every global batch).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from experiments.serving.engine import chat_prompt
from experiments.training import devices
from experiments.training.devices import Placement
from qwen2_audio_vllm.hf import IGNORE, Qwen2AudioSwap, expand_audio_placeholders
from qwen2_audio_vllm.hotwords import hotword_ids

LossFn = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]  # indices -> (summed loss, tokens)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1000
    batch_size: int = 32  # rows per global batch (a cap when max_tokens_per_batch is set)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    clip_norm: float = 1.0
    eval_every: int = 100
    seed: int = 0
    dev_wer_clips: int = 0  # align: the first N dev clips decoded greedily at every evaluation (dev WER); 0: off


@dataclass(frozen=True)
class TrainerSettings:
    """conf/trainer/: where and how the torch stages run."""

    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16
    gradient_checkpointing: bool = False  # recompute the frozen LLM's activations in backward
    max_tokens_per_batch: int | None = None  # padded tokens (rows x longest) per process and step
    encoder_batch_size: int = 16  # clips per encoder batch when building the cache
    cache_dtype: str = "float16"  # how cached encoder frames are stored

    def placement(self) -> Placement:
        return devices.placement(self.device, self.precision)

    @property
    def cache_store_dtype(self) -> torch.dtype:
        stored = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
        if self.cache_dtype not in stored:
            raise ValueError(f"trainer.cache_dtype={self.cache_dtype!r}; expected one of {sorted(stored)}")
        return stored[self.cache_dtype]


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
        self._prompts: dict[int, list[int]] = {}
        self.prompt_ids = self.prompt_for(1)
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tokenizer.pad_token_id

    def prompt_for(self, n_audios: int) -> list[int]:
        """The prompt's tokens with `n_audios` audio items (streaming.py's layout for n > 1)."""
        if n_audios not in self._prompts:
            text = chat_prompt(self.tokenizer, n_audios=n_audios)
            self._prompts[n_audios] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._prompts[n_audios]

    def lengths(self, texts: list[str], n_audio_tokens: list[int | list[int]],
                hotwords: list[list[str] | None] | None = None) -> list[int]:
        """Tokens per row (prompt with expanded audio + transcript + <|im_end|>). An entry of
        `n_audio_tokens` is a clip's token count, or one count per item (stream chunks)."""
        answers = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        items = [n if isinstance(n, list) else [int(n)] for n in n_audio_tokens]
        extra = [len(n) * len(self._hotword_ids(h)) for n, h in zip(items, hotwords or [None] * len(texts), strict=True)]
        # each placeholder becomes its item's tokens; + <|im_end|>
        return [len(self.prompt_for(len(n))) - len(n) + sum(n) + len(a) + 1 + e
                for a, n, e in zip(answers, items, extra, strict=True)]

    def _hotword_ids(self, words: list[str] | None) -> list[int]:
        return hotword_ids(self.tokenizer, words) if words else []

    def __call__(self, texts: list[str], n_audio_tokens: list[int | list[int]],
                 hotwords: list[list[str] | None] | None = None) -> dict[str, torch.Tensor]:
        """hotwords: a list per row (None or [] for none), placed as vLLM's processor places it."""
        rows, labels = [], []
        for text, n, words in zip(texts, n_audio_tokens, hotwords or [None] * len(texts), strict=True):
            n = n if isinstance(n, list) else [int(n)]
            prompt = expand_audio_placeholders(self.prompt_for(len(n)), n, self.audio_token_id, self._hotword_ids(words))
            answer = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.end_id]
            rows.append(prompt + answer)
            labels.append([IGNORE] * len(prompt) + answer)
        return self._padded(rows, labels)

    def text_teacher(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The rows of the text teacher: the same prompt and answer, the transcript's tokens
        in place of the audio (what the LLM would predict had it read the words)."""
        rows, labels = [], []
        at = self.prompt_ids.index(self.audio_token_id)
        for text in texts:
            words = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            prompt = self.prompt_ids[:at] + words + self.prompt_ids[at + 1 :]
            answer = words + [self.end_id]
            rows.append(prompt + answer)
            labels.append([IGNORE] * len(prompt) + answer)
        return self._padded(rows, labels)

    def _padded(self, rows: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(map(len, rows))
        pad = lambda r, v: r + [v] * (width - len(r))  # noqa: E731  right-padded for training
        return {
            "input_ids": torch.tensor([pad(r, self.pad_id) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows]),
            "labels": torch.tensor([pad(r, IGNORE) for r in labels]),
        }


def batches(lengths: list[int], batch_size: int, max_tokens: int | None, seed: int) -> Iterator[list[int]]:
    """Endless shuffled global batches of row indices, reshuffled every epoch, rows of
    similar length together: each epoch is cut into pools of 50 batches, each pool sorted by
    length and grouped, the groups shuffled (random batches of 1-6 s clips are ~40 %
    padding in the LLM).

    max_tokens None: `batch_size` rows each (a pool's rows that do not fill a batch go on to
    the next pool). Otherwise groups such that rows x longest row stays within `max_tokens`
    (and at most `batch_size` rows): long clips make small batches, short clips large ones.
    Under data parallelism the caller passes the global budget."""
    rng = random.Random(seed)
    n = len(lengths)
    if max_tokens is not None and (too_long := [x for x in lengths if x > max_tokens]):
        raise ValueError(
            f"{len(too_long)} training rows are longer ({max(too_long)} tokens) than "
            f"trainer.max_tokens_per_batch={max_tokens}; raise it or drop those rows"
        )
    pool_size = 50 * batch_size
    carry: list[int] = []
    while True:
        epoch = list(range(n))
        rng.shuffle(epoch)
        for start in range(0, n, pool_size):
            pool = carry + epoch[start : start + pool_size]
            if max_tokens is None:
                full = len(pool) - len(pool) % batch_size
                pool, carry = sorted(pool[:full], key=lengths.__getitem__), pool[full:]
                groups = [pool[i : i + batch_size] for i in range(0, full, batch_size)]
            else:
                groups, group = [], []
                for i in sorted(pool, key=lengths.__getitem__):  # ascending: the newest row is the longest
                    if group and (len(group) >= batch_size or (len(group) + 1) * lengths[i] > max_tokens):
                        groups.append(group)
                        group = []
                    group.append(i)
                groups.append(group)
            rng.shuffle(groups)
            yield from groups


def fit(
    model: Qwen2AudioSwap,
    trained: torch.nn.Module,
    loss_on: LossFn,
    dev_loss: Callable[[], float],
    batch_iter: Iterator[list[int]],
    s: TrainSettings,
    place: Placement,
    desc: str,
    dev_wer: Callable[[], float] | None = None,
) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """The shared loop: trains the parameters of `trained` (a submodule of `model`, or
    `model`) and returns (metrics, best state of `trained` by dev loss, on the CPU).
    `loss_on(indices)` gives (summed token loss, token count) of this process's rows.
    `dev_wer`: also recorded at every evaluation (it never picks the best weights)."""
    torch.manual_seed(s.seed)
    params = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    world = devices.world_size()
    best, best_state, history, tokens, t0 = float("inf"), None, [], 0, time.perf_counter()
    bar = tqdm(zip(range(s.steps), batch_iter, strict=False), total=s.steps, desc=desc, disable=not devices.is_main())
    for step, idx in bar:
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        with place.autocast():
            total, count = loss_on(devices.local_share(idx))
        n_global = devices.all_sum(count.detach().float())
        # DDP averages gradients over processes: scale so the result is d(sum / n_global)
        loss = total * world / n_global
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.clip_norm)
        opt.step()
        train_loss = float(devices.all_sum(total.detach().float()) / n_global)
        tokens += int(n_global)
        bar.set_postfix(loss=f"{train_loss:.3f}")
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            model.eval()
            with torch.no_grad(), place.autocast():
                dev = dev_loss()
                entry = {"step": step + 1, "train_loss": train_loss, "dev_loss": dev}
                if dev_wer is not None:
                    entry["dev_wer"] = dev_wer()
            history.append(entry)
            if devices.is_main():
                wer = f"  dev WER {100 * entry['dev_wer']:.1f} %" if "dev_wer" in entry else ""
                bar.write(f"[{desc}] step {step + 1}: train {train_loss:.3f}  dev {dev:.3f}{wer}")
            if dev < best:
                best = dev
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in trained.state_dict().items()}
    elapsed = time.perf_counter() - t0
    result = {
        "best_dev_loss": best, "history": history, "train_seconds": elapsed,
        "seconds_per_step": elapsed / s.steps, "target_tokens_per_s": tokens / elapsed,
        "processes": world, **place.describe(),
    }
    return result, best_state


def export_best(
    model: Qwen2AudioSwap, trained: torch.nn.Module, best_state: dict | None, processor, out_dir: Path,
    frozen_from: Path | None = None, lora: bool = False,
) -> None:
    """Load the best weights and write the checkpoint (process 0 only; atomic).
    frozen_from: take every weight but the projector's from this checkpoint's files, so
    frozen parts are written bit-identical however they were held in training (bf16).
    lora: the LLM carries LoRA adapters; their merged weights replace the base's tensors."""
    from experiments.training.lora import merged_weights
    from qwen2_audio_vllm.checkpoint import read_weights, save_checkpoint

    if best_state is not None:
        trained.load_state_dict(best_state)
    if not devices.is_main():
        return
    weights = None
    if frozen_from is not None:
        prefix = "multi_modal_projector."
        weights = read_weights(frozen_from, skip_prefix=prefix)
        weights |= {prefix + k: v for k, v in model.multi_modal_projector.state_dict().items()}
    if lora:
        if weights is None:
            raise ValueError("merging LoRA adapters needs the base checkpoint's tensors (frozen_from)")
        weights |= merged_weights(model.language_model, "language_model.", like=weights)
    save_checkpoint(model, processor, out_dir, weights=weights)
    if frozen_from is not None:
        copy_alignment_head(frozen_from, out_dir)


def copy_alignment_head(base_dir: Path, out_dir: Path) -> None:
    """The base's word-timestamp head (experiments/timestamps.py) reads the tower alone, which
    align never trains: the exported checkpoint carries it on."""
    import shutil

    from experiments.timestamps import HEAD_DIR

    if (base_dir / HEAD_DIR / "config.json").is_file():
        shutil.copytree(base_dir / HEAD_DIR, out_dir / HEAD_DIR, dirs_exist_ok=True)


def greedy_wer(model: Qwen2AudioSwap, batcher: TextBatcher, frames: list, texts: list[str], batch_size: int,
               device: torch.device) -> float:
    """Corpus WER (a fraction, normalised as evaluate's) of greedy decoding of cached
    encoder frames (a clip, or a stream's chunks, per entry) with serving's prompt, by the
    model as it is now: what the align loop records as dev WER against steps."""
    from experiments.metrics import wer_cer
    from experiments.training.cache import pad_frames
    from qwen2_audio_vllm.hf import greedy_tokens

    answers = batcher.tokenizer(texts, add_special_tokens=False)["input_ids"]
    max_new = max(map(len, answers)) + 8  # room to show a run-on, bounded
    hyps = []
    for i in range(0, len(texts), batch_size):
        items = [_items(f) for f in frames[i : i + batch_size]]
        x, lengths = pad_frames([f for row in items for f in row])
        audio = model.project(x.to(device, torch.float32), lengths)
        counts = _grouped([a.shape[0] for a in audio], [len(row) for row in items])
        rows = [expand_audio_placeholders(batcher.prompt_for(len(n)), n, model.audio_token_id) for n in counts]
        hyps += batcher.tokenizer.batch_decode(greedy_tokens(model, batcher.tokenizer, rows, audio, max_new),
                                               skip_special_tokens=True)
    return float(wer_cer(texts, hyps)["wer"])


def mean_loss(loss_on: LossFn, n: int, batch_size: int) -> float:
    """Token-weighted mean loss over rows 0..n-1, in batches."""
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        t, c = loss_on(list(range(i, min(n, i + batch_size))))
        total, count = total + float(t), count + int(c)
    return total / max(count, 1)


CTC_UNITS = ("tokens", "chars")
ALIGN_INITS = ("random", "base", "mean_pool", "window_mean")
KD_TEACHERS = ("none", "base", "text", "whole")


@dataclass(frozen=True)
class AlignRecipe:
    """How the align stage trains beyond its schedule (conf/train/align.yaml: init, kd, lora).

    init (ALIGN_INITS): the projector's starting weights (mean_pool: a linear stack-k as mean
      pooling + the base's projection; window_mean: a Q-Former with mean_shortcut as window
      means + the base's projection).
    kd_teacher (KD_TEACHERS): distillation beside the LM loss, on the transcript's tokens:
      base: the base checkpoint (its full-rate projector, the same frozen LLM) on the same
      audio; text: the frozen LLM reading the transcript as text in the audio's place
      (Ultravox, DiVA). Loss = LM + kd_weight * T^2 * KL(teacher_T || student_T), summed
      per token like the LM loss. whole: the base checkpoint on the whole clip as one item,
      teaching a chunked student (chunk_s) what the whole-utterance model predicts; needs the
      whole clips' frames (align's teacher_frames). kd_checkpoint: for base and whole, another
      checkpoint than the base as the teacher (e.g. the aligned full-rate baseline with its
      LoRA merged): its own projector and LLM, over the same tower (check_recipe refuses a
      teacher whose tower, dims or vocabulary differ from the student's).
    lora_rank > 0: LoRA adapters (lora_alpha, on the LLM's Linears named in lora_targets)
      train with the projector and are merged into the exported LLM weights.
    chunk_s: align for streaming (experiments/serving/streaming.py): every clip is cut into
      chunks of chunk_s seconds, each encoded on its own and placed at its own <|AUDIO|> of
      a multi-audio prompt, the layout a stream's prompt has. None: one item per clip.
    prealign_steps > 0: before the LM loss, that many steps of CTC pre-alignment
      (EmbeddingCtc): the projector's outputs learn to land near the frozen LLM's embeddings
      of the transcript's tokens, with no LLM pass (a fraction of an LM step's cost)."""

    init: str = "random"
    kd_teacher: str = "none"
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    kd_checkpoint: str | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    chunk_s: float | None = None
    hotwords_p: float = 0.0
    hotwords_max_distractors: int = 100
    prealign_steps: int = 0

    def __post_init__(self) -> None:
        if self.init not in ALIGN_INITS:
            raise ValueError(f"train.init={self.init!r}; expected one of {ALIGN_INITS} (or auto)")
        if self.kd_teacher not in KD_TEACHERS:
            raise ValueError(f"train.kd.teacher={self.kd_teacher!r}; expected one of {KD_TEACHERS}")
        if self.kd_temperature <= 0 or self.kd_weight < 0:
            raise ValueError(f"train.kd needs temperature > 0 and weight >= 0; got {self.kd_temperature}, {self.kd_weight}")
        if self.kd_checkpoint is not None and self.kd_teacher not in ("base", "whole"):
            raise ValueError(f"train.kd.checkpoint={self.kd_checkpoint!r} names an audio teacher; it needs "
                             f"train.kd.teacher=base or whole, got {self.kd_teacher!r}")
        if self.prealign_steps < 0:
            raise ValueError(f"train.prealign_steps={self.prealign_steps}; expected 0 (off) or more")
        if self.chunk_s is not None and self.chunk_s < 0.1:
            raise ValueError(f"train.chunk_s={self.chunk_s}: chunks must be at least 0.1 s (or null: whole clips)")

    @classmethod
    def from_config(cls, init: str, kd: dict | None = None, lora: dict | None = None,
                    chunk_s: float | None = None, hotwords: dict | None = None, prealign_steps: int = 0) -> AlignRecipe:
        kd, lora, hotwords = kd or {}, lora or {}, hotwords or {}
        return cls(
            init=init, kd_teacher=kd.get("teacher", "none"), kd_weight=kd.get("weight", 1.0),
            kd_temperature=kd.get("temperature", 1.0), kd_checkpoint=kd.get("checkpoint"), lora_rank=lora.get("rank", 0),
            lora_alpha=lora.get("alpha", 16.0), lora_targets=tuple(lora.get("targets", cls.lora_targets)),
            chunk_s=chunk_s, hotwords_p=hotwords.get("p", 0.0), hotwords_max_distractors=hotwords.get("max_distractors", 100),
            prealign_steps=prealign_steps,
        )

    def beyond_init(self) -> dict:
        """The settings other than init that differ from none (empty for a plain align run,
        so align keys of runs without KD or LoRA stay what they were)."""
        out = {}
        if self.kd_teacher != "none":
            out["kd"] = [self.kd_teacher, self.kd_weight, self.kd_temperature]
            if self.kd_checkpoint is not None:
                out["kd"].append(self.kd_checkpoint)
        if self.lora_rank:
            out["lora"] = [self.lora_rank, self.lora_alpha, list(self.lora_targets)]
        if self.chunk_s is not None:
            out["chunk_s"] = self.chunk_s
        if self.hotwords_p:
            out["hotwords"] = [self.hotwords_p, self.hotwords_max_distractors]
        if self.prealign_steps:
            out["prealign_steps"] = self.prealign_steps
        return out


def check_recipe(base_dir: Path, projector: dict, recipe: AlignRecipe) -> None:
    """Refuse, before any cache is built or step taken, an align run that cannot work as
    asked, naming both values: an init the projector cannot take, chunks (recipe.chunk_s)
    that do not end on a whole group of the projector's frames, a KD teacher checkpoint
    whose tower, dims or vocabulary differ from the student's."""
    from projectors import AttentionProjector, LinearProjector, build_projector
    from qwen2_audio_vllm.checkpoint import load_config
    from qwen2_audio_vllm.encoder import output_lengths as encoder_lengths

    config = load_config(base_dir)
    with torch.device("meta"):
        proj = build_projector(projector, config.audio_config.d_model, config.text_config.hidden_size)
    needs = {"mean_pool": (LinearProjector, "projector=linear projector.stack=K"),
             "window_mean": (AttentionProjector, "projector=attention_qformer projector.mean_shortcut=true")}
    if recipe.init in needs and not (isinstance(proj, needs[recipe.init][0])
                                     and (recipe.init != "window_mean" or proj.mean_shortcut)):
        raise ValueError(f"train.init={recipe.init} cannot start the projector {projector}; use "
                         f"{needs[recipe.init][1]}, or train.init=auto")
    if recipe.chunk_s is not None:
        samples = recipe.chunk_s * 16000
        frames = int(encoder_lengths(torch.tensor([int(samples) // 160]))[1])
        if samples != int(samples) or frames % proj.frames_per_group:
            raise ValueError(
                f"train.chunk_s={recipe.chunk_s} gives chunks of {frames} encoder frames, not a multiple of the "
                f"projector's {proj.frames_per_group} frames per token group, so every chunk would end on a partial "
                f"group; choose chunk_s as a multiple of {proj.frames_per_group / 25:g} s"
            )
    if recipe.kd_checkpoint is not None:
        _check_teacher(base_dir, Path(recipe.kd_checkpoint))
    if not 0 <= recipe.hotwords_p <= 1 or recipe.hotwords_max_distractors < 0:
        raise ValueError(f"train.hotwords needs 0 <= p <= 1 and max_distractors >= 0; got p={recipe.hotwords_p}, "
                         f"max_distractors={recipe.hotwords_max_distractors}")
    if recipe.hotwords_p and recipe.chunk_s is not None:
        raise ValueError(f"train.hotwords.p={recipe.hotwords_p} with train.chunk_s={recipe.chunk_s}: hotword lists are "
                         "taught on whole clips; align for streaming without them (train.hotwords.p=0)")


def _check_teacher(base_dir: Path, teacher_dir: Path) -> None:
    from qwen2_audio_vllm.checkpoint import load_config, load_processor, read_weights

    if not (teacher_dir / "config.json").is_file():
        raise ValueError(f"train.kd.checkpoint={teacher_dir} is not a checkpoint directory (no config.json)")
    student, teacher = load_config(base_dir), load_config(teacher_dir)
    pairs = {
        "vocabulary (text_config.vocab_size)": (student.text_config.vocab_size, teacher.text_config.vocab_size),
        "tokenizer size": (len(load_processor(base_dir).tokenizer), len(load_processor(teacher_dir).tokenizer)),
        "LLM width (text_config.hidden_size)": (student.text_config.hidden_size, teacher.text_config.hidden_size),
        "tower width (audio_config.d_model)": (student.audio_config.d_model, teacher.audio_config.d_model),
    }
    for what, (s, t) in pairs.items():
        if s != t:
            raise ValueError(f"train.kd.checkpoint={teacher_dir}: the teacher's {what} is {t}, the student's {s}; "
                             "distillation compares the two models' token distributions over the same frames, "
                             "so the teacher must share the student's tokenizer, LLM width and audio tower")
    prefix = "audio_tower."
    ours, theirs = read_weights(base_dir, only_prefix=prefix), read_weights(teacher_dir, only_prefix=prefix)
    if ours.keys() != theirs.keys() or any(not torch.equal(ours[k], theirs[k]) for k in ours):
        raise ValueError(f"train.kd.checkpoint={teacher_dir}: its audio tower's weights differ from the base's "
                         f"({base_dir}); the teacher reads the base tower's cached frames, so it must share that tower")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed KL(teacher_T || student_T) * T^2 over rows of logits (N, vocab): the
    distillation term, scaled so its gradient does not shrink with T (Hinton et al.)."""
    log_s = torch.log_softmax(student.float() / temperature, -1)
    log_t = torch.log_softmax(teacher.float() / temperature, -1)
    return (log_t.exp() * (log_t - log_s)).sum() * temperature**2


def ctc_targets(texts: list[str], units: str, tokenizer) -> tuple[list[list[int]], int]:
    """(target ids per text, number of units) for the CTC head. tokens: the tokenizer's ids
    (every BPE piece a class). chars: the characters of the transcripts (the sorted set of
    those in `texts`), so a word unseen in training is still a sequence of known classes."""
    if units == "tokens":
        return tokenizer(texts, add_special_tokens=False)["input_ids"], len(tokenizer)
    if units == "chars":
        alphabet = {c: i for i, c in enumerate(sorted(set("".join(texts))))}
        return [[alphabet[c] for c in t] for t in texts], len(alphabet)
    raise ValueError(f"model.pretrain.ctc_units={units!r}; expected one of {CTC_UNITS}")


class CtcHead(torch.nn.Module):
    """Pooled encoder frames -> unit log-probabilities (+ a blank), for the auxiliary CTC
    loss of pretraining (units: tokenizer pieces or characters, `ctc_targets`). Not part of
    the exported checkpoint."""

    def __init__(self, d_audio: int, n_tokens: int) -> None:
        super().__init__()
        self.blank = n_tokens
        self.proj = torch.nn.Linear(d_audio, n_tokens + 1)

    def loss(self, frames: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
        """Summed CTC loss of a batch (zero_infinity: a clip too short for its transcript adds 0)."""
        log_probs = self.proj(frames.float()).log_softmax(-1).transpose(0, 1)  # (T, B, C)
        flat = torch.tensor([t for ts in targets for t in ts], device=frames.device)
        return torch.nn.functional.ctc_loss(
            log_probs, flat, lengths.to(frames.device), torch.tensor([len(t) for t in targets], device=frames.device),
            blank=self.blank, reduction="sum", zero_infinity=True,
        )


class EmbeddingCtc(torch.nn.Module):
    """CTC pre-alignment of a projector into a frozen LLM's embedding space: each projected
    audio token is scored by its dot product with the LLM's (frozen) input embeddings of
    the tokens the transcripts use, plus a trained blank vector, and CTC aligns the scores
    to the transcript's tokens. No LLM pass: a step costs the projector alone. Not exported."""

    def __init__(self, embeddings: torch.Tensor, used: list[int]) -> None:
        super().__init__()
        self.register_buffer("table", embeddings[used].detach().float().clone())
        self.blank_vector = torch.nn.Parameter(torch.zeros(embeddings.shape[1], device=embeddings.device))
        self.index = {t: i for i, t in enumerate(used)}

    def loss(self, audio: list[torch.Tensor], targets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed CTC loss, target tokens) of one batch: `audio` one (n_i, d_text) tensor per
        clip. zero_infinity: a clip with fewer tokens than its transcript needs adds 0."""
        from torch.nn.utils.rnn import pad_sequence

        x = pad_sequence(audio, batch_first=True).float()
        logits = torch.cat([x @ self.table.T, (x @ self.blank_vector)[..., None]], -1)
        ids = [[self.index[t] for t in ts] for ts in targets]
        loss = torch.nn.functional.ctc_loss(
            logits.log_softmax(-1).transpose(0, 1), torch.tensor([i for row in ids for i in row], device=x.device),
            torch.tensor([a.shape[0] for a in audio], device=x.device), torch.tensor([len(r) for r in ids], device=x.device),
            blank=len(self.index), reduction="sum", zero_infinity=True,
        )
        return loss, torch.tensor(sum(map(len, ids)), device=x.device)


def prealign(
    model: Qwen2AudioSwap, run: torch.nn.Module, train: tuple[list, list[str]], dev: tuple[list, list[str]],
    tokenizer, s: TrainSettings, place: Placement,
) -> dict:
    """`s.steps` steps of EmbeddingCtc on the projector (recipe.prealign_steps); the projector
    keeps the weights of the best dev CTC loss. Returns the loop's metrics."""
    from experiments.training.cache import pad_frames

    targets = {name: tokenizer(texts, add_special_tokens=False)["input_ids"] for name, (_, texts) in
               (("train", train), ("dev", dev))}
    used = sorted({t for rows in targets.values() for row in rows for t in row})
    ctc = EmbeddingCtc(model.language_model.get_input_embeddings().weight, used)
    trained = torch.nn.ModuleDict({"projector": model.multi_modal_projector, "ctc": ctc})

    def loss_for(name: str, frames: list, train_mode: bool) -> LossFn:
        def loss_on(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            x, lengths = pad_frames([frames[i] for i in idx])
            audio = model.project(x.to(place.device, torch.float32), lengths, run=run if train_mode else None)
            return ctc.loss(audio, [targets[name][i] for i in idx])

        return loss_on

    lengths = [f.shape[0] for f in train[0]]
    result, best = fit(model, trained, loss_for("train", train[0], True),
                       lambda: mean_loss(loss_for("dev", dev[0], False), len(dev[1]), s.batch_size),
                       batches(lengths, s.batch_size, None, s.seed), s, place, "prealign ctc")
    if best is not None:
        trained.load_state_dict(best)
    return result | {"tokens": len(used)}


def pretrain(
    base_dir: Path,
    train_rows: list[dict],
    dev_rows: list[dict],
    out_dir: Path,
    s: TrainSettings,
    trainer: TrainerSettings = TrainerSettings(),
    ctc_weight: float = 0.0,
    ctc_units: str = "tokens",
    freeze_encoder: bool = False,
) -> dict:
    """Train the (random) checkpoint at `base_dir` on the transcripts and export the best
    weights to `out_dir`. Batches hold clips of similar length (`batches`' pools). Trained
    weights stay float32 (bf16 runs them under autocast). The dev loss that picks the best
    weights is the LM loss alone.

    freeze_encoder=True (a pretrained tower, e.g. Whisper's): the tower's pooled frames are
    computed once into the encoder-output cache (the one align reads, `cache_dir_for`) and
    only the projector and the LLM train; the exported tower is the input's, bit for bit.

    freeze_encoder=False (a tower trained from scratch): every weight trains on trimmed mel
    features, so a step costs the clip lengths, not the 30 s window. ctc_weight > 0 then
    adds a CTC loss on the encoder's pooled frames (a linear head over `ctc_units`: the
    tokenizer's vocabulary or the transcripts' characters; dropped at export), weighted
    against the LM loss per token. From scratch, the LLM otherwise learns the sentences'
    language model long before the encoder learns to hear, and on open-vocabulary text it
    stops listening (hybrid CTC/attention training keeps the encoder on the transcript)."""
    from experiments.data.audio import load_audio
    from experiments.training.cache import cache_dir_for, load_or_build, pad_frames
    from qwen2_audio_vllm.checkpoint import load_model, load_processor
    from qwen2_audio_vllm.encoder import mel_features, pad_mels
    from qwen2_audio_vllm.encoder import output_lengths as encoder_lengths

    if freeze_encoder and ctc_weight > 0:
        raise ValueError(f"model.pretrain.ctc_weight={ctc_weight} trains the encoder through a CTC head, but "
                         "model.pretrain.freeze_encoder is true; set ctc_weight: 0 or freeze_encoder: false")
    place = trainer.placement()
    model, processor = load_model(base_dir, device=place.device), load_processor(base_dir)
    texts = {"train": [r["text"] for r in train_rows], "dev": [r["text"] for r in dev_rows]}
    batcher = TextBatcher(processor.tokenizer, model.audio_token_id)
    if freeze_encoder:
        model.audio_tower.requires_grad_(False).eval()
        frames = {name: load_or_build(model, processor, rows, cache_dir_for(model, rows), trainer.encoder_batch_size,
                                      trainer.cache_store_dtype)[0]
                  for name, rows in (("train", train_rows), ("dev", dev_rows))}
        pooled = [f.shape[0] for f in frames["train"]]

        def audio_of(split: str, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            x, lengths = pad_frames([frames[split][i] for i in idx])
            return x.to(place.device, torch.float32), lengths.to(place.device)
    else:
        fe = processor.feature_extractor
        mels = {
            name: [mel_features(fe, load_audio(r["audio_filepath"])) for r in tqdm(rows, desc=f"mel {name}")]
            for name, rows in (("train", train_rows), ("dev", dev_rows))
        }
        pooled = encoder_lengths(torch.tensor([n for _, n in mels["train"]]))[1].tolist()

        def audio_of(split: str, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            feats, mask = pad_mels([mels[split][i] for i in idx])
            return model.encode_audio(feats.to(place.device), mask.to(place.device))
    ctc, trained = None, model
    if ctc_weight > 0:
        targets, n_units = ctc_targets(texts["train"], ctc_units, processor.tokenizer)
        ctc = CtcHead(model.config.audio_config.d_model, n_units).to(place.device)
        trained = torch.nn.ModuleDict({"model": model, "ctc": ctc})

    def loss_for(split: str, with_ctc: bool) -> LossFn:
        def loss_on(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            x, lengths = audio_of(split, idx)
            audio = model.project(x, lengths)
            batch = batcher([texts[split][i] for i in idx], [a.shape[0] for a in audio])
            total, count = model.token_loss(audio_embeds=audio, **{k: v.to(place.device) for k, v in batch.items()})
            if with_ctc:
                total = total + ctc_weight * ctc.loss(x, lengths, [targets[i] for i in idx])
            return total, count

        return loss_on

    lengths = batcher.lengths(texts["train"], pooled)
    result, best = fit(
        model, trained, loss_for("train", ctc is not None),
        lambda: mean_loss(loss_for("dev", False), len(dev_rows), s.batch_size),
        batches(lengths, s.batch_size, _budget(trainer), s.seed), s, place, "pretrain",
    )
    export_best(model, trained, best, processor, out_dir)  # a frozen tower stays float32: its tensors are the input's
    result |= {"ctc_weight": ctc_weight, "ctc_units": ctc_units, "freeze_encoder": freeze_encoder}
    return result


def align(
    base_dir: Path,
    projector: dict,
    train: tuple[list[torch.Tensor], list[str]],
    dev: tuple[list[torch.Tensor], list[str]],
    out_dir: Path,
    s: TrainSettings,
    recipe: AlignRecipe = AlignRecipe(),
    trainer: TrainerSettings = TrainerSettings(),
    teacher_frames: list[torch.Tensor] | None = None,
) -> dict:
    """Train only `projector` (and LoRA adapters where the recipe asks) on cached pooled
    encoder frames ([(T_i, d_audio)], texts), the encoder and the LLM of `base_dir` frozen
    (in the trainer's precision); export the best weights to `out_dir`. recipe.init: random
    (a fresh projector), base (the base checkpoint's own projector weights: same block),
    mean_pool (a stack-k linear projector that starts as mean pooling of k frames followed
    by the base's stack-1 linear projection, LinearProjector.init_as_mean_pool); the rest of
    the recipe is AlignRecipe's. The dev loss that picks the best weights is the LM loss
    alone. `teacher_frames`: each training clip's frames encoded whole, for the whole
    teacher (recipe.kd_teacher="whole"). Under torchrun every process runs this on its share of each global batch;
    process 0 writes the checkpoint."""
    from experiments.training.cache import pad_frames
    from experiments.training.lora import adapters_off, add_lora
    from qwen2_audio_vllm.checkpoint import load_model, load_processor

    check_recipe(base_dir, projector, recipe)
    if s.dev_wer_clips < 0:
        raise ValueError(f"train.dev_wer_clips={s.dev_wer_clips}: expected 0 (no dev WER) or how many dev clips "
                         "to decode at every evaluation, e.g. 100")
    place = trainer.placement()
    torch.manual_seed(s.seed)
    if recipe.kd_teacher == "whole" and (teacher_frames is None or len(teacher_frames) != len(train[0])):
        raise ValueError("train.kd.teacher=whole needs every training clip's frames encoded whole (align's teacher_frames, "
                         f"{len(train[0])} of them); got {None if teacher_frames is None else len(teacher_frames)}")
    if recipe.lora_rank and devices.world_size() > 1:
        raise ValueError("train.lora.rank > 0 runs in one process (its adapters are not data-parallel yet); "
                         "run without torchrun or set train.lora.rank=0")
    model = load_model(base_dir, projector=projector, load_projector=recipe.init == "base", device=place.device, dtype=place.dtype)
    processor = load_processor(base_dir)
    if recipe.init in ("mean_pool", "window_mean"):
        _init_from_base(model.multi_modal_projector, base_dir, recipe.init)
    model.requires_grad_(False)
    proj = model.multi_modal_projector.float().requires_grad_(True)  # float32 master weights
    adapters, trained = None, proj
    if recipe.lora_rank:
        adapters = add_lora(model.language_model, recipe.lora_rank, recipe.lora_alpha, recipe.lora_targets)
        trained = torch.nn.ModuleDict({"projector": proj, "lora": adapters})
    if trainer.gradient_checkpointing:
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    run = devices.data_parallel(proj, place)
    batcher = TextBatcher(processor.tokenizer, model.audio_token_id)
    teacher_projector = _base_projector(base_dir, place.device) if recipe.kd_teacher in ("base", "whole") else None
    teacher_model = None  # the teacher's own projector and LLM, when it is another checkpoint than the base
    if recipe.kd_checkpoint is not None:
        teacher_model = load_model(recipe.kd_checkpoint, device=place.device, dtype=place.dtype).requires_grad_(False).eval()
        teacher_projector = teacher_model.multi_modal_projector.float()

    def teacher_logits(x: torch.Tensor, lengths: torch.Tensor, texts: list[str], per_row: list[int],
                       idx: list[int]) -> torch.Tensor:
        with torch.no_grad(), adapters_off(adapters):
            if recipe.kd_teacher == "text":
                return model.labelled_logits(audio_embeds=[], **_on(batcher.text_teacher(texts), place.device))[0]
            if recipe.kd_teacher == "whole":  # one item per clip, whatever the student's layout
                x, lengths = pad_frames([teacher_frames[i] for i in idx])
                x, per_row = x.to(place.device, torch.float32), [1] * len(idx)
            audio = model.project(x, lengths, projector=teacher_projector)
            batch = batcher(texts, _grouped([a.shape[0] for a in audio], per_row))
            return (teacher_model or model).labelled_logits(audio_embeds=audio, **_on(batch, place.device))[0]

    def loss_for(frames: list, texts: list[str], train_mode: bool) -> LossFn:
        def loss_on(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            items = [_items(frames[i]) for i in idx]  # a clip, or a stream's chunks
            x, lengths = pad_frames([f for row in items for f in row])
            x = x.to(place.device, torch.float32)
            audio = model.project(x, lengths, run=run if train_mode else None)  # per item, in prompt order
            rows, per_row = [texts[i] for i in idx], [len(row) for row in items]
            lists = [train_lists[i] for i in idx] if train_mode and train_lists else None
            batch = _on(batcher(rows, _grouped([a.shape[0] for a in audio], per_row), lists), place.device)
            logits, target = model.labelled_logits(audio_embeds=audio, **batch)
            total = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
            if train_mode and recipe.kd_teacher != "none" and recipe.kd_weight > 0:
                teacher = teacher_logits(x, lengths, rows, per_row, idx)
                total = total + recipe.kd_weight * kd_loss(logits, teacher, recipe.kd_temperature)
            return total, torch.tensor(target.numel(), device=target.device)

        return loss_on

    prealigned = None
    if recipe.prealign_steps:
        if recipe.chunk_s is not None:
            raise ValueError("train.prealign_steps aligns whole clips; set it to 0 with train.chunk_s")
        prealigned = prealign(model, run, train, dev, processor.tokenizer,
                              dataclasses.replace(s, steps=recipe.prealign_steps, warmup=min(s.warmup, recipe.prealign_steps)),
                              place)
    train_lists = hotword_lists(train[1], recipe, s.seed) if recipe.hotwords_p else None
    n_tokens = [proj.output_lengths(torch.tensor([f.shape[0] for f in _items(r)])).tolist() for r in train[0]]
    lengths = batcher.lengths(train[1], n_tokens, train_lists)
    n_wer = min(s.dev_wer_clips, len(dev[1]))
    result, best = fit(
        model, trained, loss_for(*train, train_mode=True),
        lambda: mean_loss(loss_for(*dev, train_mode=False), len(dev[1]), s.batch_size),
        batches(lengths, s.batch_size, _budget(trainer), s.seed), s, place, f"align {projector['name']}",
        dev_wer=(lambda: greedy_wer(model, batcher, dev[0][:n_wer], dev[1][:n_wer], s.batch_size, place.device))
        if n_wer else None,
    )
    export_best(model, trained, best, processor, out_dir, frozen_from=base_dir, lora=adapters is not None)
    result["trainable_params"] = sum(p.numel() for p in trained.parameters())
    if prealigned is not None:
        result["prealign"] = prealigned
    result["recipe"] = recipe.__dict__ | {"lora_targets": list(recipe.lora_targets)}
    return result


def hotword_lists(texts: list[str], recipe: AlignRecipe, seed: int) -> list[list[str] | None]:
    """A hotword list for a `recipe.hotwords_p` share of the training rows (None for the
    rest): the row's names and rare words plus 0..max_distractors distractors, drawn from
    the training transcripts' own names and rare words (experiments/data/bias.py). A row
    without biasing words gets distractors only, so the model learns to leave a list alone
    when the audio does not say its words."""
    import random

    from experiments.data.bias import bias_list, bias_words, distractor_pool, word_counts

    counts = word_counts(texts)
    pool = distractor_pool(counts)
    rng = random.Random(f"hotwords-{seed}")
    out: list[list[str] | None] = []
    for text in texts:
        if rng.random() >= recipe.hotwords_p:
            out.append(None)
            continue
        words = bias_list(bias_words(text, counts), rng.randint(0, recipe.hotwords_max_distractors), pool, rng)
        out.append(words or None)
    return out


def _items(entry: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """A cached row's audio items: [frames] for a clip, its chunks' frames for a stream."""
    return list(entry) if isinstance(entry, (list, tuple)) else [entry]


def _grouped(counts: list[int], per_row: list[int]) -> list[list[int]]:
    ends = np.cumsum([0, *per_row]).tolist()
    return [counts[a:b] for a, b in zip(ends[:-1], ends[1:], strict=True)]


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _base_projector(base_dir: Path, device: torch.device) -> torch.nn.Module:
    """The base checkpoint's own projector, frozen, float32: the full-rate KD teacher's."""
    from projectors import build_projector
    from qwen2_audio_vllm.checkpoint import load_config, read_weights

    config = load_config(base_dir)
    proj = build_projector(config.projector, config.audio_config.d_model, config.text_config.hidden_size)
    prefix = "multi_modal_projector."
    proj.load_state_dict({k[len(prefix):]: v for k, v in read_weights(base_dir, only_prefix=prefix).items()})
    return proj.float().to(device).requires_grad_(False).eval()


def _init_from_base(proj: torch.nn.Module, base_dir: Path, init: str) -> None:
    """`proj` from the base checkpoint's stack-1 linear projector: a stack-k linear as mean
    pooling (init mean_pool), a Q-Former with its mean shortcut as window means (window_mean)."""
    from projectors import AttentionProjector, LinearProjector
    from qwen2_audio_vllm.checkpoint import load_config, read_weights

    base_block = load_config(base_dir).projector
    kind = {"mean_pool": LinearProjector, "window_mean": AttentionProjector}[init]
    if not isinstance(proj, kind) or base_block.get("name") != "linear" or base_block.get("stack", 1) != 1:
        raise ValueError(
            f"train.init={init} starts a {kind.__name__} from a base whose projector is linear at stack 1; here the "
            f"projector is {type(proj).__name__} and the base's {base_block}. Use projector=linear projector.stack=K "
            "(mean_pool) or projector=attention_qformer projector.mean_shortcut=true (window_mean), or train.init=auto"
        )
    prefix = "multi_modal_projector.linear."
    w = read_weights(base_dir, only_prefix=prefix)
    start = proj.init_as_mean_pool if init == "mean_pool" else proj.init_as_window_mean
    start(w[prefix + "weight"], w[prefix + "bias"])


def _budget(trainer: TrainerSettings) -> int | None:
    """The global batch's token budget: the per-process budget times the processes."""
    if trainer.max_tokens_per_batch is None:
        return None
    return trainer.max_tokens_per_batch * devices.world_size()
