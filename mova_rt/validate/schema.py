"""Field rules for JSON documents and flags, and a JSON reader that cannot hang or blow up.

A rule says what a value must be (`want`, a phrase used in the message) and finds the first
offending value inside it (`find`). `check(doc, rule, file, fix)` raises one MovaInputError:

    video_dit/config.json: field 'num_heads' is 0 (a number), expected an integer from 1 to 1024:
    <fix>

Numbers are finite and in range (JSON allows NaN and Infinity, and Python's json reads them);
booleans are not numbers and numbers are not booleans (`True == 1` in Python).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat

from ..errors import MovaInputError

MAX_JSON_BYTES = 64 << 20     # a results file with every op row is ~1 MB; configs are a few KB
MAX_JSON_DEPTH = 32           # the deepest document mova-rt writes (a results file) has depth 6


def show(value) -> str:
    """A short display of a JSON value with its kind: `"abc" (a string)`, `NaN (a number)`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if isinstance(value, (int, float)):
        text = repr(value) if math.isfinite(value) else {
            "nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}[repr(float(value))]
        return f"{text[:40]} (a number)"
    kind = {str: "a string", list: "a list", dict: "a mapping"}.get(type(value),
                                                                    type(value).__name__)
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        text = "..."
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({kind})"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bound(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


class Rule:
    want = "a value"

    def find(self, value, path: str):
        """(path, value, want) of the first value that breaks the rule, or None."""
        return None if self.ok(value) else (path, value, self.want)

    def ok(self, value) -> bool:
        return True


class Any(Rule):
    pass


class Int(Rule):
    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo, self.hi = lo, hi
        if lo == 0 and hi is not None:
            self.want = f"an integer, 0 or more, at most {hi}"
        elif lo is not None and hi is not None:
            self.want = f"an integer of at least {lo} and at most {hi}"
        elif lo is not None:
            self.want = f"an integer of at least {lo}"
        else:
            self.want = "an integer"

    def ok(self, v) -> bool:
        # 4.0 is refused too: the code downstream indexes and loops with these values
        return (isinstance(v, int) and not isinstance(v, bool)
                and (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi))


class Real(Rule):
    """A finite number in [lo, hi] (or an open end: lo_open / hi_open)."""

    def __init__(self, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        if lo is None and hi is None:
            self.want = "a finite number"
        elif hi is None:
            self.want = f"a finite number {'above' if lo_open else 'of at least'} {_bound(lo)}"
        else:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            self.want = f"a finite number in {left}{_bound(lo)}, {_bound(hi)}{right}"

    def ok(self, v) -> bool:
        if not _is_number(v):
            return False
        try:
            x = float(v)
        except OverflowError:     # an integer beyond float range
            return False
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return not (self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)))


class Bool(Rule):
    want = "true or false"

    def ok(self, v) -> bool:
        return isinstance(v, bool)


class Str(Rule):
    def __init__(self, choices=None, pattern: str | None = None, max_len: int = 4096,
                 want: str | None = None):
        self.choices = tuple(choices) if choices is not None else None
        self.pattern = re.compile(pattern) if pattern else None
        self.max_len = max_len
        if want:
            self.want = want
        elif self.choices:
            self.want = "one of " + ", ".join(f"'{c}'" for c in self.choices)
        else:
            self.want = "a string"

    def ok(self, v) -> bool:
        return (isinstance(v, str) and len(v) <= self.max_len and "\x00" not in v
                and (self.choices is None or v in self.choices)
                and (self.pattern is None or self.pattern.fullmatch(v) is not None))


class Nullable(Rule):
    def __init__(self, rule: Rule):
        self.rule = rule
        self.want = f"null or {rule.want}"

    def find(self, value, path):
        if value is None:
            return None
        hit = self.rule.find(value, path)
        return hit if hit is None or hit[0] != path else (path, value, self.want)


class Either(Rule):
    def __init__(self, *rules: Rule):
        self.rules = rules
        self.want = " or ".join(r.want for r in rules)

    def find(self, value, path):
        if any(r.find(value, path) is None for r in self.rules):
            return None
        return path, value, self.want


class List(Rule):
    def __init__(self, item: Rule, min_len: int = 0, max_len: int = 1 << 20):
        self.item, self.min_len, self.max_len = item, min_len, max_len
        size = (f"exactly {min_len}" if min_len == max_len else
                f"{min_len} to {max_len}" if max_len < 1 << 20 else f"at least {min_len}")
        self.want = f"a list of {size} entries, each {item.want}"

    def find(self, value, path):
        if not isinstance(value, list) or not self.min_len <= len(value) <= self.max_len:
            return path, value, self.want
        for i, v in enumerate(value):
            hit = self.item.find(v, f"{path}[{i}]")
            if hit:
                return hit
        return None


