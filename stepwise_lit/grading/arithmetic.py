"""Safe arithmetic: one evaluator and one number pattern for every part that reads calculations.

The GSM8K corruption (``stepwise_lit.data.gsm8k``) recomputes calculator annotations with
:func:`evaluate_arithmetic`, and the rule verifier (``stepwise_lit.rewards.rules``) checks
annotations and equations with it; both find numbers with :data:`NUMBER`.

The evaluator reads a Python-syntax expression of numbers, unary ``+``/``-`` and the binary
operators ``+ - * / // % **``, with parentheses, and nothing else (no names, calls or
attributes). It computes in floats, so no integer can grow without bound; an exponent larger
than :data:`MAX_EXPONENT` in magnitude, a text longer than :data:`MAX_EXPRESSION_LENGTH`, a
division by zero, an overflow or a non-finite result give None.
"""

from __future__ import annotations

import ast
import math
import operator
import re

# A number, maybe with thousands commas ("1,040") and a minus sign, not part of a longer number.
NUMBER_PATTERN = r"(?<![\d.,])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d]|[.,]\d)"
NUMBER = re.compile(NUMBER_PATTERN)
BINARY_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
MAX_EXPONENT = 64
MAX_EXPRESSION_LENGTH = 500


def evaluate_arithmetic(expression: str) -> float | None:
    """The value of an arithmetic expression, or None when it is not one or has no finite value.

    Args:
        expression: Python-syntax arithmetic, e.g. ``"(16 - 3) * 2 ** 2"``; surrounding
            whitespace is ignored.

    Returns:
        The value as a float; None for anything but numbers, unary ``+ -``, binary
        ``+ - * / // % **`` and parentheses, for an exponent above :data:`MAX_EXPONENT` in
        magnitude, a text longer than :data:`MAX_EXPRESSION_LENGTH`, a division by zero, an
        overflow or a non-finite result.
    """
    text = expression.strip()
    if len(text) > MAX_EXPRESSION_LENGTH:
        return None
    try:
        value = evaluate_node(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None
    return value if math.isfinite(value) else None


def evaluate_node(node: ast.AST) -> float:
    """Evaluate one node of an arithmetic expression tree.

    Raises:
        ValueError: On anything but numbers, unary ``+ -`` and :data:`BINARY_OPERATORS`, and
            on an exponent larger than :data:`MAX_EXPONENT` in magnitude.
    """
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = evaluate_node(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPERATORS:
        left, right = evaluate_node(node.left), evaluate_node(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError("exponent too large")
        value = BINARY_OPERATORS[type(node.op)](left, right)
        if isinstance(value, complex):  # a negative number to a fractional power
            raise ValueError("complex result")
        return float(value)
    raise ValueError(f"not arithmetic: {ast.dump(node)}")
