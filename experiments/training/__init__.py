"""Training stages: pretraining the tiny base and aligning a projector on cached encoder
outputs (train.py), the encoder-output cache (cache.py), device, precision and
data-parallel processes (devices.py)."""
