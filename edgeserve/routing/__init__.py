"""Pure routing: cost profiles, quality curves, policy files, prompt hints, the decision and its
simulator. Nothing here does I/O, reads a clock or draws unseeded random numbers."""
