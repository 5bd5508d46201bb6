"""What every phonefit command shares: the argument parser, its number types, the checks of
output paths made before any work starts, and the runner that turns exceptions into exit codes.

Exit codes (README, "Command line"):

* 0 — success;
* 1 — the job ran but its goal was not met (`EXIT_NOT_MET`: e.g. the adapted model is over the
  budget when measured);
* 2 — bad input, told in one line: what was expected, what was received, how to fix it;
* 130 — interrupted (Ctrl-C); what was done is kept, and the message says how to go on.

This module imports neither TensorFlow nor `profiler` nor `adapter`: every command parses its
arguments with it before loading anything heavy, so `--help` and argument errors are instant.
"""
from __future__ import annotations

import argparse
import math
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from lut.errors import PhonefitError
from lut.litert import LiteRTMissingError, interpreter_class
from lut.quiet_tf import import_tensorflow_quietly

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_MET",
    "EXIT_OK",
    "ArgumentParser",
    "HelpFormatter",
    "check_output_file",
    "check_output_folder",
    "describe_error",
    "non_negative_int",
    "number",
    "positive_float",
    "positive_int",
    "quiet_litert_notice",
    "run_command",
    "run_parsed",
]

EXIT_OK, EXIT_NOT_MET, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


# --------------------------------------------------------------------------- parsing


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help, unless the help already speaks of its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))
            or isinstance(action, argparse.BooleanOptionalAction)
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, `PROG: error: REASON (see --help)`, exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {_one_line(message)} (see --help)\n")


_KIND_WORDS = {int: "an integer", float: "a number"}


def number(
    kind: type, low: float = -math.inf, high: float = math.inf, *, open_low: bool = True, open_high: bool = False
) -> Callable[[str], Any]:
    """An argparse `type`: a finite `kind` (int or float) in the interval from `low` to `high`.

    Refuses what does not parse, NaN, infinities and values outside the interval with
    "must be ... Received: 'TEXT'." — never a silent default.
    """
    if kind not in _KIND_WORDS:
        raise TypeError(f"`kind` must be int or float. Received: kind={kind!r}.")
    if low == 0 and open_low and high == math.inf:
        wanted = f"a positive {_KIND_WORDS[kind].split()[1]}"
    elif low == 0 and not open_low and high == math.inf:
        wanted = f"{_KIND_WORDS[kind]} ≥ 0"
    else:
        wanted = f"{_KIND_WORDS[kind]} in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {wanted}. Received: {text!r}.") from None
        inside = (low < value if open_low else low <= value) and (value < high if open_high else value <= high)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"must be {wanted}. Received: {text!r}.")
        return value

    parse.__name__ = kind.__name__  # what argparse names in its own messages
    return parse


positive_int = number(int, 0)
positive_float = number(float, 0)
non_negative_int = number(int, 0, open_low=False)


