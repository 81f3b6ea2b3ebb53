"""The tools around the server: bench, routing bench, load test and its plan, simulate, soak and
eval (the GSM8K client). The server modules never import this package; `edgeserve serve` loads
none of it (the CLI imports a tool's module only when its subcommand runs)."""
