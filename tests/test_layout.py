"""The package's rooms stay small enough to hold in a head (issue 38)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "compemb"
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_TRAINER_INIT_LINES = 450, 80, 30


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_source_file_is_over_450_lines_and_no_function_over_80():
    long_files, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(PACKAGE)}: {len(text.splitlines())} lines")
        for function in _functions(ast.parse(text)):
            lines = function.end_lineno - function.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long_functions.append(f"{path.relative_to(PACKAGE)}:{function.lineno} {function.name}: {lines} lines")
    assert not long_files and not long_functions, long_files + long_functions


def test_the_trainers_constructor_reads_as_a_table_of_contents():
    tree = ast.parse((PACKAGE / "train" / "loop.py").read_text())
    trainer = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    init = next(f for f in trainer.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    code = init.body[1:] if isinstance(init.body[0], ast.Expr) else init.body  # its docstring apart
    assert code[-1].end_lineno - code[0].lineno + 1 <= MAX_TRAINER_INIT_LINES
