"""What the `bae` command shows: its global options, help with every default, quiet libraries, progress lines."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

# Libraries that would otherwise print into the command's output: their own progress and configuration
# boxes repeat what the commands print; their logs still go to files under Ray's session folder.
_QUIET_LOGGERS = ("ray.data", "ray.tune", "ray.train", "ray.air", "transformers", "datasets", "filelock")


class HelpFormatter(argparse.HelpFormatter):
    """Shows the default of every option that has one (flags and options whose default is decided elsewhere
    say so in their own help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction))
        ):
            return text
        default = action.default
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """-v/--verbose and --debug; `suppress` on a subcommand keeps a value given before the subcommand's name."""
    default = argparse.SUPPRESS if suppress else False
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="log progress of the libraries (Ray, transformers) at INFO level, and Ray's own log lines",
    )
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show the full traceback when a command fails"
    )


def configure_console(*, verbose: bool) -> None:
    """Logging for a command: its own lines on the console, the libraries' only when asked (`--verbose`)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if verbose:
        return
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Tune's configuration box, TensorBoard hint and result tables (its legacy reporter is silent at verbose=0).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # transformers' and huggingface_hub's own progress bars (weight loading); downloads still show in --verbose.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with_transformers = sys.modules.get("transformers")
    if with_transformers is not None:
        with_transformers.utils.logging.disable_progress_bar()


class Progress:
    """A progress line: rewritten in place on a terminal, one line per step otherwise (a log file gets whole
    lines, every tenth of the way). Call `end()` when done; every line ends with a newline."""

    def __init__(self, label: str, *, stream=None, quiet: bool = False):
        self.label = label
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.open = False
        self.last_tenth = -1
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        text = f"  {self.label} {done}/{total} ({time.perf_counter() - self.start:.0f}s)"
        if self.tty:
            print(f"\r{text}", end="", file=self.stream, flush=True)
            self.open = True
            return
        tenth = (10 * done) // max(total, 1)
        if tenth > self.last_tenth or done == total:
            self.last_tenth = tenth
            print(text, file=self.stream, flush=True)

    def end(self) -> None:
        if self.open:
            print(file=self.stream, flush=True)
            self.open = False
