"""Final-answer extraction and answer equivalence for math problems (the R1 accuracy reward).

Two tiers:

1. :func:`fast_equivalent` -- pure-Python, microseconds. Normalises plain numbers (thousands commas, leading
   zeros, ``+5``, ``25.0``, ``$``/``\\$``, ``^\\circ``, ``%``, trailing ``\\text{}`` units, ``\\boxed{}`` wrappers)
   and compares them exactly as fractions. Most math answers (GSM8K, AIME, ~60% of MATH) are numbers, so this
   decides the common case without sympy. An integer gold answer is always decided here (an expression such as
   ``37+45`` does not count as 82: see :func:`fast_equivalent`). It returns ``None`` when the gold is not a
   plain number, or is a non-integer number and the prediction is not.
2. math-verify (``math_verify.parse`` + ``math_verify.verify``, sympy underneath) for everything else: ``\\frac``
   vs decimals, ``\\sqrt``, intervals, tuples/sets, matrices, equations, complex numbers.

Sympy can hang or blow up on adversarial model output, so bulk scoring should go through
:class:`r1mega.rewards.scorer.RewardScorer`, which runs tier 2 in killable worker processes with a hard timeout.
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction

__all__ = ["extract_answer", "extract_boxed", "fast_equivalent", "is_equivalent", "accuracy_reward"]

logger = logging.getLogger(__name__)

# Longer "answers" are not verified (accuracy 0): real final answers are short (the longest MATH answer, a matrix,
# is ~100 chars); multi-kB answer-tag contents are reasoning put in the wrong place, and slow to parse.
MAX_ANSWER_CHARS = 1000

# math-verify's own timeout uses signal.alarm (integer seconds, main thread only). Inside RewardScorer workers
# the parent enforces a hard wall-clock limit by killing the process, so the workers set this to False.
USE_MATH_VERIFY_ALARM = True
MATH_VERIFY_ALARM_S = 5

# ----------------------------------------------------------------------------------------------------------
# extraction
# ----------------------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")


def _balanced(text: str, start: int) -> int | None:
    """Index one past the ``}`` matching the ``{`` at ``text[start]``; None if unbalanced. ``\\{``/``\\}`` skip."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``; nested braces are balanced.

    ``\\boxed 5`` (no braces) yields ``5``. A truncated last box is skipped in favour of an earlier complete one.
    """
    for m in reversed(list(_BOX_RE.finditer(text))[-8:]):  # bounded: each try scans to the end of the text
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            end = _balanced(text, j)
            if end is not None:
                return text[j + 1 : end - 1].strip()
        elif j > m.end():  # "\boxed 5": the token after the space
            tok = re.match(r"[^\s$]+", text[j:])
            if tok:
                return tok.group(0).rstrip(".")
    return None


def extract_answer(text: str) -> str | None:
    """The model's final answer: content of the LAST ``<answer>...</answer>``, else of the last ``\\boxed{}``.

    Returns None when neither is present (or the last answer tag is empty). An unclosed trailing ``<answer>``
    (a truncated generation) does not count.
    """
    if not text:
        return None
    close = text.rfind("</answer>")
    if close != -1:
        open_ = text.rfind("<answer>", 0, close)
        if open_ != -1:
            content = text[open_ + len("<answer>") : close].strip()
            return content or None
    return extract_boxed(text)


# ----------------------------------------------------------------------------------------------------------
# tier 1: plain numbers
# ----------------------------------------------------------------------------------------------------------

_MATH_WRAP_RE = re.compile(r"^(?:\\\(|\\\[)(.*)(?:\\\)|\\\])$", re.S)
_SPACES_RE = re.compile(r"\\[!,;:> ]|~|\s+")
_TEXT_WRAP_RE = re.compile(r"^\\(?:text|textbf|textrm|mbox|mathrm|mathbf)\{([^{}]*)\}$")
_UNIT_SUFFIX_RE = re.compile(r"(?:\\(?:text|textrm|mbox|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?)+$")
_DEGREE_RE = re.compile(r"\^\{?\\circ\}?|\\circ|°|\\degree")
_ASSIGN_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?=(?!=)")
_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")


def _unwrap_boxed(s: str) -> str:
    for _ in range(4):
        inner = extract_boxed(s) if _BOX_RE.search(s) else None
        if inner is None:
            break
        s = inner
    return s


_MAX_NUMBER_CHARS = 200


def parse_number(s: str) -> Fraction | None:
    """``s`` as an exact number if it is a plain (possibly decorated) number, else None.

    Handles: spaces, ``\\!``/``\\,`` thin spaces, thousands commas (strict groups of 3: ``1,234``; ``1,2`` is a
    tuple, not a number), leading zeros (``025``), ``+5``, ``25.0``, ``.5``, ``$``/``\\$``, ``^\\circ``, ``%``,
    trailing ``\\text{...}`` units, ``\\text{5}``, ``\\boxed{}`` wrappers, a single ``x =`` assignment, a trailing
    full stop, unicode minus.
    """
    if not s or len(s) > _MAX_NUMBER_CHARS:
        return None
    s = _unwrap_boxed(s.strip().strip("*").strip())
    m = _MATH_WRAP_RE.match(s)
    if m:
        s = m.group(1)
    s = s.replace("\\$", "").replace("$", "").replace("\u2212", "-").replace("{,}", ",")
    s = _SPACES_RE.sub("", s)
    s = s.replace("\\left", "").replace("\\right", "")
    for _ in range(2):
        m = _TEXT_WRAP_RE.match(s)
        if m:
            s = m.group(1).strip()
        while len(s) > 2 and s[0] == "{" and s[-1] == "}" and _balanced(s, 0) == len(s):
            s = s[1:-1]
    s = _UNIT_SUFFIX_RE.sub("", s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = _ASSIGN_RE.sub("", s)
    s = s.rstrip(".")
    if not _NUMBER_RE.fullmatch(s):
        return None
    return Fraction(s.replace(",", ""))


_ANSWER_IS_RE = re.compile(r"^(?:so\s*,?\s*)?(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)\s*:?\s*(.+)$", re.I | re.S)
_TRAILING_WORDS_RE = re.compile(r"^([^\s]*\d\.?)\s+((?:[A-Za-z]{3,}(?:\s+|\.?$))+)$")
_NOT_UNITS = {"sqrt", "mod", "times", "over", "plus", "minus", "divided", "squared", "cubed"}


def _numeric_answer(pred: str) -> Fraction | None:
    """A number stated by ``pred``: a plain number (:func:`parse_number`), or one after ``The answer is``, after
    the last ``=`` (``37 + 45 = 82``), or followed by plain unit words (``42 apples``). Never evaluates
    arithmetic: ``37+45`` is not 82 here."""
    p = parse_number(pred)
    if p is not None or len(pred) > _MAX_NUMBER_CHARS:
        return p
    s = pred.strip()
    m = _ANSWER_IS_RE.match(s)
    if m:
        s = m.group(1).strip()
        p = parse_number(s)
        if p is not None:
            return p
    if "=" in s and not any(op in s for op in ("\\le", "\\ge", "<", ">", "\\neq", "\\ne ")):
        p = parse_number(s.rsplit("=", 1)[1])
        if p is not None:
            return p
    m = _TRAILING_WORDS_RE.match(s)
    if m and not (set(m.group(2).lower().split()) & _NOT_UNITS):
        return parse_number(m.group(1))
    return None


def fast_equivalent(pred: str, gold: str) -> bool | None:
    """Decide without sympy when the gold answer is a plain number; None (undecided) otherwise.

    * gold a number, pred states a number (see :func:`_numeric_answer`): exact comparison.
    * gold an INTEGER, pred anything else: False. Deliberately no math-verify here: it evaluates expressions, so
      echoing the question (``37+45`` for "37+45=?", ``\\frac{84}{2}``, ``2^{5}``) would earn the reward -- an
      easy reward hack for RL on arithmetic. An integer answer must be written as an integer. This also keeps
      GSM8K / AIME / arithmetic scoring entirely in the trainer process.
    * gold a non-integer number (``1.25``), pred not a number (``\\frac{5}{4}``): None -> math-verify.
    """
    g = parse_number(gold)
    if g is None:
        return None
    p = _numeric_answer(pred)
    if p is not None:
        return p == g
    if g.denominator == 1:
        return False
    return None


# ----------------------------------------------------------------------------------------------------------
# tier 2: math-verify
# ----------------------------------------------------------------------------------------------------------

_MV_CONFIG = None
_MATH_DELIMS = ("$", "\\(", "\\[", "\\boxed", "\\fbox")


def _mv_config():
    global _MV_CONFIG
    if _MV_CONFIG is None:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig

        _MV_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
    return _MV_CONFIG


def _alarm_timeout() -> int | None:
    """math-verify's signal.alarm timeout when it can work (main thread, not in a scorer worker), else None."""
    if USE_MATH_VERIFY_ALARM and threading.current_thread() is threading.main_thread():
        return MATH_VERIFY_ALARM_S
    return None


def _mv_parse(s: str, timeout: int | None) -> list:
    """math-verify parse of a bare answer string. Bare LaTeX (``\\frac{1}{2}``) has no math delimiters, and
    math-verify's LaTeX extraction only looks inside ``$..$``/``\\boxed{}``/..., so wrap it; without the wrap
    its plain-number extraction would read ``2\\sqrt{2}`` as ``2``."""
    from math_verify import parse

    s = s.strip()
    if any(d in s for d in _MATH_DELIMS):
        candidates = [s]
    elif "\n" in s:
        candidates = ["\\boxed{" + s + "}", s]
    else:
        candidates = ["$" + s + "$", "\\boxed{" + s + "}", s]
    for c in candidates:
        out = parse(c, extraction_config=_mv_config(), parsing_timeout=timeout)
        if out:
            return out
    return []


def math_verify_equivalent(pred: str, gold: str) -> bool:
    """math-verify equivalence of two answer strings (no fast path). Errors count as not equivalent."""
    from math_verify import verify

    timeout = _alarm_timeout()
    try:
        g = _mv_parse(gold, timeout)
        if not g:
            return False
        p = _mv_parse(pred, timeout)
        if not p:
            return False
        return bool(verify(g, p, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - math-verify/sympy raise anything on odd input
        logger.debug("math-verify failed on pred=%.80r gold=%.80r", pred, gold, exc_info=True)
        return False


def is_equivalent(pred: str, gold: str) -> bool:
    """Whether the predicted answer ``pred`` equals the reference ``gold``.

    Plain numbers are compared exactly in microseconds (:func:`fast_equivalent`); anything else goes to
    math-verify. A ``pred`` longer than ``MAX_ANSWER_CHARS`` is never equivalent. Called directly (not via
    RewardScorer) in the main thread, math-verify's alarm-based 5 s limit applies; in other threads there is no
    limit -- use RewardScorer for untrusted bulk input.
    """
    if pred is None or gold is None:
        return False
    pred, gold = str(pred).strip(), str(gold).strip()
    if not pred or not gold or len(pred) > MAX_ANSWER_CHARS:
        return False
    fast = fast_equivalent(pred, gold)
    if fast is not None:
        return fast
    return math_verify_equivalent(pred, gold)


def accuracy_reward(response: str, gold: str) -> float:
    """1.0 if the final answer of ``response`` (see :func:`extract_answer`) is equivalent to ``gold``, else 0.0."""
    pred = extract_answer(response)
    if pred is None:
        return 0.0
    return 1.0 if is_equivalent(pred, str(gold)) else 0.0
