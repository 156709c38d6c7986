"""The capstone reliability run: a fleet of worker hosts on Redis Sentinel under seeded random faults.

``python -m bench.chaos.run`` (``make chaos``); docs/RELIABILITY.md says what it measures and why.
"""
