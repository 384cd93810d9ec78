"""selfalign stages: synthesize, assess, train, merge, coverage. One CLI: python -m selfalign.stages."""
