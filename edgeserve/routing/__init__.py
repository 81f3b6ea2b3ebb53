"""Pure routing: cost profiles (costs), quality curves (quality), parsing and checking policy files
(policy_file; reading them is edgeserve.policies), prompt hints (hints), the board's batching
timeline (batching), the decision (policy) and its simulator (simulator). Nothing here does I/O,
reads a clock or draws unseeded random numbers: values in, values out."""
