"""Hydra entry points and the stages of an experiment (prepare, align, evaluate, bench, report)."""
