"""Everything about the database: settings, engines, schema, the ops registry,
the writer's client and health checks. Nothing else lives here."""
import importlib.util
import sys

#: What every tickstack process imports (requirements.lock has the versions). Without them, the
#: first import of one failed deep in a module with a bare ModuleNotFoundError: what a user saw who
#: ran ``python3 -m db health`` with the system's Python instead of the checkout's venv.
_NEEDED = ("sqlalchemy", "msgpack", "psutil", "zmq")
_missing = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
if _missing:
    _words = (f"tickstack's packages ({', '.join(_missing)}) are not installed for {sys.executable}: run tickstack "
              "with the checkout's venv, `.venv/bin/python -m ...` (`make install` makes it; `source "
              ".venv/bin/activate` puts it first on PATH)")
    # A command: python -m db ..., -m workers.x (their packages import while sys.argv[0] is "-m"), or
    # python -m bench ... (it imports db once its own module runs, as __main__ of a package of ours).
    _main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if sys.argv[:1] == ["-m"] or (_main is not None and _main.name.partition(".")[0] in ("bench", "db", "workers")):
        sys.exit(f"{_words}.")
    raise ModuleNotFoundError(_words, name=_missing[0])
