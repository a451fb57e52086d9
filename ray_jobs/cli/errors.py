"""How the `bae` command ends: exit codes, and one line per expected failure.

    0    done
    1    the run itself failed (a trial or a task failed, an unexpected error); rerun the same command to resume
    2    bad input: an option, a spec value, a file or folder, a model or dataset that cannot be used, an
         unreachable cluster; nothing was run, or what ran is kept
    130  interrupted (Ctrl+C); finished work is kept and the same command resumes

Every expected failure prints one line, `bae <command>: error: <what and how to fix it>`; `--debug` adds the
traceback.
"""

from __future__ import annotations

import shlex

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class InputError(ValueError):
    """Bad input found by a command's own checks: the message names the input and the fix."""


class RunFailed(RuntimeError):
    """The run itself failed (exit 1); the message says what failed and where its details are."""


# Bad input: what the command was given cannot be used. Everything else is a failure of the run (exit 1).
_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # option and spec values, SpecError, CacheError, pydantic and pyarrow's ArrowInvalid among them
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ConnectionError,  # an unreachable cluster or server named by an option
)


def exit_code(err: BaseException) -> int:
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(err, RunFailed):
        return EXIT_FAILED
    return EXIT_BAD_INPUT if isinstance(err, _INPUT_ERRORS) else EXIT_FAILED


def one_line(err: BaseException) -> str:
    """The error's message on one line. For a failure of the run (exit 1) raised by a library, the exception's
    type follows: its message alone may not say what failed."""
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.strerror and err.filename:
        text = f"{err.filename}: {err.strerror}"
    if not text:
        return type(err).__name__
    own = type(err).__module__.split(".")[0] in ("bae_core", "ray_jobs", "analysis")  # messages written as sentences
    if exit_code(err) == EXIT_BAD_INPUT or own:
        return text
    return f"{text} ({type(err).__name__})"


def remote_cause(err: BaseException) -> BaseException:
    """The exception a Ray task, actor or Ray Data function raised, rather than Ray's wrappers of it (whose
    messages hold the remote traceback, or only "UDF failed to process a data block")."""
    for _ in range(8):  # a wrapper of a wrapper at most a few deep
        if not type(err).__module__.startswith("ray."):
            break
        cause = getattr(err, "cause", None)
        cause = cause if isinstance(cause, BaseException) else err.__cause__
        if cause is None:
            break
        err = cause
    return err


def resume_command(argv: list[str]) -> str:
    """The command line that resumes a run: the same `bae` command."""
    return "bae " + shlex.join(argv)
