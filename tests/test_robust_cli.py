"""The CLI and caption corpora under hostile input (issue 16, items 11, 12, 13 and 18).

Bad flags and environment values are one-line usage errors; Ctrl+C ends a command with
"interrupted" and exit status 130 and leaves a bundle that verifies; caption files and
``--image`` are read only when they are regular files within the limits; every bad
caption line is skipped with its file and line number while the rest is indexed; human
search output is one line per result, whatever the file names hold.

Whatever could hang or eat memory on broken code runs in a subprocess with a timeout
(and a memory limit), or with a thread that unblocks a FIFO reader, so that a
regression fails instead of blocking the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_fixtures import committed_images, index_command
from click.testing import CliRunner
from image_fixtures import scene
from xmodal.crossmodal.encoder import Encoder
from xmodal.indexer.captions import MAX_CAPTION_CHARS, read_caption_file
from xmodal.indexer.pipeline import IndexOptions, run_index
from xmodal.indexer.verify import verify_bundle

from xmodal.cli import main

EVIL_NAME = "evil\n 0.9999  forged-line.png"  # a newline and what looks like a result
SUBPROCESS_TIMEOUT_S = 180  # generous: a loaded 2-core machine; only a hang reaches it
UNBLOCK_AFTER_S = 20.0  # broken code blocked on a FIFO is released (and fails) after this


@pytest.fixture(scope="module")
def tiny_encoder(tiny_checkpoint: Path) -> Encoder:
    return Encoder.load("xmodal-tiny", str(tiny_checkpoint))


@pytest.fixture(scope="module")
def tiny_bundle(tiny_encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four images, one of them named with a newline, indexed with the tiny model."""
    root = tmp_path_factory.mktemp("robust-cli")
    photos = root / "photos"
    photos.mkdir()
    for i, name in enumerate(["a.png", "b.png", "c.png", EVIL_NAME]):
        scene(i, 24).save(photos / name, format="PNG")
    bundle = root / "bundle"
    run_index(tiny_encoder, IndexOptions(bundle=bundle, roots=[photos], workers=0, progress=False))
    return bundle


