"""The type of the errors a user can cause, and fix.

`llmc` (llmc/cli.py) prints an LlmcError as one line, "llmc: error: <message>", and exits 1; every other exception
is a bug in llmc and keeps its traceback. So a message says what went wrong and what to do, in one line, and a
check that only llmc's own code can fail raises a plain exception instead.

A leaf module (it imports nothing) beside the contract and the targets: every stage, models/ included, may raise
these without importing a stage above it.
"""


class LlmcError(Exception):
    """Something the user gave (a command-line option, a model, a checkpoint, a bundle, a prompt, the host) that
    llmc cannot use; the message says why and what to give instead."""


class UsageError(LlmcError, ValueError):
    """A value the user gave is not one llmc accepts: an option, a name, a dtype, a file. Also a ValueError, as
    the plain errors it replaces were, so callers that catch ValueError still do."""
