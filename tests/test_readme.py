"""The README and the documentation site's pages: their Python blocks run as written, their ``compemb`` commands are
ones the CLI takes, and the README stays a short door to the site (``make test`` builds the site itself, strict)."""

import re

import pytest

from tests.pages import DOCS, PAGES, README, ROOT, bash_blocks, name, python_blocks


def _distinct_python_blocks():
    """Every python block of the README and the docs once, named by the first page that holds it (the README's quick
    start is also the site's home page)."""
    seen, params = set(), []
    for page in PAGES:
        for number, block in enumerate(python_blocks(page), 1):
            if block not in seen:
                seen.add(block)
                params.append(pytest.param(page, block, id=f"{name(page)}:{number}"))
    return params


@pytest.mark.parametrize(("page", "block"), _distinct_python_blocks())
def test_readme_and_docs_python_blocks_run(page, block):
    exec(compile(block, str(page), "exec"), {})


def test_readme_quick_start_is_the_docs_home_pages():
    blocks = python_blocks(README)
    assert len(blocks) >= 4, "the README has lost its quick start"
    assert blocks == python_blocks(DOCS / "index.md")


def test_readme_names_both_commands():
    text = README.read_text()
    assert "make run" in text and "make test" in text


def test_readme_is_a_door():
    """What compemb is, the two commands, the quick start, the CLI at a glance, the methods and the verdicts: the
    rest lives in docs/."""
    assert len(README.read_text().splitlines()) <= 350


def test_readme_links_resolve():
    targets = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [target.split("#")[0] for target in targets if not re.match(r"[a-z]+://", target)]
    assert local and all((ROOT / target).exists() for target in local), [t for t in local if not (ROOT / t).exists()]


def test_readme_method_table_is_the_methods_guides():
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `")]
    guide = (DOCS / "guides" / "methods.md").read_text().splitlines()
    assert len(rows) > 20 and all(row in guide for row in rows)


def test_the_reference_documents_every_public_name():
    """A ``::: compemb.NAME`` directive for each name of ``compemb.__all__`` (``compemb.compress.compress`` where the
    name is a module's too)."""
    import compemb

    text = "\n".join(page.read_text() for page in (DOCS / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: compemb\.(\S+)$", text, flags=re.MULTILINE))
    missing = [n for n in compemb.__all__ if n not in documented and f"{n}.{n}" not in documented]
    assert not missing, f"docs/reference/ has no `::: compemb.NAME` for {missing}"


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


def _commands(page):
    """Every ``compemb ...`` line of a page's bash blocks (continuations joined; ``$NAME`` replaced by the value a
    ``NAME="..."`` line of the same block gives it), with ``...`` expanded to the arguments of the last full command
    of the same subcommand above it on the page."""
    import shlex

    lines = []
    for block in bash_blocks(page):
        joined = block.replace("\\\n", " ")
        variables = dict(re.findall(r'^([A-Z_]+)="([^"]*)"$', joined, flags=re.MULTILINE))
        for line in joined.splitlines():
            if line.startswith("compemb "):
                for variable, value in variables.items():
                    line = line.replace(f"${variable}", value)
                lines.append(line.split(" #")[0].strip())
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


def test_the_readme_and_the_training_guide_show_the_cli():
    assert len(_commands(README)) >= 10
    assert len(_commands(DOCS / "guides" / "training.md")) > 30  # the command line in full


@pytest.mark.parametrize("page", [page for page in PAGES if _commands(page)], ids=name)
def test_every_command_line_of_the_readme_and_the_docs_is_one_the_cli_takes(page):
    from compemb.cli import build_parser

    for line, words in _commands(page):
        if "--help" in words:
            continue
        try:
            build_parser().parse_args(words)
        except SystemExit as error:  # argparse's way of refusing
            raise AssertionError(f"{name(page)}'s `{line}` is not a valid command ({words})") from error
