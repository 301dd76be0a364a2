"""Qwen2-Audio's audio tower built from vLLM's own layers, so `--quantization` and tensor
parallelism reach it.

Upstream builds the tower from transformers' `Qwen2AudioEncoder` (plain `nn.Linear`): the
engine's quantization stops at the language model and the tower is never sharded. The
network is Whisper's encoder with an average pool before the final layer norm, and vLLM
already has that encoder's layer: `whisper.WhisperEncoderLayer` (`QKVParallelLinear`,
`RowParallelLinear`/`ColumnParallelLinear`, `MMEncoderAttention` with variable-length
segments, `quant_config` passed down). `AudioTower` stacks those layers between the conv
stem, the positions and the pool, and loads the checkpoint's names (`self_attn.q_proj`,
`fc1`, ...) through vLLM's own Whisper weight mapper.

Real frames (what `encoder.encode` does with transformers' module, through the same
`encoder` pieces: lengths, kept width, conv stem, pool and norm): every clip is cut to its
real frames plus the few the convolutions reach and the clips are packed into one sequence; the attention's variable-length segments (`cu_seqlens`) keep each clip to
itself. With `trim=False` each clip runs over the whole window, its padded tail a segment
of its own, so real frames never attend to padding, as upstream's mask does.

Precision, one config.json key (or `--hf-overrides`), `"audio_tower_quantization"`:
- `"inherit"` (default): the tower takes the engine's `--quantization`; refused when that
  method cannot run on the tower on this platform (`supported_methods`).
- `"none"`: full precision whatever the language model runs at.
- `"int8"`: W8A8 int8 in the fork, for an unquantized checkpoint: weights per output
  channel (symmetric, quantized once after loading), activations per token (dynamic,
  asymmetric: a zero point per token, since GELU and layer-norm outputs are not centred), on
  vLLM's own int8 GEMM kernels (oneDNN on CPU, CUTLASS on CUDA), whatever the language
  model runs at. vLLM itself has no linear int8 method for unquantized checkpoints.
The engine logs the tower's precision at start (`describe`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from transformers.modeling_outputs import BaseModelOutput
from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.models.utils import AutoWeightsLoader
from vllm.model_executor.models.whisper import (
    WhisperEncoderLayer,
    WhisperForConditionalGeneration,
    _create_fake_bias_for_k_proj,
)
from vllm.model_executor.utils import replace_parameter
from vllm.platforms import current_platform

from qwen2_audio_vllm.encoder import conv_stem, kept_width, output_lengths, pool_and_norm

logger = logging.getLogger("vllm." + __name__)  # vLLM's handler, so it reaches the engine log

PRECISION_KEY = "audio_tower_quantization"
PRECISIONS = ("inherit", "none", "int8")
# the engine's methods that run on the tower's unquantized weights, per platform: online
# fp8 on a GPU with fp8 GEMMs; nothing on CPU, where "int8" is the 8-bit path
_INHERITABLE = {"cuda": ("fp8", "fp8_per_tensor", "fp8_per_channel", "fp8_per_block")}
# weight-name suffixes of quantized checkpoints, and the scheme each belongs to
_QUANTIZED_SUFFIXES = {
    "qweight": "GPTQ/AWQ packed integers", "qzeros": "GPTQ/AWQ packed integers", "g_idx": "GPTQ",
    "scales": "GPTQ/AWQ packed integers", "weight_packed": "compressed-tensors packed",
    "weight_scale": "scaled 8-bit (weight_scale)", "weight_scale_inv": "block fp8 (weight_scale_inv)",
    "weight_zero_point": "compressed-tensors asymmetric", "SCB": "bitsandbytes int8",
    "absmax": "bitsandbytes 4-bit", "quant_map": "bitsandbytes 4-bit", "input_scale": "static activation scales",
}


def precision(config: Any) -> str:
    """config.json's "audio_tower_quantization", checked."""
    value = getattr(config, PRECISION_KEY, "inherit") or "inherit"
    if value not in PRECISIONS:
        raise ValueError(f'config.json "{PRECISION_KEY}" is {value!r}; expected one of {", ".join(PRECISIONS)}')
    return value


