"""What both the workers and the web apps need from circus and the OS.

A neutral layer between :mod:`db` (below) and :mod:`workers` / :mod:`webapp`
(above, which never import each other):

- :mod:`supervision.circus`: talking to circusd, with the one rule for its
  "arbiter is already running X command" answers (retry briefly, then say so).
- :mod:`supervision.procstats`: CPU, memory, pids and uptime of each watcher.
- :mod:`supervision.sampler`: the samples behind the console's charts, taken
  by the jobs worker and read by the console.
- :mod:`supervision.plugins`: circus plugins of ours (loaded by circusd).
- :mod:`supervision.start_up`: what a process does once its modules are loaded (workers, and
  gunicorn's workers once their app is made).
- :mod:`supervision.signals`: circusd's stop signals (Ctrl-C, SIGTERM) never dropped while it runs another
  command (installed by :mod:`supervision.hooks`).
- :mod:`supervision.hooks`: circus's start hooks (loaded by circusd; nothing here may change
  circusd's environment, which ``reloadconfig`` compares with each watcher's).

Nothing here imports Flask: the jobs worker takes a sample without loading
the web app.
"""
