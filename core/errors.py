"""The one error type the CLI turns into a one-line message and exit code 2."""


class BenchError(Exception):
    """Bad input or an unusable artifact: reported as one line, exit 2, nothing written."""
