"""Selection cuts on catalogues: the paper's presets and a small safe expression language.

Presets (:data:`PRESETS`, paper Wang et al. 2022)
-------------------------------------------------
``eq5`` (cross-validation sample, Eq. 5)
    ``snr_lamost > 35 and snr_muse > 80``.  ``snr_lamost`` is the LAMOST S/N
    per pixel of the matched LAMOST spectrum (put it in the catalogue, e.g.
    after a cross-match; the paper notes SNR > 35 ~ SNR_g > 23).
``eq6`` (bulge spectra, Eq. 6)
    ``snr_muse > 80 and corr_flux > 0.85``, then for repeated observations of
    one star (same ``stellar_id``) only the row with the highest ``corr_flux``
    is kept.  The paper's SNR is over lambda > 5991 A: fit bulge-mode spectra
    (``prepare --mode bulge``), whose ``snr_muse`` is over those pixels.
``eq8`` (abundance analysis, Eq. 8)
    ``fe_h > -1.5 and teff > 4300 and mg_fe_gradcorr > 0.65 and red_chi2 < 20``.
``reliable`` (labels to trust: Eq. 5 + Eq. 8 + clean flags and extraction)
    ``snr_muse > 80 and red_chi2 < 20 and teff > 4300 and fit_flags == 0``, and, where the
    columns exist, ``X_flag == 1`` for every label (Eq. 4) and ``ext_status == 'ok'``.

Expression language
-------------------
Custom cuts are strings such as ``"teff > 4300 and (logg < 3.5 or fe_h_flag == 1)"``.
They are parsed with :mod:`ast` and evaluated by a small interpreter over the
table's columns; nothing is passed to ``eval``.  Allowed:

* column names (any column of the table) and the constants ``nan``, ``inf``,
  ``true``/``false`` (also ``True``/``False``);
* numbers and quoted strings (for comparisons with string columns, e.g.
  ``status == 'ok'``);
* comparisons ``< <= > >= == !=`` (chains like ``4000 < teff < 7000`` work);
* ``and``, ``or``, ``not`` (element-wise) and ``&``, ``|``, ``~``;
* arithmetic ``+ - * / ** %`` and unary minus;
* functions :data:`FUNCTIONS`: ``abs``, ``isfinite``, ``isnan``, ``sqrt``,
  ``log10``, ``exp``, ``minimum``, ``maximum`` and ``bit(column, k)`` (true
  where bit ``k`` of an integer flag column is set).

Anything else (attribute access, subscripts, lambdas, comprehensions, other
calls) raises :class:`SelectionError` before evaluation.  Masked or
non-finite values never pass a comparison.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

__all__ = [
    "SelectionError",
    "Preset",
    "PRESETS",
    "FUNCTIONS",
    "parse_expression",
    "evaluate",
    "best_per_star",
    "select",
]


class SelectionError(ValueError):
    """An expression that is not allowed, refers to a missing column, or fails."""


@dataclass(frozen=True)
class Preset:
    """A named selection.

    ``optional`` holds ``(column, clause)`` pairs ANDed to ``expression`` when the table has
    that column (extraction columns exist only for spectra from cubes; ``X_flag`` only for the
    model's labels), so one preset serves every catalogue without passing rows it cannot check.

    Attributes
    ----------
    name : str
        Registry name (``eq5``, ``eq6``, ``eq8``, ``reliable``).
    equation : str
        Where in the paper the cut comes from (e.g. ``"Eq. 5"``).
    expression : str
        The fixed cut, in the expression language of this module.
    best_per_star : bool
        Keep only the best row per star (highest ``corr_flux``) after the cuts.
    description : str
        Human-readable description with units.
    optional : tuple of (str, str)
        ``(column, clause)`` pairs used when the table has the column.
    """

    name: str
    equation: str
    expression: str
    best_per_star: bool
    description: str
    optional: tuple = ()

    def expression_for(self, table) -> str:
        """The expression applied to ``table``: the fixed part plus the optional clauses it can check.

        Parameters
        ----------
        table : astropy.table.Table
            The catalogue to be selected from (only its column names are used).

        Returns
        -------
        str
            Clauses joined with ``and``.
        """
        cols = set(table.colnames)
        extra = [clause for col, clause in self.optional if col in cols]
        return " and ".join([self.expression, *extra])


_PRESETS: dict[str, Preset] = {
    "eq5": Preset("eq5", "Eq. 5", "snr_lamost > 35 and snr_muse > 80", False,
                  "LAMOST-MUSE cross-validation sample: SNR_LAMOST > 35 /pix, SNR_MUSE > 80 /pix"),
    "eq6": Preset("eq6", "Eq. 6", "snr_muse > 80 and corr_flux > 0.85", True,
                  "bulge spectra: SNR_MUSE (lambda > 5991 A) > 80 and corr_flux > 0.85; "
                  "repeats of a star: the one with the highest corr_flux"),
    "eq8": Preset("eq8", "Eq. 8", "fe_h > -1.5 and teff > 4300 and mg_fe_gradcorr > 0.65 and red_chi2 < 20",
                  False, "abundance analysis: [Fe/H] > -1.5, Teff > 4300 K, [Mg/Fe] gradcorr > 0.65, chi2 < 20"),
}
_PRESETS["reliable"] = Preset(
    "reliable", "Eq. 5 + Eq. 8 + flags",
    "snr_muse > 80 and red_chi2 < 20 and teff > 4300 and fit_flags == 0", False,
    "labels to trust: SNR_MUSE > 80 /pix (the MUSE part of Eq. 5), red_chi2 < 20 and Teff > 4300 K (Eq. 8), "
    "no fit flag (fit_flags == 0: converged inside the bounds, red_chi2_model < 3, S/N >= 20, not blended, "
    "no unmodelled neighbour found in the extraction residual (HIDDEN_NEIGHBOUR), "
    "errors below 250 K / 0.5 / 0.25 dex, no catastrophic misfit (MISFIT), labels where the model's training "
    "stars are not sparse (SPARSE_LABELS)), "
    "every computed per-label gradient flag X_flag == 1 (Eq. 4) and, "
    "for spectra from cubes, extraction status ok. Eq. 8's [Fe/H] > -1.5 and [Mg/Fe] gradcorr cuts select "
    "the paper's abundance sample, not reliable rows, and are left out",
    optional=(("ext_status", "ext_status == 'ok'"), ("teff_flag", "teff_flag == 1"),
              ("logg_flag", "logg_flag == 1"), ("fe_h_flag", "fe_h_flag == 1"), ("mg_fe_flag", "mg_fe_flag == 1")))
_PRESETS["crossval"] = _PRESETS["eq5"]
_PRESETS["bulge"] = _PRESETS["eq6"]
_PRESETS["abundance"] = _PRESETS["eq8"]
#: Read-only registry of the paper's cuts (aliases: crossval, bulge, abundance).
PRESETS = MappingProxyType(_PRESETS)


def _bit(col, k):
    arr = np.asarray(col)
    if not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_):
        raise SelectionError("bit(column, k) needs an integer column")
    kk = np.asarray(k)
    if kk.ndim != 0 or not np.isfinite(kk) or float(kk) != int(kk) or not 0 <= int(kk) < 63:
        raise SelectionError(f"bit(column, k) needs a whole number k from 0 to 62, got {kk.tolist()!r}")
    return (arr.astype(np.int64) >> int(kk)) & 1 == 1


#: Functions callable in expressions (read-only).
FUNCTIONS = MappingProxyType({
    "abs": np.abs,
    "isfinite": np.isfinite,
    "isnan": np.isnan,
    "sqrt": np.sqrt,
    "log10": np.log10,
    "exp": np.exp,
    "minimum": np.minimum,
    "maximum": np.maximum,
    "bit": _bit,
})

_CONSTANTS = {"nan": np.nan, "inf": np.inf, "true": True, "false": False}

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.Mod: operator.mod,
    ast.BitAnd: np.logical_and, ast.BitOr: np.logical_or,
}
_CMPOPS = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}
_MAX_LEN = 2000
_MAX_DEPTH = 200  # nesting of an expression (the evaluator recurses once per level)


def _depth(tree) -> int:
    """Nesting depth of an AST, computed without recursion."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((child, d + 1) for child in ast.iter_child_nodes(node))
    return deepest


def parse_expression(expr: str) -> ast.Expression:
    """Parse and validate ``expr``; raises :class:`SelectionError` on anything not allowed.

    Parameters
    ----------
    expr : str
        The expression (at most 2000 characters).

    Returns
    -------
    ast.Expression
        The validated syntax tree.

    Raises
    ------
    SelectionError
        For an empty, too long or unparsable string, or any node, constant or call not allowed.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise SelectionError("empty selection expression")
    if len(expr) > _MAX_LEN:
        raise SelectionError(f"selection expression longer than {_MAX_LEN} characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as exc:
        raise SelectionError(f"cannot parse {expr!r}: {exc.msg}") from None
    except (RecursionError, MemoryError):
        raise SelectionError(f"selection expression nested too deeply (at most {_MAX_DEPTH} levels)") from None
    if _depth(tree) > _MAX_DEPTH:
        raise SelectionError(f"selection expression nested too deeply (at most {_MAX_DEPTH} levels)")
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub,
                               ast.UAdd, ast.Invert, ast.BinOp, ast.Compare, ast.Name, ast.Load, ast.Call,
                               ast.Constant)) or type(node) in _BINOPS or type(node) in _CMPOPS
        if not ok:
            raise SelectionError(f"{type(node).__name__} is not allowed in a selection expression: {expr!r}")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str, bool)):
            raise SelectionError(f"constant {node.value!r} is not allowed")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                raise SelectionError(f"only plain calls like abs(x) are allowed, not {ast.unparse(node.func)!r}")
            if node.func.id not in FUNCTIONS:
                name = node.func.id
                raise SelectionError(f"function {name!r} is not allowed; allowed: {sorted(FUNCTIONS)}")
            if node.keywords:
                raise SelectionError("keyword arguments are not allowed")
    return tree


def _column(table, name):
    col = table[name]
    data = np.asarray(col)
    if data.dtype.kind == "S":  # FITS string columns come back as bytes
        data = np.char.decode(data, "utf-8", errors="replace")
    mask = getattr(col, "mask", None)
    if mask is not None and np.any(mask):
        if np.issubdtype(data.dtype, np.floating):
            data = np.where(np.asarray(mask), np.nan, data)
        elif np.issubdtype(data.dtype, np.integer):
            data = np.where(np.asarray(mask), np.nan, data.astype(float))
    return data


def _eval(node, table):
    if isinstance(node, ast.Expression):
        return _eval(node.body, table)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, int) and not isinstance(node.value, bool):
            try:
                return float(node.value)  # numbers are floats: no unbounded integer arithmetic
            except OverflowError:
                raise SelectionError(f"number too large: {node.value}") from None
        return node.value
    if isinstance(node, ast.Name):
        if node.id in table.colnames:
            return _column(table, node.id)
        if node.id.lower() in _CONSTANTS:
            return _CONSTANTS[node.id.lower()]
        raise SelectionError(f"unknown column {node.id!r}; columns: {', '.join(table.colnames)}")
    if isinstance(node, ast.BoolOp):
        vals = [np.asarray(_eval(v, table), dtype=bool) for v in node.values]
        fn = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
        out = vals[0]
        for v in vals[1:]:
            out = fn(out, v)
        return out
    if isinstance(node, ast.UnaryOp):
        v = _eval(node.operand, table)
        if isinstance(node.op, (ast.Not, ast.Invert)):
            return np.logical_not(np.asarray(v, dtype=bool))
        return -np.asarray(v) if isinstance(node.op, ast.USub) else np.asarray(v)
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](np.asarray(_eval(node.left, table)), np.asarray(_eval(node.right, table)))
    if isinstance(node, ast.Compare):
        left = np.asarray(_eval(node.left, table))
        out = None
        for op, comp in zip(node.ops, node.comparators):
            right = np.asarray(_eval(comp, table))
            res = np.asarray(_CMPOPS[type(op)](left, right), dtype=bool)
            out = res if out is None else np.logical_and(out, res)
            left = right
        return out
    if isinstance(node, ast.Call):
        args = [_eval(a, table) for a in node.args]
        return FUNCTIONS[node.func.id](*args)
    raise SelectionError(f"{type(node).__name__} is not allowed")  # pragma: no cover (parse rejects it)


def evaluate(table, expr: str) -> np.ndarray:
    """Boolean row mask of ``table`` where ``expr`` is true (see the module docstring).

    Parameters
    ----------
    table : astropy.table.Table
        The catalogue; masked and non-finite values never pass a comparison.
    expr : str
        The expression.

    Returns
    -------
    numpy.ndarray
        bool, shape (len(table),).

    Raises
    ------
    SelectionError
        If the expression is not allowed, names a missing column, fails to evaluate or does not
        give a boolean per row.
    """
    tree = parse_expression(expr)
    try:
        with np.errstate(all="ignore"):
            res = _eval(tree, table)
    except SelectionError:
        raise
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise SelectionError(f"cannot evaluate {expr!r}: {exc}") from None
    res = np.asarray(res)
    if res.dtype != bool:
        raise SelectionError(f"{expr!r} does not give true/false per row (use a comparison)")
    return np.broadcast_to(res, (len(table),)).copy()


def best_per_star(table, id_col: str = "stellar_id", by: str = "corr_flux", rows=None) -> np.ndarray:
    """Boolean mask keeping, per ``id_col`` value, the row with the highest ``by`` (Eq. 6).

    Only rows where ``rows`` is true (default: all) compete; rows whose ``by``
    is not finite never win.  Ties keep the first row.

    Parameters
    ----------
    table : astropy.table.Table
        The catalogue.
    id_col : str, optional
        Star identifier column (compared as strings).
    by : str, optional
        Score column (default ``corr_flux``).
    rows : array_like of bool, optional
        Rows that compete (default all).

    Returns
    -------
    numpy.ndarray
        bool, shape (len(table),).

    Raises
    ------
    SelectionError
        If ``id_col`` or ``by`` is missing.
    """
    for c in (id_col, by):
        if c not in table.colnames:
            raise SelectionError(f"best-per-star needs column {c!r}")
    n = len(table)
    rows = np.ones(n, bool) if rows is None else np.asarray(rows, bool)
    score = np.asarray(table[by], dtype=float)
    ok = rows & np.isfinite(score)
    keep = np.zeros(n, bool)
    ids = np.asarray(table[id_col]).astype(str)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return keep
    order = idx[np.lexsort((-score[idx], ids[idx]))]  # by id, then descending score, stable
    first = np.ones(order.size, bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    keep[order[first]] = True
    return keep


def select(table, expr: str | None = None, preset: str | None = None, *, best: bool | None = None,
           id_col: str = "stellar_id", by: str = "corr_flux"):
    """Rows of ``table`` passing a preset and/or an expression (both: AND).

    ``best`` (default: the preset's own setting) keeps one row per star, the
    one with the highest ``by``, among the rows that pass the cuts.  Returns a
    new table whose ``meta['selection']`` records what was applied.

    Parameters
    ----------
    table : astropy.table.Table
        The catalogue (not modified).
    expr : str, optional
        A cut in the expression language.
    preset : str, optional
        A key of :data:`PRESETS` (case-insensitive).
    best : bool, optional
        Override the preset's best-per-star setting.
    id_col : str, optional
        Star identifier column for best-per-star.
    by : str, optional
        Score column for best-per-star.

    Returns
    -------
    astropy.table.Table
        The selected rows; ``meta['selection']`` says what was applied (``"all rows"`` for nothing).

    Raises
    ------
    SelectionError
        For an unknown preset, or as :func:`evaluate` and :func:`best_per_star`.
    """
    mask = np.ones(len(table), bool)
    applied = []
    use_best = False
    if preset is not None:
        key = preset.lower()
        if key not in PRESETS:
            raise SelectionError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        p = PRESETS[key]
        pexpr = p.expression_for(table)
        mask &= evaluate(table, pexpr)
        applied.append(f"{p.name} ({p.equation}): {pexpr}")
        use_best = p.best_per_star
    if expr:
        mask &= evaluate(table, expr)
        applied.append(expr)
    if best is not None:
        use_best = best
    if use_best:
        mask &= best_per_star(table, id_col, by, rows=mask)
        applied.append(f"best {by} per {id_col}")
    out = table[mask]
    out.meta = dict(table.meta)
    out.meta["selection"] = " AND ".join(applied) if applied else "all rows"
    return out
