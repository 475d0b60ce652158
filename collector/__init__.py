"""The flowproof collector: inventory, policy engine, planner, dispatcher, flow state and exporters."""
