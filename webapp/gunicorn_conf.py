"""gunicorn's settings for the API and the console watchers (``--config python:webapp.gunicorn_conf``).

The master is tied to the circusd that started it (:mod:`supervision.lifeline`, armed when gunicorn
imports this module, first thing; ``on_starting`` checks that circusd is still there): when circusd
dies, however it dies, the master gets SIGTERM, gunicorn's graceful stop, and lets go of its port
instead of serving on under pid 1 beside the next stack. Its workers need nothing: each checks that
its master is still its parent and exits when it is not.

``raw_env``, ``on_starting``, ``child_exit`` and ``on_exit`` also run prometheus-client's
multiprocess mode (:mod:`webapp.multiprocess`), so ``/metrics`` merges the counts of every worker:
gunicorn puts the master's metric files' folder in the environment (``raw_env``) and the master
makes it before any worker is forked.
"""
from __future__ import annotations

import os
from typing import Any

from db.config import load_settings
from supervision.lifeline import Lifeline
from supervision.start_up import freeze_start_up_objects, pause_collection_while_loading
from webapp import multiprocess

#: This master's folder of prometheus_client's files (gunicorn reads this module in the master).
METRICS_FOLDER = multiprocess.folder_of(load_settings(), os.getpid())
raw_env = multiprocess.environment(METRICS_FOLDER)


def on_starting(server: Any) -> None:
    Lifeline().attach()
    multiprocess.start(METRICS_FOLDER)


def child_exit(server: Any, worker: Any) -> None:
    multiprocess.worker_exited(METRICS_FOLDER, worker.pid)


def on_exit(server: Any) -> None:
    multiprocess.stop(METRICS_FOLDER)


def post_fork(server: Any, worker: Any) -> None:
    # A worker, before it loads its app: no collection while it does (freeze_start_up_objects resumes it).
    pause_collection_while_loading(command_only=False)


def post_worker_init(worker: Any) -> None:
    # Each worker has loaded its app (no --preload: made after the fork): its objects out of the
    # collector's way, or a full collection in a worker paused all of its threads up to 120 ms.
    freeze_start_up_objects()
