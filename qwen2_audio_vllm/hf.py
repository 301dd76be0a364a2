"""The transformers twin of the forked vLLM model: same weights, same projector, same
token-count rule. Used to train projectors and as the numerical reference in parity tests.

It is built from transformers' own parts (`Qwen2AudioEncoder`, `Qwen2ForCausalLM`) with
the module names of the hub checkpoint, so `state_dict()` keys are exactly the keys vLLM
loads (`audio_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.weight`) and no renaming is needed on export.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import Qwen2AudioConfig, Qwen2ForCausalLM
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

from projectors import Projector, build_projector


def encoder_lengths(mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mel frames (100/s) -> (frames after the stride-2 conv, 50/s; after the avg-pool, 25/s)."""
    conv = (mel_lengths - 1) // 2 + 1
    return conv, (conv - 2) // 2 + 1


class Qwen2AudioSwap(nn.Module):
    def __init__(self, config: Qwen2AudioConfig) -> None:
        super().__init__()
        self.config = config
        self.audio_tower = Qwen2AudioEncoder(config.audio_config)
        self.multi_modal_projector: Projector = build_projector(
            config.projector, config.audio_config.d_model, config.text_config.hidden_size
        )
        self.language_model = Qwen2ForCausalLM(config.text_config)

    @property
    def audio_token_id(self) -> int:
        return self.config.audio_token_id

    def encode_audio(
        self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen-encoder part: mel (B, n_mels, L) + mask (B, L) -> pooled frames
        (B, L/4, d_audio) and their valid lengths (B,). Same masking as the vLLM fork."""
        conv_len, pooled_len = encoder_lengths(feature_attention_mask.sum(-1))
        B, _, L = input_features.shape
        T = (L - 2) // 2 + 1
        padding = torch.arange(T, device=conv_len.device)[None, :] >= conv_len[:, None]  # (B, T)
        mask = padding[:, None, None, :].expand(B, 1, T, T)
        attn = torch.zeros(mask.shape, dtype=self.audio_tower.conv1.weight.dtype, device=mask.device)
        attn[mask] = float("-inf")
        frames = self.audio_tower(input_features, attention_mask=attn).last_hidden_state
        return frames, pooled_len

    def project(self, frames: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Pooled frames (B, T, d_audio) + lengths (B,) -> one (n_i, d_text) tensor per clip,
        n_i = projector.output_lengths(lengths)[i]."""
        mask = torch.arange(frames.shape[1], device=frames.device)[None, :] < lengths[:, None]
        out = self.multi_modal_projector(frames, mask)
        n_tokens = self.multi_modal_projector.output_lengths(lengths)
        return [out[i, : int(n)] for i, n in enumerate(n_tokens)]

    def embed(self, input_ids: torch.Tensor, audio_embeds: list[torch.Tensor]) -> torch.Tensor:
        """Text embeddings with the rows of <|AUDIO|> placeholders replaced, in order, by the
        audio embeddings. The placeholder count must equal the total audio rows."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        is_audio = input_ids == self.audio_token_id
        audio = torch.cat(audio_embeds).to(embeds.dtype) if audio_embeds else embeds[:0, 0]
        if int(is_audio.sum()) != audio.shape[0]:
            raise ValueError(
                f"prompt has {int(is_audio.sum())} <|AUDIO|> placeholders but the audio gives "
                f"{audio.shape[0]} embeddings; expand placeholders with projector.output_lengths"
            )
        return embeds.masked_scatter(is_audio[..., None], audio)

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
    ):
        embeds = self.embed(input_ids, audio_embeds)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate_greedy(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        audio_embeds: list[torch.Tensor],
        max_new_tokens: int,
        eos_token_id: list[int] | int | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding; returns only the new tokens (B, <= max_new_tokens).
        Prompts must be left-padded."""
        embeds = self.embed(input_ids, audio_embeds)
        return self.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
