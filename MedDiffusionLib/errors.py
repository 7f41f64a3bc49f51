"""Exceptions that user-facing code (CLI, server, Slicer module) turns into clear messages."""


class MedDiffusionError(Exception):
    """Base class: the message is meant for the user, without a traceback."""


class CheckpointError(MedDiffusionError):
    """A checkpoint file is missing, unreadable, unsafe, or does not match the expected network."""


class InputError(MedDiffusionError, ValueError):
    """A user-supplied value (anatomy, size, steps, volume, path...) is invalid."""


class Cancelled(MedDiffusionError):
    """The user cancelled a running job."""
