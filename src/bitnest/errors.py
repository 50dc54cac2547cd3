"""User-facing errors: one clear line, no traceback (the CLI prints `bitnest: error: <msg>`)."""


class BitnestError(Exception):
    """Bad input or an unrecoverable condition the user can fix; the message is one line."""
