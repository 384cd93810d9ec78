"""User tools: the `selfalign` command, the local runner, and run status, logs and reports."""
