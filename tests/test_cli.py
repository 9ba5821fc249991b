"""The `primer` command as a user meets it: --version, help for every argument, exit codes
(2: a mistake found before any work, one line; 1: a run that stopped, one line with the
path and what to do), tracebacks only with -v, secrets never echoed."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import _parser, main
from tests.conftest import REPO, SAMPLE

FINEWEB = SAMPLE / "fineweb-1.jsonl.gz"


def _recipe(tmp_path: Path, body: str, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def _err_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("primer:")]
    assert len(err) == 1, err
    return err[0]


def test_version_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("primer ")
    help_stage = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "stage", "-h"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert help_stage.returncode == 0
    for name in ("extract", "langid", "quality", "dedup", "edu_score", "mixture"):
        assert f"\n  {name} " in help_stage.stdout


def test_every_argument_has_help():
    def walk(parser):
        for action in parser._actions:
            if action.dest in ("help", "command"):
                continue
            yield parser.prog, action
            for sub in getattr(action, "choices", None) or {}:
                if hasattr(action.choices[sub], "_actions"):
                    yield from walk(action.choices[sub])

    missing = [f"{prog} {a.dest}" for prog, a in walk(_parser()) if not a.help]
    assert not missing


@pytest.mark.parametrize(
    "body, where",
    [
        ("- just\n- a list\n", "top level must be a mapping"),
        (f"name: r\nstages:\n  quality: {{input: [{FINEWEB}], min_wrods: 3}}\n", "min_wrods"),
        (f"name: r\nstages:\n  quality: {{input: [{FINEWEB}]}}\n  langid: {{languages: [zz]}}\n",
         "stages.langid.languages"),
        ("name: r\nstages:\n  quality: {input: [/nowhere/*.jsonl]}\n", "matches no file"),
        (f"name: r\nstages:\n  edu_score: {{input: [{FINEWEB}], model: /nope/model.bin}}\n",
         "stages.edu_score.model"),
    ],
)  # fmt: skip
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, body, where):
    code = main(["run", _recipe(tmp_path, body), "--output", str(tmp_path / "out")])
    assert code == 2
    line = _err_line(capsys)
    assert where in line or where in capsys.readouterr().err
    assert "Traceback" not in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_secret_where_a_variable_name_goes_is_rejected_unprinted(tmp_path, capsys):
    secret = "sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"
    body = (
        f"name: r\nstages:\n  quality: {{input: [{FINEWEB}]}}\n"
        f"  edu_annotate: {{teacher: {{api_key_env: {secret}}}}}\n"
    )
    assert main(["run", _recipe(tmp_path, body), "--output", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert secret not in captured.err + captured.out
    assert "api_key_env" in captured.err


@contextlib.contextmanager
def _tmpfs(path: Path, size: str = "512k"):
    path.mkdir(parents=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_and_a_read_only_folder_are_one_clear_line(tmp_path, capsys):
    body = f"name: r\nexecutor: local\nstages:\n  quality: {{input: [{FINEWEB}]}}\n"
    recipe = _recipe(tmp_path, body)
    with _tmpfs(tmp_path / "small", "64k") as small:
        assert main(["run", recipe, "--output", str(small / "run")]) == 1
        line = _err_line(capsys)
        assert "disk is full" in line and str(small / "run") in line
        assert "run the same command again" in line
    with _tmpfs(tmp_path / "ro") as ro:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        assert main(["run", recipe, "--output", str(ro / "run")]) == 1
        line = _err_line(capsys)
        assert "read-only" in line and str(ro / "run") in line


def test_tracebacks_only_with_verbose(tmp_path, capsys):
    recipe = _recipe(tmp_path, "- not a mapping\n")
    assert main(["run", recipe]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["-v", "run", recipe]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    "body, where",
    [
        (f"name: r\nstages:\n  quality: {{input: [{FINEWEB}]}}\n  quality: {{min_words: 3}}\n",
         "key 'quality' appears twice"),
        ("name: r\nstages:\n  quality: {input: [$PRIMER_NOT_SET_HERE/*.jsonl]}\n",
         "$PRIMER_NOT_SET_HERE, which is not set"),
        (f"name: r\nstages:\n  quality: {{input: [{FINEWEB}]}}\n  mixture: {{tokenizer: /no/tok.json, "
         "phases: [{name: p, tokens: 10, sources: [{name: w, input: '@quality', weight: 1}]}]}\n",
         "stages.mixture.tokenizer"),
    ],
)  # fmt: skip
def test_more_mistakes_found_before_any_work(tmp_path, capsys, body, where):
    assert main(["run", _recipe(tmp_path, body), "--output", str(tmp_path / "out")]) == 2
    assert where in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_or_a_recipe_that_is_a_folder(tmp_path, capsys):
    body = f"name: r\nstages:\n  quality: {{input: [{FINEWEB}]}}\n"
    (tmp_path / "taken").write_text("not a folder")
    assert main(["run", _recipe(tmp_path, body), "--output", str(tmp_path / "taken")]) == 2
    assert "is a file, not a run folder" in capsys.readouterr().err
    assert main(["run", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