def _xmodal(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """``python -m xmodal ARGS`` with a timeout, so that a hang fails the test."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "xmodal", "--threads", "1", *args],
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
            **kwargs,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"xmodal {' '.join(args)} did not finish in {SUBPROCESS_TIMEOUT_S} s (hung)")


@contextlib.contextmanager
def _fifo(path: Path) -> Iterator[Path]:
    """A FIFO at ``path``; a reader still blocked on it after UNBLOCK_AFTER_S is given EOF
    (a writer opens and closes it), so code that opens FIFOs fails instead of hanging."""
    os.mkfifo(path)
    done = threading.Event()

    def unblock() -> None:
        while not done.wait(UNBLOCK_AFTER_S):
            with contextlib.suppress(OSError):  # ENXIO: nobody is reading, good
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        thread.join()


def _one_line_error(result, *needles: str) -> None:
    """A usage error (exit 2) on one 'Error:' line naming each needle, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- item 11: flags and env


def test_db_that_is_not_a_url_is_a_one_line_error(tiny_bundle: Path) -> None:
    runner = CliRunner()
    bundle = str(tiny_bundle)
    result = runner.invoke(main, ["search", "red", "--bundle", bundle, "--db", "notaurl"])
    _one_line_error(result, "--db", "'notaurl'")
    result = runner.invoke(main, ["info", "--bundle", bundle], env={"XMODAL_DB": "also not a url"})
    _one_line_error(result, "XMODAL_DB", "'also not a url'")


def test_threads_env_that_is_not_a_number_is_a_one_line_error(tmp_path: Path) -> None:
    runner = CliRunner()
    for bad in ("abc", "0", "1.5", "99999"):
        result = runner.invoke(
            main, ["info", "--bundle", str(tmp_path)], env={"XMODAL_THREADS": bad}
        )
        _one_line_error(result, "XMODAL_THREADS", repr(bad))
    result = runner.invoke(main, ["--threads", "abc", "info", "--bundle", str(tmp_path)])
    _one_line_error(result, "--threads", "'abc'")


def test_min_score_nan_is_refused_like_the_api(tiny_bundle: Path) -> None:
    runner = CliRunner()
    for bad in ("nan", "inf", "-inf"):
        result = runner.invoke(
            main, ["search", "red", "--bundle", str(tiny_bundle), "--min-score", bad]
        )
        _one_line_error(result, "--min-score", "finite")
    ok = runner.invoke(
        main, ["search", "red", "--bundle", str(tiny_bundle), "--min-score", "-1", "--json"]
    )
    assert ok.exit_code == 0, ok.output
    assert len(json.loads(ok.output)["results"]) == 4


def _messages(stderr: str) -> list[str]:
    """stderr's lines without tqdm's progress redraws."""
    lines = [part.strip() for line in stderr.splitlines() for part in line.split("\r")]
    return [line for line in lines if line and not re.match(r"^\w+:\s+\d+%\|", line)]


def test_ctrl_c_during_index_is_one_line_exit_130_and_bundle_verifies(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    photos, bundle = tmp_path / "photos", tmp_path / "bundle"
    photos.mkdir()
    # Enough that the run is still encoding when the signal lands: the tiny model indexes
    # 240 of these in 0.3 s after its first commits, and a signal that arrives during the
    # interpreter's exit leaves status 0.
    total = 2400
    for i in range(total):
        scene(i, 24).save(photos / f"{i:04d}.png")
    cmd = index_command(
        tiny_checkpoint, str(photos), "--bundle", str(bundle), "--batch-size", "8", workers=1
    )
    # Its own session: Ctrl+C in a terminal signals the whole process group (the CLI and
    # its decode workers), so the test does the same.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while committed_images(bundle) < 16 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # 130 (exit status) or killed by SIGINT: a shell reports both as 130.
    assert committed_images(bundle) < total, "the run finished before Ctrl+C landed"
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    assert _messages(stderr) == ["interrupted"], stderr
    report = verify_bundle(bundle)
    assert report.ok, report.problems
    assert committed_images(bundle) >= 16  # nothing committed was lost


def test_ctrl_c_while_the_cli_loads_is_one_line_exit_130(tmp_path: Path) -> None:
    # SIGINT delivered at a fixed point of start-up (when click, the first library, is
    # imported), the moment a Ctrl+C most often lands in a short command.
    code = (
        "import builtins, os, runpy, signal, sys\n"
        "real_import = builtins.__import__\n"
        "def interrupting_import(name, *args, **kwargs):\n"
        "    if name == 'click':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupting_import\n"
        "sys.argv = ['xmodal', '--help']\n"
        "runpy.run_module('xmodal', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        cwd=tmp_path,
    )
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr.strip() == "interrupted", proc.stderr


# ------------------------------------------------------- item 12: only regular files, bounded


def test_caption_file_that_is_a_fifo_is_refused_without_hanging(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    with _fifo(tmp_path / "caps.jsonl") as fifo:
        result = CliRunner().invoke(
            main,
            [
                "index",
                "--captions",
                str(fifo),
                "--bundle",
                str(tmp_path / "bundle"),
                "--model",
                "xmodal-tiny",
                "--pretrained",
                str(tiny_checkpoint),
            ],
        )
    _one_line_error(result, "caps.jsonl", "FIFO")


def test_caption_file_linked_to_dev_zero_is_refused_without_reading(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    link = tmp_path / "zero.jsonl"
    link.symlink_to("/dev/zero")

    def two_gib_of_heap() -> None:  # broken code reads /dev/zero until memory runs out
        resource.setrlimit(resource.RLIMIT_DATA, (2 * 2**30, 2 * 2**30))

    proc = _xmodal(
        "index",
        "--captions",
        str(link),
        "--bundle",
        str(tmp_path / "bundle"),
        "--model",
        "xmodal-tiny",
        "--pretrained",
        str(tiny_checkpoint),
        preexec_fn=two_gib_of_heap,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "zero.jsonl" in error[0] and "not a regular file" in error[0]


def test_caption_reader_refuses_fifos_devices_and_oversized_files(tmp_path: Path) -> None:
    from xmodal.crossmodal.errors import DataError
    from xmodal.indexer import captions

    with _fifo(tmp_path / "f.txt") as fifo, pytest.raises(DataError, match="FIFO"):
        read_caption_file(fifo)
    (tmp_path / "dev.txt").symlink_to("/dev/null")  # /dev/zero is the subprocess test's
    with pytest.raises(DataError, match="character device"):
        read_caption_file(tmp_path / "dev.txt")
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:  # sparse: no disk, no memory
        f.truncate(captions.MAX_CAPTION_FILE_BYTES + 1)
    with pytest.raises(DataError, match="more than the limit"):
        read_caption_file(big)


def test_caption_line_length_is_bounded_per_line(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    # A short caption on a 100k-character line: the line's length is what is refused.
    long_line = json.dumps({"caption": "short", "pad": "x" * 100_000})
    f.write_text(long_line + '\n{"caption": "kept"}\n', encoding="utf-8")
    parsed = read_caption_file(f)
    assert [(r.text, r.source) for r in parsed.records] == [("kept", "c.jsonl:2")]
    from xmodal.indexer.captions import MAX_CAPTION_LINE_CHARS

    assert len(long_line) > MAX_CAPTION_LINE_CHARS
    assert parsed.problems == [f"c.jsonl:1: line longer than {MAX_CAPTION_LINE_CHARS:,} characters"]


def test_search_image_that_is_a_fifo_is_refused_without_hanging(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    with _fifo(tmp_path / "query.png") as fifo:
        result = CliRunner().invoke(
            main, ["search", "--image", str(fifo), "--bundle", str(tiny_bundle)]
        )
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.output.strip().splitlines() == [
        f"Error: image {fifo} is a FIFO, not a regular file"
    ]


# ------------------------------------------------------------ item 13: caption JSONL lines


def test_lone_surrogate_skips_its_line_and_the_run_completes(
    tiny_encoder: Encoder, tmp_path: Path
) -> None:
    f = tmp_path / "caps.jsonl"
    f.write_text(
        '{"caption": "before"}\n{"caption": "bad \\ud800 text"}\n'
        '{"caption": "ok", "image": "x\\udfff.png"}\n{"caption": "after"}\n',
        encoding="utf-8",
    )
    report = run_index(
        tiny_encoder,
        IndexOptions(bundle=tmp_path / "b", captions=[f], workers=0, progress=False),
    )
    assert report.counts["captions_indexed"] == 2
    assert [p.split(": ")[0] for p in report.problems] == ["caps.jsonl:2", "caps.jsonl:3"]
    assert "surrogate" in report.problems[0] and "surrogate" in report.problems[1]
    assert verify_bundle(tmp_path / "b").ok


def test_deep_nesting_skips_its_line(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text(
        '{"caption": "one"}\n'
        + "[" * 200_000
        + "]" * 200_000
        + "\n"
        + '{"caption": "'
        + "[" * 5_000
        + '", "x": '
        + "[" * 5_000
        + "]" * 5_000
        + "}\n"
        + '{"caption": "four"}\n',
        encoding="utf-8",
    )
    parsed = read_caption_file(f)
    assert [(r.text, r.source) for r in parsed.records] == [
        ("one", "c.jsonl:1"),
        ("four", "c.jsonl:4"),
    ]
    assert [p.split(": ")[0] for p in parsed.problems] == ["c.jsonl:2", "c.jsonl:3"]
    assert "nested too deeply" in parsed.problems[1]


def test_line_separators_inside_strings_are_text_and_keep_line_numbers(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text(
        '{"caption": "a\u2028b"}\n{"caption": "c\u2029d"}\n{"caption": "e\u0085f"}\n'
        '{"caption": "g\\u2028h"}\nnot json\n',
        encoding="utf-8",
    )
    parsed = read_caption_file(f)
    assert [(r.text, r.source) for r in parsed.records] == [
        ("a b", "c.jsonl:1"),
        ("c d", "c.jsonl:2"),
        ("e f", "c.jsonl:3"),
        ("g h", "c.jsonl:4"),
    ]
    assert parsed.problems == ["c.jsonl:5: not JSON (Expecting value)"]
    txt = tmp_path / "c.txt"
    txt.write_text("one\u2028still one\r\ntwo\n", encoding="utf-8")
    assert [(r.text, r.source) for r in read_caption_file(txt).records] == [
        ("one still one", "c.txt:1"),
        ("two", "c.txt:2"),
    ]


def test_huge_number_skips_only_its_line(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text(
        '{"caption": "first"}\n{"caption": "x", "n": ' + "7" * 5000 + '}\n{"caption": "third"}\n',
        encoding="utf-8",
    )
    parsed = read_caption_file(f)
    assert [(r.text, r.source) for r in parsed.records] == [
        ("first", "c.jsonl:1"),
        ("third", "c.jsonl:3"),
    ]
    assert len(parsed.problems) == 1 and parsed.problems[0].startswith("c.jsonl:2: not JSON")


def test_bad_bytes_and_control_characters_skip_their_lines(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_bytes(
        b'{"caption": "ok"}\n{"caption": "bad \xff byte"}\n{"caption": "nul \\u0000"}\n'
        + b'{"caption": "'
        + b"w" * (MAX_CAPTION_CHARS - 1)
        + b'"}\n{"caption": "end"}\n'
    )
    parsed = read_caption_file(f)
    assert [r.source for r in parsed.records] == ["c.jsonl:1", "c.jsonl:4", "c.jsonl:5"]
    assert [p.split(": ")[0] for p in parsed.problems] == ["c.jsonl:2", "c.jsonl:3"]
    csv_file = tmp_path / "c.csv"
    csv_file.write_bytes(b"caption,image\nfine,a.png\nbad \xff,b.png\nalso fine,\n")
    table = read_caption_file(csv_file)
    assert [r.text for r in table.records] == ["fine", "also fine"]
    assert table.problems == ["c.csv:3: not UTF-8 text"]


def test_cli_index_reports_every_bad_line_and_indexes_the_rest(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    f = tmp_path / "caps.jsonl"
    f.write_text(
        '{"caption": "good one"}\n{"caption": "\\ud800"}\n'
        + "[" * 200_000
        + "\n"
        + '{"caption": "good \u2028 two"}\n{"n": '
        + "1" * 5000
        + "}\n",
        encoding="utf-8",
    )
    args = ["index", "--captions", str(f), "--bundle", str(tmp_path / "b")]
    args += ["--model", "xmodal-tiny", "--pretrained", str(tiny_checkpoint), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    doc = json.loads(result.output.strip().splitlines()[-1])
    assert doc["counts"]["captions_indexed"] == 2
    assert [p.split(": ")[0] for p in doc["problems"]] == [
        "caps.jsonl:2",
        "caps.jsonl:3",
        "caps.jsonl:5",
    ]


# --------------------------------------------------- item 18: one result, one output line


def test_search_output_escapes_a_newline_in_a_file_name(tiny_bundle: Path) -> None:
    photos = tiny_bundle.parent / "photos"
    result = CliRunner().invoke(
        main, ["search", "--image", str(photos / "a.png"), "--bundle", str(tiny_bundle), "-k", "4"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 4, lines  # four results, four lines: nothing forged
    assert all(re.match(r"^ *-?\d+\.\d{4}  /", line) for line in lines), lines
    assert sum("evil\\n 0.9999  forged-line.png" in line for line in lines) == 1
    # JSON keeps the name exact.
    doc = CliRunner().invoke(
        main, ["search", "--image", str(photos / "a.png"), "--bundle", str(tiny_bundle), "--json"]
    )
    paths = [r["path"] for r in json.loads(doc.output)["results"]]
    assert str(photos / EVIL_NAME) in paths


def test_printable_escapes_controls_separators_and_bad_bytes() -> None:
    from xmodal.options import printable

    assert printable("plain café 日本.png") == "plain café 日本.png"
    assert printable("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert printable("x\x1b[31my\x7f\x85") == "x\\x1b[31my\\x7f\\x85"
    assert printable("p\u2028q\u2029r\u202es") == "p\\u2028q\\u2029r\\u202es"
    assert printable(os.fsdecode(b"bad\xffname")) == "bad\\xffname"
    assert "\n" not in printable("".join(map(chr, range(0x110))))
