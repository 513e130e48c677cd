"""The project's own errors: each carries one line a user can act on."""


class SqueezeError(Exception):
    """Base class: str(err) is the one-line message shown to the user."""

    kind = "error"


class ModelError(SqueezeError):
    kind = "model"


class RecipeError(SqueezeError):
    """A recipe (or one step of it) is invalid. `field` names the offending field, if any."""

    kind = "recipe"

    def __init__(self, message: str, field: str | None = None, step: int | None = None):
        where = ""
        if step is not None:
            where += f"step {step + 1}: "
        super().__init__(where + message)
        self.field = field
        self.step = step


class DataError(SqueezeError):
    kind = "data"


class LedgerError(SqueezeError):
    """The run ledger cannot be opened (a damaged file, a data folder that is not a folder)."""
    kind = "ledger"


class ExportError(SqueezeError):
    kind = "export"


class Cancelled(SqueezeError):
    kind = "cancelled"

    def __init__(self, message: str = "cancelled by the user"):
        super().__init__(message)


class PreflightError(SqueezeError):
    """A job this machine cannot hold (RAM, disk), refused before it starts."""
    kind = "resources"