# --------------------------------------------------------------------------- output paths


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _folder_problem(folder: Path, option: str, path: Path) -> str | None:
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        return (
            f"{option} {path} cannot be created: {existing} is a file, not a folder. "
            "Choose a path whose folders are folders (or remove that file)."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        return (
            f"{option} {path} cannot be written: the folder {existing} is not writable by this user. "
            "Choose a writable place, or make it writable (chmod u+w)."
        )
    return None


def check_output_file(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """`path` as a file this command can create or overwrite, checked before the work starts.

    Refuses a folder, a path under a file, an unwritable file or an unwritable folder
    (SQLite LUTs also need their folder writable), with `PhonefitError` naming `option`.
    Creates nothing.
    """
    path = Path(path)
    if path.is_dir():
        raise PhonefitError(f"{option} {path} is a folder; expected a file path. Name a file inside it, e.g. {path / 'out'}.")
    if path.exists() and not os.access(path, os.W_OK):
        raise PhonefitError(
            f"{option} {path} is read-only for this user; expected a file phonefit can write. "
            "Make it writable (chmod u+w) or choose another path."
        )
    problem = _folder_problem(path.parent, option, path)
    if problem:
        raise PhonefitError(problem)
    return path


def check_output_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """`path` as a folder this command can create or write into, checked before the work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PhonefitError(f"{option} {path} is a file; expected a folder. Choose another path, or remove the file.")
    problem = _folder_problem(path, option, path)
    if problem:
        raise PhonefitError(problem)
    return path


# --------------------------------------------------------------------------- running


def _sqlite_message(e: sqlite3.Error) -> str:
    text = str(e)
    if "readonly" in text or "read-only" in text:
        return (
            f"cannot write to a LUT: it is read-only (SQLite: {text}); expected a LUT file and folder this user can "
            "write. Make both writable (chmod u+w) or write into another --out file."
        )
    if "locked" in text:
        return (
            f"a LUT or run file is locked (SQLite: {text}): another phonefit command is writing it. "
            "Wait for that command to end, or write into another --out file."
        )
    if "disk" in text and "full" in text:
        return f"the disk is full (SQLite: {text}). Free some space and run the same command again."
    return f"SQLite could not use a LUT or run file (SQLite: {text}). Check the file is a phonefit file, or rebuild it."


def _os_message(e: OSError) -> str:
    where = f" {e.filename}" if e.filename else ""
    reason = e.strerror or str(e)
    if isinstance(e, PermissionError):
        return f"permission denied for{where}: expected a path this user can read and write. Fix its permissions or choose another path."
    if isinstance(e, IsADirectoryError):
        return f"{where.strip()} is a folder; expected a file. Choose a file path."
    if isinstance(e, NotADirectoryError):
        return f"{where.strip()} goes through a file where a folder was expected. Choose another path."
    if isinstance(e, FileNotFoundError):
        return f"no such file or folder:{where}. Check the path."
    return f"{reason}{':' + where if where else ''}. Check the path and the space left on its disk, then run the same command again."


def describe_error(error: BaseException) -> str | None:
    """The one-line reason a command prints for `error`, or None for an error that is a bug
    (it keeps its traceback)."""
    if isinstance(error, PhonefitError):
        return _one_line(str(error))
    if isinstance(error, sqlite3.Error):
        return _sqlite_message(error)
    if isinstance(error, UnicodeDecodeError):
        return (
            f"a file is not UTF-8 text: byte {error.object[error.start:error.start + 1]!r} at position {error.start} "
            f"({error.reason}); expected UTF-8. Save it as UTF-8, or pass the file the option asks for."
        )
    if isinstance(error, OSError):
        return _one_line(_os_message(error))
    return None


def run_command(prog: str, work: Callable[[], int], *, on_interrupt: str) -> int:
    """`work()`'s exit code, or the CLI convention's when it stops early.

    Bad input (`PhonefitError`, and the OS, SQLite and encoding errors `describe_error`
    explains) prints `{prog}: error: {reason}` on one line, with no traceback, and gives 2;
    Ctrl-C prints `{prog}: interrupted; {on_interrupt}` (what the user can do now) and gives
    130. Any other exception is a bug and keeps its traceback.
    """
    try:
        return work()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {on_interrupt}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        message = describe_error(e)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


def run_parsed(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    work: Callable[[argparse.Namespace], int],
    *,
    on_interrupt: str,
    tensorflow: bool = False,
) -> int:
    """Parse `argv` (bad arguments: one line, exit 2) and `run_command` `work(args)`; with
    `tensorflow`, TensorFlow and LiteRT are loaded quietly first (after the arguments are checked)."""
    args = parser.parse_args(argv)

    def job() -> int:
        if tensorflow:
            import_tensorflow_quietly()
            quiet_litert_notice()
        return work(args)

    return run_command(parser.prog, job, on_interrupt=on_interrupt)


# --------------------------------------------------------------------------- LiteRT


def quiet_litert_notice() -> None:
    """Keep LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." off the terminal.

    LiteRT's C++ core prints it once per process on the first interpreter's tensor
    allocation, straight to file descriptor 2 (TF_CPP_MIN_LOG_LEVEL does not reach it), so
    the first `allocate_tensors()` runs with descriptor 2 pointed at /dev/null; its errors
    still arrive as Python exceptions. Idempotent; does nothing without LiteRT.
    """
    try:
        Interpreter = interpreter_class()
    except LiteRTMissingError:
        return
    if getattr(Interpreter, "_phonefit_quiet", False):
        return
    original = Interpreter.allocate_tensors

    def allocate_tensors(self: Any, *args: Any, **kwargs: Any) -> Any:
        Interpreter.allocate_tensors = original  # only the first allocation prints the notice
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
                return original(self, *args, **kwargs)
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    Interpreter.allocate_tensors = allocate_tensors
    Interpreter._phonefit_quiet = True

