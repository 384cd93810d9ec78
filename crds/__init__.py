"""The SelfAlignRun CRD (selfalignrun.yaml), packaged so `selfalign validate` works when installed."""
