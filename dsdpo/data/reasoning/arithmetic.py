"""Worked-solution arithmetic: find `a op b = c` equations, and carry a wrong result to the end.

A wrong-arithmetic variant changes the result of one equation and then redoes every later step the
way a student who believed that result would: later occurrences of a changed number take its new
value and later equations are recomputed, so the error reaches the final answer.
"""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction

NUMBER = r"\d+(?:\.\d+)?"
OPERATOR = r"[-+*/×÷x]"
EQUATION = re.compile(
    rf"(?P<expr>{NUMBER}(?:\s*{OPERATOR}\s*{NUMBER})+)\s*=\s*(?P<result>{NUMBER})(?![\d.]\d)"
)
NUMBER_TOKEN = re.compile(rf"(?<![\d.]){NUMBER}(?![\d.]*\d)")
OPERATIONS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expression: str) -> Fraction | None:
    """The exact value of `3 × 4 + 2`-like text; None for anything else (or a division by zero)."""
    python = expression.replace("×", "*").replace("÷", "/").replace("x", "*")
    python = re.sub(NUMBER, lambda m: f"Fraction('{m.group()}')", python)

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATIONS:
            return OPERATIONS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Call) and len(node.args) == 1 and isinstance(node.args[0], ast.Constant):
            return Fraction(node.args[0].value)
        raise ValueError(ast.dump(node))

    try:
        return walk(ast.parse(python, mode="eval").body)
    except (ValueError, SyntaxError, ZeroDivisionError):
        return None


def format_number(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.2f}".rstrip("0").rstrip(".")


def correct_equations(step: str) -> list[re.Match]:
    """The equations of a step whose stated result is what their left side computes."""
    return [m for m in EQUATION.finditer(step) if evaluate(m["expr"]) == Fraction(m["result"])]


def substitute_numbers(text: str, changed: dict[str, str]) -> str:
    return NUMBER_TOKEN.sub(lambda m: changed.get(m.group(), m.group()), text)


def redo_step(step: str, changed: dict[str, str]) -> str:
    """A later step with earlier changes carried: substituted operands, recomputed results."""
    pieces, end = [], 0
    for match in EQUATION.finditer(step):
        pieces.append(substitute_numbers(step[end : match.start()], changed))
        expression = substitute_numbers(match["expr"], changed)
        value = evaluate(expression)
        result = match["result"]
        if value is not None and value != Fraction(result):
            changed[result] = format_number(value)
        # Keep the step's own spacing around "=": only the numbers change.
        pieces.append(
            expression + step[match.end("expr") : match.start("result")] + changed.get(result, result)
        )
        end = match.end()
    pieces.append(substitute_numbers(step[end:], changed))
    return "".join(pieces)


def carry_wrong_result(steps: list[str], step_index: int, equation: re.Match, wrong: Fraction):
    """The steps with one equation's result replaced by `wrong` and carried through the rest.

    Returns (new steps, changes) where changes maps each original number to its carried value.
    """
    changed = {equation["result"]: format_number(wrong)}
    step = steps[step_index]
    first = step[: equation.start("result")] + changed[equation["result"]]
    rest = redo_step(step[equation.end() :], changed)
    new_steps = [*steps[:step_index], first + rest]
    new_steps += [redo_step(later, changed) for later in steps[step_index + 1 :]]
    return new_steps, changed
