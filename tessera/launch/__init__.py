"""Launching a job: local processes, one node's share (``tessera node``), Ray actors.

The control plane the processes join lives in :mod:`tessera.cluster`; nothing there
imports this package.
"""
