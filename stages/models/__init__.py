"""Models: the vLLM engines, the builtin models, DeepSpeed configs, per-round evaluation."""
