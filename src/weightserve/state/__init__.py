"""Control state the server keeps per model: expert load windows and expert-mapping versions.

One package owns it, so persistence (`--state-dir`, later) has one home: the control
plane asks it for mappings and deltas, and never numbers a version itself.
"""
