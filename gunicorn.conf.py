"""gunicorn settings for the gateway (gunicorn reads ./gunicorn.conf.py by itself).

LLM streams last seconds to minutes, so a worker must hold many open streams at once.
The default worker is gevent: the code stays synchronous, each request (and each
stream's upstream reader) is a greenlet, and 1,000 concurrent streams cost a worker
little (measured in docs/performance.md). Threaded workers instead: `-k gthread` (or
`--worker-class`, in GUNICORN_CMD_ARGS too) or KEYMEAI_WORKER_CLASS=gthread (a stream
holds a thread; GUNICORN_THREADS bounds them). Heroku-style hosts set PORT and
WEB_CONCURRENCY; both are honoured.
"""

import os
import shlex
import sys

WORKER_CLASSES = ("gevent", "gthread")


def _chosen_worker_class() -> str:
    """The worker class asked for: gunicorn's own -k/--worker-class (command line, then
    GUNICORN_CMD_ARGS), else KEYMEAI_WORKER_CLASS, else gevent. Read here, before
    gunicorn applies it, because gevent must patch before anything else is imported."""
    chosen = os.environ.get("KEYMEAI_WORKER_CLASS", "gevent")
    for args in (shlex.split(os.environ.get("GUNICORN_CMD_ARGS", "")), sys.argv[1:]):
        for i, arg in enumerate(args):
            if arg in ("-k", "--worker-class") and i + 1 < len(args):
                chosen = args[i + 1]
            elif arg.startswith("--worker-class="):
                chosen = arg.partition("=")[2]
            elif arg.startswith("-k") and len(arg) > 2:
                chosen = arg[2:]
    return chosen.removeprefix("gunicorn.workers.ggevent.").removesuffix("Worker").lower()


# gevent must patch the standard library before anything imports ssl, sockets or locks,
# in this master process too, whose forks are the workers.
worker_class = _chosen_worker_class()
if worker_class == "gevent":
    from gevent import monkey

    monkey.patch_all()

import shutil  # noqa: E402
import tempfile  # noqa: E402

# prometheus-client chooses per-process files or plain memory when it is first imported,
# which is by `keymeai` just below, in this master process, whose forks are the workers:
# the directory must be in the environment before that.
# A directory made here is removed at exit; the marker survives gunicorn re-reading this
# file (on SIGHUP), when the variable is already set.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="keymeai-metrics-")
    os.environ["KEYMEAI_OWN_METRICS_DIR"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

from keymeai.config import ConfigError, load_config  # noqa: E402


def _remove_own_metrics_dir() -> None:
    """Remove the metrics directory made above (not one the operator chose)."""
    own = os.environ.get("KEYMEAI_OWN_METRICS_DIR")
    if own and own == os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        shutil.rmtree(own, ignore_errors=True)


def _refuse(message: str) -> None:
    _remove_own_metrics_dir()
    sys.exit(f"keymeai: {message}")


try:
    _config = load_config()
except ConfigError as exc:
    _refuse(str(exc))
_memory_limits = _config.ratelimit.storage_uri.startswith("memory")

bind = [f"0.0.0.0:{os.environ['PORT']}"] if os.environ.get("PORT") else ["127.0.0.1:8000"]
# Memory limit storage is per process: one worker keeps the limits exact.
workers = int(os.environ.get("WEB_CONCURRENCY") or (1 if _memory_limits else os.cpu_count() or 1))
# gthread: a stream holds a thread for its whole length, so threads bound the concurrent
# requests of a worker (more wait in the accept queue). gevent: connections do.
threads = int(os.environ.get("GUNICORN_THREADS", "256"))
worker_connections = 2000
keepalive = 5
# SIGTERM: in-flight streams get this long to finish (Heroku kills at 30 s).
graceful_timeout = 25
timeout = 60
# Recycle workers now and then (a leak cannot grow forever); the jitter keeps them from
# all restarting at once. Not with a single worker: its successor starts only once it
# has drained its streams, and until then nobody accepts connections.
max_requests = 20_000 if workers > 1 else 0
max_requests_jitter = 2_000
accesslog = None  # the gateway logs each completion itself, as JSON
errorlog = "-"
# gunicorn >= 25 opens a control socket at ~/.gunicorn/gunicorn.ctl by default: one path
# for every instance of a user (they would replace each other's), and a service user may
# have no home. systemd or the platform restarts and scales the gateway instead.
control_socket_disable = True


def on_starting(server):
    """Refuse layouts that would silently lose data or multiply limits; reset metrics."""
    if worker_class not in WORKER_CLASSES or server.cfg.worker_class_str != worker_class:
        _refuse(
            f"worker class {server.cfg.worker_class_str!r}: the gateway runs on gevent "
            "(default) or gthread, chosen with -k, GUNICORN_CMD_ARGS or KEYMEAI_WORKER_CLASS."
        )
    if os.environ.get("DYNO") and _config.database_url.startswith("sqlite"):
        _refuse(
            "a Heroku-style dyno has an ephemeral disk: a SQLite ledger would lose every "
            "usage record at the next restart. Attach PostgreSQL (DATABASE_URL)."
        )
    if _memory_limits and server.cfg.workers > 1:
        _refuse(
            f"ratelimit.storage_uri is memory:// but {server.cfg.workers} workers "
            "were asked for: each worker would count limits separately. Set REDIS_URL (or "
            "RATELIMIT_STORAGE_URI) to share limits, or run one worker (WEB_CONCURRENCY=1)."
        )
    # Files of an earlier run (or of this master's imports) would be added to the totals.
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)


def when_ready(server):
    """Warn once per start about what the configuration leaves unservable (the flask
    commands, which build the app too, stay quiet about it: `flask --app app info`)."""
    from keymeai.ops.diagnostics import setup_warnings

    for warning in setup_warnings(_config):
        server.log.warning("keymeai: %s", warning)


def post_fork(server, worker):
    """Under gevent, let PostgreSQL queries yield to other greenlets while they wait
    (psycopg2 is C code that gevent's patching cannot reach)."""
    if worker_class == "gevent" and not _config.database_url.startswith("sqlite"):
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()


def post_worker_init(worker):
    """On SIGTERM, give streams most of the grace period to finish, then end the rest
    cleanly (an error event, a usage record) before the master kills the worker."""
    import signal

    from keymeai.api.relay import cut_streams_after

    stop = signal.getsignal(signal.SIGTERM)
    grace = worker.cfg.graceful_timeout

    def on_sigterm(signum, frame):
        cut_streams_after(grace - min(5.0, grace / 2))
        if callable(stop):
            stop(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def worker_exit(server, worker):
    """Drain the worker's usage journal into the ledger before it exits (an ephemeral
    disk may not outlive the process)."""
    from keymeai.ledger.journal import close_all

    close_all()


def child_exit(server, worker):
    """A dead worker's live gauges must not count any more."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    _remove_own_metrics_dir()
