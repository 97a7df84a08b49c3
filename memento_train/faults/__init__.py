"""Surviving what clusters do to long runs, shared by the SFT and RL drivers.

- :mod:`.preemption`: SIGTERM / SIGUSR1 become "checkpoint at the next step boundary, then exit
  with :data:`~.preemption.EXIT_PREEMPTED`".
- :mod:`.watchdog`: a step that takes far longer than the median step is a hang; the workers'
  Python stacks are dumped into the run directory and the hang is named (rank, collective).
- :mod:`.config`: the SFT run's ``faults`` section (restarts of a dead or hung worker group).
- :mod:`.secrets`: which configuration values are secrets, and keeping them out of files and logs.

Checkpoint integrity lives with the checkpoints (:mod:`memento_train.checkpoint.manager`).
"""
