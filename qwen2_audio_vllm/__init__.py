"""The vLLM fork of Qwen2-Audio with a swappable projector, its HF twin and checkpoint format.

`import qwen2_audio_vllm` does not import vLLM; only `model` and `plugin.register` do."""
