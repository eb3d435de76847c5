"""The harness that tests and benchmarks share, kept out of the production
packages: one way to build a private runtime folder, start a writer or the
whole stack under circusd, and stop what was started (by pid, never by name).

* :mod:`testkit.env`: the scrubbed environment of a private stack (short
  ``TICKSTACK_HOME``, free ports), and :data:`~testkit.env.ROOT`;
* :mod:`testkit.process`: stopping a process, and the processes it started,
  by pid;
* :mod:`testkit.writer`: :func:`~testkit.writer.spawn` (a writer outside
  circus) and :class:`~testkit.writer.Stack` (a runtime folder and the writer
  processes started in it);
* :mod:`testkit.circus`: :class:`~testkit.circus.Circusd` (any circusd) and
  :class:`~testkit.circus.CircusStack` (the real ``circus.ini``);
* :mod:`testkit.gunicorn`: a web app's gunicorn run with ``circus.ini``'s own
  command line, without circusd, on a free port;
* :mod:`testkit.helpers`: polling, read-only queries, test data;
* :mod:`testkit.writer_procs`: producer and reader processes for the writer
  tests.

Submodules are imported on their own (nothing is re-exported here), so a
benchmark that needs only the environment and the writer does not load circus.
"""
