"""The transformers twin of the forked vLLM model: same weights, same projector, same
token-count rule. Used to train projectors and as the numerical reference in parity tests.

It is built from transformers' own parts (`Qwen2AudioEncoder`, `Qwen2ForCausalLM`) with
the module names of the hub checkpoint, so `state_dict()` keys are exactly the keys vLLM
loads (`audio_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.weight`) and no renaming is needed on export.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Qwen2AudioConfig, Qwen2ForCausalLM
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

from projectors import Projector, build_projector
from projectors.base import project_sequences
from qwen2_audio_vllm import encoder, windows
from qwen2_audio_vllm.modalities import build_modality_projectors, modality_specs

# Generation stops at either token: the checkpoint's generation_config.json lists both
# (vLLM reads it), and the HF reference must stop where vLLM stops.
STOP_TOKENS = ["<|im_end|>", "<|endoftext|>"]
IGNORE = -100  # label of positions that carry no loss (prompt, audio, padding)


def expand_audio_placeholders(
    input_ids: list[int], n_tokens: list[int], audio_token_id: int, prefix: list[int] | None = None
) -> list[int]:
    """Replace the i-th single <|AUDIO|> of a prompt with n_tokens[i] copies, as vLLM's
    processor does; `prefix` (hotword tokens, qwen2_audio_vllm/hotwords.py) goes before each."""
    out, i = [], 0
    for t in input_ids:
        if t == audio_token_id:
            out += (prefix or []) + [audio_token_id] * int(n_tokens[i])
            i += 1
        else:
            out.append(t)
    if i != len(n_tokens):
        raise ValueError(f"prompt has {i} <|AUDIO|> placeholders for {len(n_tokens)} audio clips")
    return out


class Qwen2AudioSwap(nn.Module):
    def __init__(self, config: Qwen2AudioConfig) -> None:
        super().__init__()
        self.config = config
        self.audio_tower = Qwen2AudioEncoder(config.audio_config)
        self.multi_modal_projector: Projector = build_projector(
            config.projector, config.audio_config.d_model, config.text_config.hidden_size
        )
        self.language_model = Qwen2ForCausalLM(config.text_config)
        if modality_specs(config):  # extra modalities (modalities.py); absent otherwise
            self.modality_projectors = build_modality_projectors(config)

    @property
    def audio_token_id(self) -> int:
        return self.config.audio_token_id

    def encode_audio(
        self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor, trim: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen-encoder part: mel (B, n_mels, L) + mask (B, L) -> pooled frames
        (B, T, d_audio), T <= L/4, and their valid lengths (B,). The same computation as the
        vLLM fork (qwen2_audio_vllm.encoder): trim=True encodes each clip over its real
        frames (length buckets), trim=False over the whole window, equal to float rounding."""
        return encoder.encode(self.audio_tower, input_features, feature_attention_mask, trim=trim)

    def project(
        self,
        frames: torch.Tensor,
        lengths: torch.Tensor,
        run: nn.Module | None = None,
        projector: Projector | None = None,
    ) -> list[torch.Tensor]:
        """Pooled frames (B, T, d_audio) + lengths (B,) -> one (n_i, d_text) tensor per clip,
        n_i = projector.output_lengths(lengths)[i]. `run`: a wrapper of the projector to call
        instead (DistributedDataParallel in data-parallel training). `projector`: another
        projector than this model's (a distillation teacher's)."""
        projector = projector or self.multi_modal_projector
        mask = torch.arange(frames.shape[1], device=frames.device)[None, :] < lengths[:, None].to(frames.device)
        out = (run or projector)(frames, mask)
        n_tokens = projector.output_lengths(lengths)
        return [out[i, : int(n)] for i, n in enumerate(n_tokens)]

    def project_modality(self, name: str, items: list[torch.Tensor]) -> list[torch.Tensor]:
        """An extra modality's inputs, (n_i, in_dim) each -> (n_i', d_text) each."""
        return project_sequences(self.modality_projectors[name], items)

    def embed(
        self,
        input_ids: torch.Tensor,
        audio_embeds: list[torch.Tensor],
        modality_embeds: dict[str, list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Text embeddings with the rows of <|AUDIO|> placeholders replaced, in order, by the
        audio embeddings, and each extra modality's placeholder rows by its (projected)
        embeddings. Each placeholder count must equal the rows given for it."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        specs = modality_specs(self.config)
        given = dict(modality_embeds or {})
        if unknown := sorted(set(given) - set(specs)):
            raise ValueError(f"unknown modalities {unknown}; this checkpoint declares {sorted(specs)}")
        slots = [("<|AUDIO|>", self.audio_token_id, audio_embeds)]
        slots += [(m.token, m.token_id, given.get(name, [])) for name, m in specs.items()]
        for token, token_id, rows in slots:
            is_slot = input_ids == token_id
            values = torch.cat(rows).to(embeds.dtype) if rows else embeds[:0, 0]
            if int(is_slot.sum()) != values.shape[0]:
                raise ValueError(
                    f"prompt has {int(is_slot.sum())} {token} placeholders but {values.shape[0]} "
                    "embeddings were given; expand placeholders with projector.output_lengths"
                )
            embeds = embeds.masked_scatter(is_slot[..., None], values)
        return embeds

    def audio_embeddings(
        self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor
    ) -> list[torch.Tensor]:
        return self.project(*self.encode_audio(input_features, feature_attention_mask))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        audio_embeds: list[torch.Tensor],
        labels: torch.Tensor | None = None,
        modality_embeds: dict[str, list[torch.Tensor]] | None = None,
    ):
        embeds = self.embed(input_ids, audio_embeds, modality_embeds)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    def token_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        audio_embeds: list[torch.Tensor],
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed next-token cross-entropy over the labelled positions, their count).
        Sum and count (not the mean) let data-parallel training weight every token of a
        global batch alike."""
        logits, target = self.labelled_logits(input_ids, attention_mask, audio_embeds, labels)
        return F.cross_entropy(logits, target, reduction="sum"), torch.tensor(target.numel(), device=target.device)

    def labelled_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        audio_embeds: list[torch.Tensor],
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 logits (N, vocab) predicting each labelled token, those tokens (N,)), in
        row-major order. The LM head runs on those positions only: over every prompt and
        audio position a 7B vocabulary (156k) would dominate activation memory."""
        embeds = self.embed(input_ids, audio_embeds)
        hidden = self.language_model.model(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (B, L, d_text)
        target = labels[:, 1:]
        keep = target != IGNORE
        return self.language_model.lm_head(hidden[:, :-1][keep]).float(), target[keep]

    @torch.no_grad()
    def generate_greedy(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        audio_embeds: list[torch.Tensor],
        max_new_tokens: int,
        eos_token_id: list[int] | int | None = None,
        pad_token_id: int | None = None,
        modality_embeds: dict[str, list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Greedy decoding; returns only the new tokens (B, <= max_new_tokens).
        Prompts must be left-padded."""
        embeds = self.embed(input_ids, audio_embeds, modality_embeds)
        return self.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )


def clip_embeddings(model: Qwen2AudioSwap, processor, audios: list) -> list[torch.Tensor]:
    """One (n_i, d_text) tensor per clip (16 kHz float arrays). A clip longer than the
    encoder window is split into windows (config.json "long_audio", see windows.py), each
    encoded and projected, and the windows' tokens concatenated: what the vLLM fork does."""
    w = windows.windowing(model.config, processor.feature_extractor)
    split = [windows.split(a, w) for a in audios]
    flat = [x for clip in split for x in clip]
    fe = processor.feature_extractor
    feats = fe(flat, sampling_rate=fe.sampling_rate, return_attention_mask=True,
               padding="max_length", return_tensors="pt")
    frames, pooled = model.encode_audio(feats["input_features"], feats["attention_mask"])
    num_windows = [len(clip) for clip in split]
    frames, kept = windows.drop_overlap(frames, pooled, windows.first_kept(num_windows, w))
    return windows.join(model.project(frames, kept), num_windows)


@torch.no_grad()
def greedy_transcribe(
    model: Qwen2AudioSwap, processor, audios: list, prompt: str | Callable[[int], str], max_new_tokens: int = 32,
    hotwords: list[str] | None = None,
) -> tuple[list[list[int]], list[int]]:
    """HF reference decoding of one prompt per entry of `audios`: a 16 kHz float array (one
    audio item), or a list of them (several items, e.g. a stream's chunks, each encoded on
    its own and placed at its own <|AUDIO|>, as vLLM does with several audios per prompt).
    `prompt`: the prompt text, or a function of the entry's item count giving it.
    hotwords: a hotword list for every entry, placed as vLLM's processor places it.
    Returns (new token ids per entry, audio placeholder count per entry)."""
    from qwen2_audio_vllm.hotwords import hotword_ids

    prefix = hotword_ids(processor.tokenizer, hotwords) if hotwords is not None else None
    items = [list(a) if isinstance(a, (list, tuple)) else [a] for a in audios]
    flat = clip_embeddings(model, processor, [x for entry in items for x in entry])
    per_item = [e.shape[0] for e in flat]
    ends = np.cumsum([0, *map(len, items)])
    rows = []
    for a, b in zip(ends[:-1], ends[1:], strict=True):
        text = prompt(int(b - a)) if callable(prompt) else prompt
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append(expand_audio_placeholders(ids, per_item[a:b], model.audio_token_id, prefix))
    tokens = greedy_tokens(model, processor.tokenizer, rows, flat, max_new_tokens)
    return tokens, [sum(per_item[a:b]) for a, b in zip(ends[:-1], ends[1:], strict=True)]


@torch.no_grad()
def greedy_tokens(
    model: Qwen2AudioSwap, tokenizer, rows: list[list[int]], audio_embeds: list[torch.Tensor], max_new_tokens: int,
) -> list[list[int]]:
    """Greedy decoding of prompt rows whose audio placeholders are already expanded
    (`audio_embeds`: one tensor per placeholder run, in prompt order), left-padded on the
    model's device; each row's new tokens up to and with the first stop token, as vLLM
    returns them."""
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    device = model.language_model.get_input_embeddings().weight.device  # a text-only row set too
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # left-padded
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    eos = tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    out = model.generate_greedy(input_ids, attention_mask, audio_embeds, max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    tokens = []
    for row in out.tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        tokens.append(row if stop is None else row[: stop + 1])  # vLLM keeps the stop token
    return tokens
