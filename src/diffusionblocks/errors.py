"""The one exception the package raises for input a user can fix (the lowest layer: everything may import it)."""


class ConfigError(ValueError):
    """A configuration, data path, checkpoint or argument that cannot be used, with a message naming it."""
