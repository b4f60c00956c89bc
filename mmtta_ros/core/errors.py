"""The one error type for sensor data that cannot be used."""


class SensorDataError(ValueError):
    """A message or array that cannot be used; the message says what is wrong with it."""
