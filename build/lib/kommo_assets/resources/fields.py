"""What the resources' settings share: the validation of a value read from its environment variable.

``build_resources`` hands each resource the variable's text (or a ``dg.EnvVar`` that Dagster resolves when
a run or tick starts); the resource's validators turn it into a value or fail naming the variable. Errors
never quote the value of a secret: the resources hide their inputs in validation errors.
"""

from typing import Any

import dagster as dg
from pydantic import ConfigDict

from kommo_assets.settings import ConfigError, positive_number

# Validation errors name the field and the message, never the value (a token or a database password).
HIDE_INPUTS = ConfigDict(hide_input_in_errors=True)


def unresolved(value: Any) -> bool:
    """A ``dg.EnvVar`` not yet resolved: its text is the variable's name, validated once Dagster resolves it."""
    return isinstance(value, dg.EnvVar)


def positive(variable: str, value: Any) -> Any:
    """A finite number above 0 (from a number or the variable's text), or a ConfigError naming ``variable``."""
    return value if unresolved(value) else positive_number(variable, value)


def no_control_characters(variable: str, value: Any) -> Any:
    """Rejects a secret holding CR, LF, tab or another control character, without showing it: sent in a
    header it would make ``requests`` raise an error that quotes it, escaped."""
    if unresolved(value) or value is None:
        return value
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ConfigError(f"{variable} contains a control character (CR, LF, tab...): copy the value again "
                          "without line breaks or spaces around it")
    return value
