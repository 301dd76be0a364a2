"""vLLM plugin (entry point group `vllm.general_plugins`, see setup.cfg).

vLLM calls `register()` in every process it starts; it registers the fork lazily (a
"module:Class" string, so vLLM is not imported twice) and is idempotent.
"""

ARCHITECTURE = "Qwen2AudioSwapForConditionalGeneration"


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"qwen2_audio_vllm.model:{ARCHITECTURE}")
