"""Errors that mean a caller asked for something that cannot be done, not a bug: the CLI says them in one line."""


class OptionsError(ValueError):
    """Options that each look valid but cannot go together, or do not fit the model they are applied to."""


__all__ = ["OptionsError"]
