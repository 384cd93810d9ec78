"""selfalign operator: the control plane (typed spec, pure planner and builders, kopf handlers); cli/ holds the user tools."""
