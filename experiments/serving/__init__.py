"""Serving: the one place that builds vLLM engine arguments and prompts (engine.py), the
`vllm serve` process (server.py), the async load client (client.py), and long files
through an engine (long_form.py)."""
