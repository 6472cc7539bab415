"""Errors that are the user's to fix: the entry points print them as one ``error: ...`` line."""


class UserError(Exception):
    """A mistake in the user's input (config, files, flags); the message says what and where."""


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message names the key and what to set."""


def guarded(main):
    """Wraps an absl ``main`` so that a user's mistake ends as one ``error: ...`` line on stderr and
    exit status 1; anything else (a bug) keeps its traceback."""
    import functools
    import sys

    @functools.wraps(main)
    def run(argv):
        try:
            return main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return run
