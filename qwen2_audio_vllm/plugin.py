"""vLLM plugin (entry point group `vllm.general_plugins`, see setup.cfg).

vLLM calls `register()` in every process it starts; it registers the fork lazily (a
"module:Class" string, so the model file is imported only where it is used) and is
idempotent.
"""

ARCHITECTURE = "Qwen2AudioSwapForConditionalGeneration"


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"qwen2_audio_vllm.served:{ARCHITECTURE}")
    _undecodable_audio_is_a_client_error()


def _undecodable_audio_is_a_client_error() -> None:
    """vLLM 0.32 re-raises libsndfile's error for a recognised but corrupt file (e.g. a
    truncated WAV), which the server answers with HTTP 500. Turn it into a ValueError (HTTP
    400, with the decoder's message); format-detection failures still fall through to PyAV
    as upstream intends."""
    import soundfile
    from vllm.multimodal.media import audio as media_audio

    original = media_audio.load_audio_soundfile
    if getattr(original, "_raises_value_error", False):
        return

    def load_audio_soundfile(path, *args, **kwargs):
        try:
            return original(path, *args, **kwargs)
        except soundfile.LibsndfileError as err:
            if err.code in media_audio._BAD_SF_CODES:
                raise
            raise ValueError(f"could not decode the audio ({err}); send a valid WAV, FLAC, OGG or MP3 file") from err

    load_audio_soundfile._raises_value_error = True
    media_audio.load_audio_soundfile = load_audio_soundfile
