"""The line between a problem the user can fix and a bug in hcd.

:class:`UserError` is raised for anything the person at the keyboard can put right: a bad flag,
a missing or malformed input, a refused overwrite, a labels file with values that are not 0/1,
a corrupt model artifact. ``hcd`` prints its message as one line and exits with code 2.
:class:`RunStopped` (storage or a node went away; exit code 3) and :class:`Interrupted` (Ctrl-C;
exit code 130) keep what was committed and say so in one line. Every other exception is a bug
(or a fault of the machine) and keeps its traceback and exit code 1.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
import time
import traceback


class UserError(Exception):
    """A problem the user can fix; the message names the thing and the fix, on one line."""


def check_range(name: str, value: float | None, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False) -> None:
    """Refuse ``value`` outside ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``), naming the setting."""
    if value is None:
        return
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    high_bad = hi is not None and value > hi
    if low_bad or high_bad or value != value:  # NaN compares false everywhere
        if hi is None:
            bound = f"{'>' if lo_open else '>='} {lo:g}"
        elif lo is None:
            bound = f"<= {hi:g}"
        else:
            bound = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise UserError(f"{name} must be {bound}, got {value!r}")


class RunStopped(RuntimeError):
    """A run stopped for a reason outside hcd (storage went away, a node died); a rerun resumes.

    ``hcd`` prints the message as one line and exits with code 3: committed work is kept.
    """


class Interrupted(RunStopped):
    """The user stopped the run (Ctrl-C, SIGINT); committed work is kept and a rerun resumes.

    ``hcd`` prints the message as one line and exits with code 130, as a shell does for Ctrl-C.
    """


def _chain(exc: BaseException):
    """``exc`` and every exception behind it (causes, contexts, a Ray task error's ``cause``), once each."""
    seen: set[int] = set()
    todo: list = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]


def outside_cause(exc: BaseException) -> BaseException | None:
    """The fault of the environment behind ``exc`` (I/O, a lost node or worker), or None for a bug."""
    import ray.exceptions as rex  # Ray only where a job runs

    faults = (OSError, rex.RayActorError, rex.NodeDiedError, rex.ObjectLostError, rex.WorkerCrashedError,
              rex.ActorUnavailableError)
    for e in _chain(exc):
        if isinstance(e, faults) and not isinstance(e, UserError):
            # A task's error re-raised on the driver carries the worker's traceback in its text;
            # the original exception says what went wrong in one line.
            original = getattr(e, "cause", None) if isinstance(e, rex.RayTaskError) else None
            return original if isinstance(original, BaseException) else e
    return None


def storage_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is object storage failing a request (pyarrow's S3 errors say ``AWS Error``).

    Raised on the driver before any work (listing the input, reading the model, checking --out):
    an endpoint that does not answer, credentials it refuses, a bucket this identity may not read.
    """
    return isinstance(exc, OSError) and "AWS Error" in str(exc)


def release_frames(exc: BaseException, *, wait_s: float = 10.0) -> None:
    """Let go of what the frames behind ``exc`` and its causes hold; keep the exceptions' text.

    A failed Ray Data pipeline's model actors stay alive as long as anything references the
    frames its exception passed through, and a logging handler that keeps records (pytest, a
    notebook's) does. Left alone, the next run in the same process finds every CPU held by the
    dead run's actors and waits forever. Called on a stop, after the error has been logged.

    Clearing the frames' variables is not enough. Ray Data hands a task's error over from its
    executor thread, which may still be finishing (its shutdown joins it for at most 2 s), and a
    frame that returned keeps its caller (``f_back``): that thread's entry frame, whose ``self``
    is the executor. And a cleared frame still holds its function, whose closure (Ray Data's
    batch iterators) holds the executor too. Clearing alone left an actor alive in 7 of 15 runs.
    So: wait for the threads still running these frames (up to ``wait_s`` in all), clear every
    frame and caller that has returned, then cut each traceback below the frame that caught it.
    """
    tbs = [e.__traceback__ for e in _chain(exc) if e.__traceback__ is not None]
    passed = {id(f) for tb in tbs for f, _ in traceback.walk_tb(tb)}  # the frames the error passed through
    seen: set[int] = set()
    frames = []
    for tb in tbs:
        for f, _ in traceback.walk_tb(tb):
            while f is not None and id(f) not in seen:  # the frame and its callers
                seen.add(id(f))
                frames.append(f)
                f = f.f_back
    others = {t.ident: t for t in threading.enumerate() if t is not threading.current_thread()}
    deadline = time.monotonic() + wait_s
    for ident, f in sys._current_frames().items():
        while f is not None and id(f) not in seen:
            f = f.f_back
        if f is not None and ident in others:
            others[ident].join(max(0.0, deadline - time.monotonic()))
    for f in frames:
        if f.f_code.co_flags & _GENERATOR and id(f) not in passed:
            continue  # a caller may be a suspended generator: clearing its frame would close it
        with contextlib.suppress(RuntimeError):  # still running: this thread's callers
            f.clear()
    for tb in tbs:
        tb.tb_next = None  # the frames below (Ray's closures) go; the log line already has the text


_GENERATOR = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
