"""The shape of every user error the tests check: one line ``compemb: error: ...`` on stderr, exit 2."""


def one_line_error(capsys, code: int) -> str:
    """The error line of a command that returned ``code``; fails unless it is exit 2 and one clean line."""
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compemb: error: "), err
    assert "Traceback" not in err[0]
    return err[0]
