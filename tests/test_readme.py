"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_names_both_commands():
    text = README.read_text()
    assert "make run" in text and "make test" in text


def _train_losses(tmp_path, arguments):
    import json

    from compemb.cli import main

    run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    assert main([*arguments, "--out", str(run), "--evals-per-epoch", "4"]) == 0
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_readmes_train_recipe_keeps_its_logged_loss_below_one_on_the_default_model(tmp_path):
    import shlex

    from compemb.cli import main

    line = next(line for line in README.read_text().splitlines() if line.startswith("compemb train --data data/synth"))
    recipe = shlex.split(line.split("#")[0])[1:]
    data = tmp_path / "synth"
    assert main(["synth", "--out", str(data), "--train-rows", "16384", "--eval-rows", "1024", "--scale", "1e-3"]) == 0
    recipe[recipe.index("--data") + 1] = str(data)
    out = recipe.index("--out")
    del recipe[out : out + 2]
    losses = _train_losses(tmp_path, recipe)  # the default MLPs (512-256-64 / 512-256), batch 2048: 8 steps
    assert len(losses) == 4 and max(losses) < 1.0, losses
    # one Adagrad at lr 0.05 for MLPs and tables alike (the old recipe) does blow up there: the check can fail
    old = [
        "train",
        "--data",
        str(data),
        "--method",
        "hash",
        "--compression",
        "100",
        "--optimizer",
        "adagrad",
        "--lr",
        "0.05",
        "--table-optimizer",
        "adagrad",
        "--table-lr",
        "0.05",
    ]
    assert max(_train_losses(tmp_path, old)) > 1.0


def _readme_commands():
    """Every ``compemb ...`` line of the README's bash blocks (continuations joined), with ``...`` expanded to the
    arguments of the last full command of the same subcommand above it."""
    import shlex

    text = README.read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        joined = block.replace("\\\n", " ")
        lines += [line.split(" #")[0].strip() for line in joined.splitlines() if line.startswith("compemb ")]
    commands, last = [], {}
    for line in lines:
        words = shlex.split(line.replace("[--quantize int8|int4|pq]", "--quantize int8"))[1:]
        head = tuple(words[:2]) if words[:1] == ["bench"] else tuple(words[:1])
        if "..." in words:
            at = words.index("...")
            words = words[:at] + last.get(head, []) + words[at + 1 :]
        else:
            last[head] = words[len(head) :]
        commands.append((line, words))
    return commands


def test_every_readme_command_line_is_one_the_cli_takes():
    from compemb.cli import build_parser

    commands = _readme_commands()
    assert len(commands) > 30
    for line, words in commands:
        if "--help" in words:
            continue
        try:
            build_parser().parse_args(words)
        except SystemExit as error:  # argparse's way of refusing
            raise AssertionError(f"the README's `{line}` is not a valid command ({words})") from error
