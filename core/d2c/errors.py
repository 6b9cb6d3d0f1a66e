"""The error types of d2c's user-error contract (d2c.cli) beyond ValueError, in a leaf module so
that the contract can name them without importing what raises them (training, optional extras)."""


class MissingExtra(ImportError):
    """A package of an optional extra is not installed; the message is one line naming it."""


class NonFiniteLoss(FloatingPointError):
    """Training hit a non-finite loss or gradient norm; the message is one line (step, folder),
    and the folder's newest checkpoint is the state just before that step."""
