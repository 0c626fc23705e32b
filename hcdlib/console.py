"""What ``hcd`` shows on the terminal: one line per stage, live progress bars, the summary.

Ray's own logs, progress lines and warnings are written to Ray's log files
(``/tmp/ray/session_latest/logs``), not the console, unless ``--verbose``: a pathologist running
``hcd demo`` should read what hcd did, not Ray's internals. The logging level of the ``hcdlib``
logger is the one switch: DEBUG means verbose everywhere (no global flag of our own).
"""

from __future__ import annotations

import logging
import sys
import warnings

HCD_LOGGERS = ("hcd", "hcdlib")
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")


class _Stderr(logging.StreamHandler):
    """A handler for whatever ``sys.stderr`` is when a record is written (pytest, notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    """Quiet by default: hcd's messages as plain lines on stderr, Ray's only when they are errors.

    hcd's loggers get their own handler (replaced, not added to, on a second call); the root
    logger and its handlers are left to the application (a notebook, pytest).
    """
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose
                                           else "%(message)s"))
    handler.hcd_console = True
    for name in HCD_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [h for h in logger.handlers if not getattr(h, "hcd_console", False)] + [handler]
        logger.propagate = False
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:  # deprecation notes inside Ray and friends: nothing a user of hcd can act on
        for module in (r"ray(\..*)?", r"torch(\..*)?", r"pyarrow(\..*)?", r"botocore(\..*)?"):
            warnings.filterwarnings("ignore", module=module)


def verbose() -> bool:
    """Whether the user asked for everything (``--verbose``)."""
    return logging.getLogger("hcdlib").isEnabledFor(logging.DEBUG)


def quiet_ray_data() -> None:
    """Ray Data's progress lines and execution banners only with ``--verbose`` (hcd draws its own bar).

    Importing ray.data configures its loggers anew, so their levels are set again here.
    """
    from ray.data import DataContext

    loud = verbose()
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if loud else logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = loud
    ctx.print_on_execution_start = loud
    ctx.enable_auto_log_stats = False


def progress(total: int | float, *, desc: str, unit: str):
    """A live bar (done, rate, ETA) on a terminal; nothing when output goes to a file or CI log."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True,
                smoothing=0.1, mininterval=0.5)
