"""selfalign stages: synthesize, assess, train, merge, coverage (python -m selfalign.stages), built from text/, models/, vectors/ and runtime/."""
