"""Benchmarks, all measured in alternating rounds (`offline.interleaved_rounds`; at least 5,
median with min-max): the `bench` stage's variant-vs-linear comparison (offline.py), the
fork vs upstream vLLM (fork.py), the encoder-output cache (cache.py), cached frames as
requests (features.py), online serving configs (serving.py), and the align step's cost at
any model's dims (training.py, the `train_bench` stage)."""