class Tuple(Rule):
    """A list of fixed length whose entries follow their own rules."""

    def __init__(self, *items: Rule, want: str):
        self.items, self.want = items, want

    def find(self, value, path):
        if not isinstance(value, list) or len(value) != len(self.items):
            return path, value, self.want
        for i, (rule, v) in enumerate(zip(self.items, value)):
            hit = rule.find(v, f"{path}[{i}]")
            if hit:
                return hit
        return None


class Missing(Exception):
    """A required field is absent (check() turns it into the message)."""

    def __init__(self, path: str, want: str):
        super().__init__(path)
        self.path, self.want = path, want


class Obj(Rule):
    """A mapping with known fields; `required` must be present; `when(doc)` names more required
    fields that depend on other values (e.g. a row with step times needs its rates). Unknown
    fields are left alone: they belong to other tools (diffusers, transformers)."""

    def __init__(self, fields: dict, required=(), when=None, want: str = "a mapping"):
        self.fields, self.required, self.when, self.want = fields, tuple(required), when, want

    def find(self, value, path):
        if not isinstance(value, dict):
            return path, value, self.want
        self._require(value, path, self.required)
        for name, rule in self.fields.items():
            if name in value:
                hit = rule.find(value[name], _join(path, name))
                if hit:
                    return hit
        # after the types: what `when` needs depends on values now known to be well formed
        self._require(value, path, self.when(value) if self.when else ())
        return None

    def _require(self, value: dict, path: str, names) -> None:
        for name in names:
            if name not in value:
                raise Missing(_join(path, name), self.fields.get(name, Any()).want)


class MapOf(Rule):
    """A mapping with free string keys (units, artifacts, components) of one kind of value."""

    def __init__(self, value: Rule, key: Rule | None = None, max_len: int = 1 << 20):
        self.value, self.key, self.max_len = value, key or Str(max_len=512), max_len
        self.want = f"a mapping of names to {value.want}" if len(value.want) < 60 else \
            "a mapping of names to entries"

    def find(self, value, path):
        if not isinstance(value, dict) or len(value) > self.max_len:
            return path, value, self.want
        for k, v in value.items():
            if not self.key.ok(k):
                return _join(path, str(k)[:60]), k, f"a name that is {self.key.want}"
            hit = self.value.find(v, _join(path, k))
            if hit:
                return hit
        return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else str(name)


def check(doc, rule: Rule, file: str, fix: str, field_word: str = "field") -> None:
    """Raises MovaInputError at the first value of `doc` that breaks `rule`, naming `file`, the
    field, what it is and what it must be, then `fix`."""
    try:
        hit = rule.find(doc, "")
    except Missing as m:
        parent, _, name = m.path.rpartition(".")
        inside = f" in '{parent}'" if parent else ""
        raise MovaInputError(f"{file} lacks '{name}'{inside} ({m.want}): {fix}") from None
    if hit:
        path, value, want = hit
        where = f"{field_word} '{path}'" if path else "the document"
        raise MovaInputError(f"{file}: {where} is {show(value)}, expected {want}: {fix}")


# ---------------------------------------------------------------------------------------------
# Reading JSON
# ---------------------------------------------------------------------------------------------
def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: str, what: str, fix: str) -> os.stat_result:
    """stat of `path`, which must be a regular file (a FIFO or a device would be read forever)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise MovaInputError(f"cannot read {what} {path} ({e.strerror or e}): {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise MovaInputError(f"{what} {path} is {file_kind(st.st_mode)}, not a regular file: "
                             f"{fix}")
    return st


def depth(doc) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion limit to hit)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in v)
    return deepest


def read_json(path: str, what: str, fix: str, missing: str | None = None):
    """The JSON document in `path`, refused in one line when the file is missing (`missing`, or
    a generic message), not a regular file, larger than MAX_JSON_BYTES, not UTF-8 JSON, or nested
    deeper than MAX_JSON_DEPTH."""
    if missing is not None and not os.path.lexists(path):
        raise MovaInputError(missing)
    st = regular_file(path, what, fix)
    if st.st_size > MAX_JSON_BYTES:
        raise MovaInputError(f"{what} {path} is {st.st_size} bytes, more than any such file "
                             f"({MAX_JSON_BYTES >> 20} MiB): {fix}")
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read(MAX_JSON_BYTES + 1).decode("utf-8"))
    except RecursionError:
        raise MovaInputError(f"{what} {path} is nested too deeply (past Python's recursion "
                             f"limit): {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:120]
        raise MovaInputError(f"{what} {path} is unreadable (cannot parse it: {reason}): "
                             f"{fix}") from None
    if depth(data) > MAX_JSON_DEPTH:
        raise MovaInputError(f"{what} {path} is nested {depth(data)} levels deep, more than any "
                             f"such file ({MAX_JSON_DEPTH}): {fix}")
    return data
