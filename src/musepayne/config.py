"""Frozen configuration dataclasses from mappings (TOML/JSON files, CLI options) and back.

Every stage is configured by a frozen dataclass (:class:`~musepayne.extract.ExtractConfig`,
:class:`~musepayne.prepare.PrepareConfig`, :class:`~musepayne.fit.FitConfig`, ...).
:func:`from_mapping` builds one from a plain mapping and validates it completely before
any work starts: unknown keys are refused (with the known ones listed), every value must
have its field's type (``bool`` is not a number, ``"high"`` is not a float, integers
must be integral), and the dataclass's own ``__post_init__`` then checks ranges.  Every
problem becomes one :class:`ConfigError` that names the section and the key.
:func:`to_mapping` gives the JSON-ready mapping that :func:`from_mapping` reads back.

This module is at the bottom of the package: it imports nothing from musepayne but
:mod:`musepayne.instrument.lsf` (LSF specifications are the one non-scalar option).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from .instrument.lsf import LSF, lsf_from_spec, lsf_to_spec

__all__ = ["ConfigError", "from_mapping", "to_mapping"]


class ConfigError(ValueError):
    """A configuration value or key is invalid (the message names section and key)."""


def _where(section, key=None):
    s = f"[{section}] " if section else ""
    return f"{s}{key}" if key else (section or "configuration")


def _options(hint):
    """The alternatives of a (possibly optional) type hint."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _check_value(value, hint, where):
    """``value`` converted to the field type ``hint``, or ConfigError."""
    opts = _options(hint)
    if value is None:
        if type(None) in opts:
            return None
        raise ConfigError(f"{where}: a value is required (got null)")
    errors = []
    for t in opts:
        if t is type(None):
            continue
        base = typing.get_origin(t) or t
        if base is bool:
            if isinstance(value, bool):
                return value
            errors.append("true or false")
        elif base is int:
            if isinstance(value, bool):
                errors.append("an integer")
            elif isinstance(value, int):
                return value
            elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
                return int(value)
            else:
                errors.append("an integer")
        elif base is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(float(value)):
                    errors.append("a finite number")
                else:
                    return float(value)
            else:
                errors.append("a number")
        elif base is str:
            if isinstance(value, str):
                return value
            errors.append("a string")
        elif base is tuple:
            if isinstance(value, (list, tuple)):
                return tuple(tuple(v) if isinstance(v, list) else v for v in value)
            errors.append("a list")
        elif base is dict:
            if isinstance(value, dict):
                return dict(value)
            errors.append("a table")
        elif dataclasses.is_dataclass(t):  # a nested configuration (a table in a file)
            if isinstance(value, (dict, t)):
                return from_mapping(t, value, where)
            errors.append("a table of options")
        elif base is object or t is LSF:
            # LSF options: an LSF or a specification string (muse, lamost, fwhm=2.7, R=2000, file)
            try:
                return lsf_from_spec(value)
            except (ValueError, TypeError) as exc:
                errors.append(f"an LSF specification ({exc})")
        else:
            errors.append(f"a {getattr(t, '__name__', t)} (cannot be set from a configuration file)")
    raise ConfigError(f"{where}: expected {' or '.join(dict.fromkeys(errors))}, got {value!r}")


def from_mapping(cls, mapping, section: str | None = None):
    """Build the frozen dataclass ``cls`` from ``mapping``, validating every key and value.

    Parameters
    ----------
    cls : type
        A dataclass (for example :class:`~musepayne.fit.FitConfig`).
    mapping : mapping or None
        Option name -> value, as read from TOML/JSON.  Missing options keep their defaults.
    section : str, optional
        Name used in error messages (for example ``"fit"``).

    Returns
    -------
    object
        An instance of ``cls``.

    Raises
    ------
    ConfigError
        Unknown keys, values of the wrong type, or values the dataclass rejects.
    """
    if isinstance(mapping, cls):
        return mapping
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{_where(section)}: expected a table of options, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise ConfigError(f"{_where(section)}: unknown option(s) {', '.join(map(str, unknown))}; "
                          f"known: {', '.join(names)}")
    values = {k: _check_value(v, hints[k], _where(section, k)) for k, v in mapping.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{_where(section)}: {exc}") from None


def _plain(value):
    if isinstance(value, LSF):
        return lsf_to_spec(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_mapping(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def to_mapping(config) -> dict:
    """JSON-ready mapping of a configuration dataclass (nested ones become tables).

    LSFs become their specification strings, so ``from_mapping(type(c), to_mapping(c)) == c``
    for every configuration made from a mapping.
    """
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}
