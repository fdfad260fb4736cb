"""A method's own settings, read from the dataclass it declares (``PruningMethod.Settings``): the
fields and their types, a one-line description, and settings parsed from ``name=value`` text. The
CLI's ``--<method>-<field>`` flags and the app's method-settings box are both generated from here,
so a method's settings reach both without editing either."""

from __future__ import annotations

import dataclasses

from stat_core.methods.registry import get_method


def setting_kind(field: dataclasses.Field) -> type:
    """The Python type one value of a settings field parses to (``int | None`` parses as int; other
    unions and names as str)."""
    names = [part.strip() for part in str(field.type).split("|") if part.strip() != "None"]
    return {"bool": bool, "int": int, "float": float}.get(names[0] if len(names) == 1 else "", str)


def setting_fields(method: str) -> list[dataclasses.Field]:
    """The fields of ``method``'s settings (empty when it has none)."""
    settings = get_method(method).Settings
    return [] if settings is None else list(dataclasses.fields(settings))


def setting_choices(field: dataclasses.Field) -> tuple | None:
    """The values a text field takes, when its dataclass names them (``metadata={"choices": ...}``)."""
    choices = field.metadata.get("choices")
    return tuple(choices) if choices else None


def _as_text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def settings_text(method: str, values: dict) -> str:
    """The ``name=value`` text (:func:`settings_from_text` reads it back) of the settings whose value in
    ``values`` (field name → value, as typed controls give them: a float for a whole number, ``None``
    for an empty number box) differs from the default; "" when all are defaults."""
    parts = []
    for f in setting_fields(method):
        value = values.get(f.name, f.default)
        if value is None or value == "":
            continue  # an empty control: the default
        if setting_kind(f) is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if value != f.default:
            parts.append(f"{f.name}={_as_text(value)}")
    return ", ".join(parts)


def settings_help(method: str) -> str:
    """One line naming every setting of ``method`` with its default, e.g. ``search=0, output_prior=False``."""
    fields = setting_fields(method)
    label = get_method(method).label
    if not fields:
        return f"{label} has no settings of its own."
    return f"{label}: " + ", ".join(f"{f.name}={f.default}" for f in fields)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_setting(method: str, field: dataclasses.Field, text: str):
    """One value of ``field`` from its text; ValueError (one sentence) when it is not of the field's type."""
    kind, value, label = setting_kind(field), text.strip(), get_method(method).label
    if kind is bool:
        if value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{label}'s {field.name} is true or false, got {value!r}.")
    if value.lower() == "none" and field.default is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{label}'s {field.name} takes {'a whole number' if kind is int else 'a number'}, "
                         f"got {value!r}.") from None


def settings_from_text(method: str, text: str | None):
    """``method``'s settings from ``name=value`` pairs separated by commas or new lines (None when the
    text is empty). ValueError, one sentence, for an unknown name, a bad value or a value the
    settings refuse."""
    pairs = [part.strip() for line in (text or "").splitlines() for part in line.split(",") if part.strip()]
    if not pairs:
        return None
    fields = {f.name: f for f in setting_fields(method)}
    label = get_method(method).label
    if not fields:
        raise ValueError(f"{label} has no settings of its own; clear the method settings or choose another method.")
    given = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise ValueError(f"{pair!r} is not a setting of {label}; write name=value with one of: "
                             f"{', '.join(fields)}.")
        given[name] = parse_setting(method, fields[name], value)
    settings = get_method(method).Settings(**given)
    get_method(method).check_settings(settings)
    return settings


__all__ = ["parse_setting", "setting_fields", "setting_kind", "settings_from_text", "settings_help"]
