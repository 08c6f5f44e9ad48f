"""User-facing errors: one clear line, exit code 2, no traceback unless --debug."""


class DistillError(Exception):
    """A problem with the user's input (recipe, data, model path); the CLI prints it as one line."""
