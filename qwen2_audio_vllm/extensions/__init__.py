"""What the fork serves beyond upstream's Qwen2-Audio, one module per feature, each a set of
mixins layered on model.py's classes (served.py composes them):

- long_audio:      audio longer than the encoder window, split into windows (windows.py)
- audio_frames:    precomputed pooled encoder frames instead of audio (projector only)
- modality_inputs: extra embedding modalities with their own projectors (modalities.py)
- input_checks:    bad requests become ValueErrors (HTTP 400) that say what to send
- real_frames:     the processor ships each window's real mel frames, not the 30 s window
- hotwords:        a request's hotword list placed before each audio item's tokens

Each mixin overrides a method of model.py's class and calls `super()`, so model.py stays
upstream's file plus the projector seam, and a feature can be read (or dropped) on its own.
"""