def supported_methods(platform: str | None = None) -> tuple[str, ...]:
    """What `--quantization` may be while the tower inherits it, on this platform."""
    platform = platform or ("cuda" if current_platform.is_cuda() else current_platform.device_type)
    return _INHERITABLE.get(platform, ())


def tower_quant_config(config: Any, engine_quant: QuantizationConfig | None,
                       requested: str | None = None) -> QuantizationConfig | None:
    """The quantization the tower's linears run at (None: full precision). `requested` is
    the engine's --quantization as given (vLLM resolves "fp8" to its "online" config)."""
    choice = precision(config)
    if choice == "none":
        return None
    if choice == "int8":
        return Int8DynamicConfig()
    if engine_quant is None:
        return None
    method = requested or engine_quant.get_name()
    if method not in supported_methods():
        inherited = ", ".join(supported_methods()) or "none"
        raise ValueError(
            f"--quantization {method} cannot run on the audio tower on {current_platform.device_type}: "
            f"the tower takes from --quantization only {inherited} here, and otherwise the fork's "
            f'"{PRECISION_KEY}": "int8" (W8A8). Set "{PRECISION_KEY}": "none" in config.json (or '
            "--hf-overrides) to keep the tower at full precision while the language model is quantized."
        )
    return engine_quant


def describe(quant: QuantizationConfig | None, dtype: torch.dtype, requested: str | None = None) -> str:
    """The tower's precision as the engine logs it."""
    if quant is None:
        return f"full precision ({str(dtype).removeprefix('torch.')})"
    if isinstance(quant, Int8DynamicConfig):
        return "int8 W8A8 (weights per channel, activations per token, dynamic)"
    return f"{requested or quant.get_name()} (the engine's --quantization)"


class Int8DynamicConfig(QuantizationConfig):
    """The tower's "int8": only its linear layers, from an unquantized checkpoint."""

    def get_name(self) -> str:
        return "int8_w8a8_dynamic"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Int8DynamicConfig:
        return cls()

    def get_quant_method(self, layer: nn.Module, prefix: str):
        return Int8DynamicLinearMethod() if isinstance(layer, LinearBase) else None


