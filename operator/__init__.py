"""selfalign operator: typed spec, pure planner and builders, kopf handlers, local runner, CLI."""
