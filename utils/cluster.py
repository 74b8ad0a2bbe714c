"""Moved to protocol/cluster.py (issue 27). This module is kept only so that submitit jobs queued
before the move still start: submitit pickled each job's callable by its import path,
``utils.cluster.StageJob``, and unpickling looks that name up here.

Nothing of the project is imported at import time (utils/ imports nothing above it): the module
``__getattr__`` (PEP 562) imports protocol.cluster only when an old pickle asks for a name. New code
imports protocol.cluster; delete this file once no job from before the move can be queued.
"""
import importlib


def __getattr__(name: str):
    return getattr(importlib.import_module("protocol.cluster"), name)