class Int8DynamicLinearMethod(UnquantizedLinearMethod):
    """Loads the float weight as usual, then quantizes it per output channel and hands it to
    vLLM's int8 scaled-matmul kernel (the one compressed-tensors' W8A8 schemes use)."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                               params_dtype, **extra_weight_attrs)
        layer.logical_widths = output_partition_sizes

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        from vllm.model_executor.kernels.linear import init_int8_linear_kernel

        weight = layer.weight.data.float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # (N, 1)
        replace_parameter(layer, "weight", torch.round(weight / scale).clamp(-127, 127).to(torch.int8))
        layer.register_parameter("weight_scale", nn.Parameter(scale, requires_grad=False))
        for name in ("input_scale", "input_zero_point", "azp_adj"):
            layer.register_parameter(name, None)
        self.kernel = init_int8_linear_kernel(is_channelwise=True, is_static_input_scheme=False,
                                              input_symmetric=False, module_name="audio tower")
        self.kernel.process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernel.apply_weights(layer, x, bias)


def _layer_config(vllm_config, audio_config, quant_config):
    """vLLM's config as the Whisper layer reads it: the audio config as the model's, the
    tower's quantization (a shallow copy: nothing of the engine's config changes)."""
    model_config = copy.copy(vllm_config.model_config)
    model_config.hf_config = audio_config
    layer_config = copy.copy(vllm_config)
    layer_config.model_config = model_config
    layer_config.quant_config = quant_config
    return layer_config


class AudioTower(nn.Module):
    """The tower the fork builds as `audio_tower`; called as upstream calls transformers'
    encoder: `tower(input_features, attention_mask=(B, 1, T, T) -inf mask)`."""

    def __init__(self, vllm_config, config, trim: bool = True, prefix: str = "audio_tower") -> None:
        super().__init__()
        audio_config = config.audio_config
        self.trim = trim
        self.quant_config = tower_quant_config(config, vllm_config.quant_config, vllm_config.model_config.quantization)
        d = audio_config.d_model
        self.conv1 = nn.Conv1d(audio_config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(audio_config.max_source_positions, d)
        layer_config = _layer_config(vllm_config, audio_config, self.quant_config)
        self.layers = nn.ModuleList(
            WhisperEncoderLayer(vllm_config=layer_config, prefix=f"{prefix}.layers.{i}")
            for i in range(audio_config.encoder_layers)
        )
        self.layer_norm = nn.LayerNorm(d)
        self.precision = describe(self.quant_config, torch.get_default_dtype(), vllm_config.model_config.quantization)
        logger.info("audio tower: %d layers, d=%d, %s", audio_config.encoder_layers, d, self.precision)

    @staticmethod
    def _get_feat_extract_output_lengths(input_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The name upstream's model calls on transformers' encoder."""
        return output_lengths(input_lengths)

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> BaseModelOutput:
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed

        if attention_mask is None:
            conv_len = torch.full((input_features.shape[0],), output_lengths(input_features.shape[-1])[0])
        else:
            conv_len = (attention_mask[:, 0, 0, :] == 0).sum(-1)
        with gpu_sync_allowed():  # segment lengths are Python ints
            return BaseModelOutput(last_hidden_state=self.encode(input_features, conv_len.tolist()))

    def encode(self, input_features: torch.Tensor, conv_len: list[int]) -> torch.Tensor:
        """Mel features (B, n_mels, L) and each clip's frames after the conv stem -> pooled,
        normed frames (B, T, d), zero past each clip's conv_len // 2."""
        width = input_features.shape[-1]
        stems, segments = [], []
        for i, n in enumerate(conv_len):
            keep = kept_width(width, n) if self.trim else width
            x = conv_stem(self, input_features[i : i + 1, :, :keep])[0]  # (T_i, d)
            x = x[:n] if self.trim else x
            stems.append(x)
            segments += [n, x.shape[0] - n] if x.shape[0] > n else [n]  # a padded tail is its own segment
        hidden = torch.cat(stems)
        bounds = np.concatenate([[0], np.cumsum(segments)]).astype(np.int32)
        backend = self.layers[0].self_attn.attn.attn_backend
        cu_seqlens = MMEncoderAttention.maybe_recompute_cu_seqlens(
            backend, bounds, hidden.shape[-1], self.layers[0].self_attn.qkv_proj.tp_size, hidden.device)
        max_seqlen = torch.tensor(MMEncoderAttention.compute_max_seqlen(backend, bounds), dtype=torch.int32)
        seq_lens = MMEncoderAttention.maybe_compute_seq_lens(backend, bounds, hidden.device)
        for layer in self.layers:
            hidden = layer(hidden, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, sequence_lengths=seq_lens)
        pooled_max = output_lengths(width)[0] // 2 if not self.trim else max(n // 2 for n in conv_len)
        out = hidden.new_zeros(len(conv_len), max(1, pooled_max), hidden.shape[-1])
        start = 0
        for i, stem in enumerate(stems):
            out[i, : conv_len[i] // 2] = pool_and_norm(self, hidden[start : start + conv_len[i]])
            start += stem.shape[0]
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The checkpoint's tower names (transformers' Qwen2AudioEncoder) through vLLM's Whisper
        mapper: q/k/v into qkv_proj (k_proj has no bias: zeros), fc1/fc2 into mlp."""
        if self.quant_config is None or isinstance(self.quant_config, Int8DynamicConfig):
            weights = _float_weights(weights)
        weights = _create_fake_bias_for_k_proj(weights, ".k_proj.weight", out_features=self.conv1.out_channels)
        return AutoWeightsLoader(self).load_weights(weights, mapper=WhisperForConditionalGeneration.hf_to_vllm_mapper)


def _float_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    """A tower loaded from float weights (full precision or the fork's int8) refuses a
    checkpoint whose tower is already quantized, naming the scheme."""
    for name, tensor in weights:
        suffix = name.rsplit(".", 1)[-1]
        if suffix in _QUANTIZED_SUFFIXES or not tensor.is_floating_point():
            scheme = _QUANTIZED_SUFFIXES.get(suffix, f"{str(tensor.dtype).removeprefix('torch.')} tensors")
            raise ValueError(
                f"audio_tower.{name} ({str(tensor.dtype).removeprefix('torch.')}) is quantized in a scheme "
                f"the audio tower cannot load: {scheme}. The tower loads float weights (and quantizes them "
                f'itself with "{PRECISION_KEY}": "int8"); export the checkpoint with a float tower.'
            )
        yield name, tensor
