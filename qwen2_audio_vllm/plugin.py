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
    _unfetchable_audio_url_is_a_client_error()


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


SEND_INSTEAD = ("send the audio inline as a base64 data URL (data:audio/wav;base64,...), "
                "or an http(s) URL this server can reach")


def audio_url_error(url: str, err: BaseException) -> Exception | None:
    """The client error (HTTP 400, naming what to send instead) for an audio_url the server
    could not fetch, or None for errors that are not the request's fault. vLLM 0.32 answers
    a file:// URL without --allowed-local-media-path (a RuntimeError) and an unreachable
    host (aiohttp's connection error or a timeout) with HTTP 500."""
    import aiohttp
    from vllm.exceptions import VLLMClientError, VLLMValidationError

    if isinstance(err, VLLMClientError):
        return None  # already a 4xx
    shown = url if len(url) <= 120 else url[:120] + "..."
    if url[:7].lower() == "file://" and isinstance(err, RuntimeError):
        why = "this server does not read local files (it was started without --allowed-local-media-path)"
    elif isinstance(err, aiohttp.ClientConnectionError | TimeoutError):
        why = f"it could not be fetched ({type(err).__name__}: {err or 'timed out'})"
    else:
        return None
    return VLLMValidationError(f"audio_url {shown}: {why}; {SEND_INSTEAD}", parameter="audio_url", value=shown)


def _unfetchable_audio_url_is_a_client_error() -> None:
    from vllm.multimodal.media.connector import MediaConnector

    original = MediaConnector.fetch_audio_async
    if getattr(original, "_raises_client_error", False):
        return

    async def fetch_audio_async(self, audio_url: str):
        try:
            return await original(self, audio_url)
        except Exception as err:
            if (client_error := audio_url_error(audio_url, err)) is not None:
                raise client_error from err
            raise

    fetch_audio_async._raises_client_error = True
    MediaConnector.fetch_audio_async = fetch_audio_async
