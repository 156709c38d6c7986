"""CPU seconds per task, per component, for AsyncQ, Celery and Local executors (``bench/cpu/run.py``).

``procfs`` reads the kernel's counters, ``tracker`` follows a deployment's processes through a window
of time, ``attribute`` turns what it saw into CPU per component and per worker role, and ``run`` is
the command line. docs/BENCHMARKS.md, "CPU per task, per component", has the method.
"""
