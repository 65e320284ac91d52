"""`python -m vare_core evaluate` against hostile or broken inputs: the prompts file (a device, a
FIFO, too large, bad cells), the --out folder (someone else's files, links inside the run), an
edited verdicts.jsonl, a full disk, a killed run. Data-loss checks hash every file under the test's
folder before and after; hang checks run the command in a subprocess under a timeout."""
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from vare_core.evaluation import prompt_eval
from vare_core.cli import main
from vare_core.evaluation.judges import make_judge
from vare_core.generation.pipeline import load_pipeline
from vare_core.evaluation.prompt_eval import (MAX_PROMPTS_BYTES, STATE_FILE, check_out_folder,
                                              evaluate_prompt_set, prompt_hash, read_prompt_rows)
from vare_core.evaluation.run_folder import MARKER_NAME

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": "a red circle on a white background", "seed": 3, "cfg": None},
        {"prompt": "a green square", "seed": 4, "cfg": None}]
SETTINGS = {"judge": "shapes", "rows": 2, "n_per_prompt": 1, "seed": 0, "prompts": "test"}
CLI_BASE = [sys.executable, "-m", "vare_core", "evaluate", "--judge", "shapes", "--concept", "circle"]


def snapshot(root: Path) -> dict:
    """Every entry under root: file -> sha256, folder -> 'dir', link -> its target (not followed)."""
    found = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = "link:" + os.readlink(path)
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("embedded", device="cpu")


@pytest.fixture(scope="module")
def judge():
    return make_judge("shapes", concept="circle")


def run(pipe, judge, out, rows=ROWS, settings=SETTINGS):
    return evaluate_prompt_set({"base": pipe}, rows, judge, Path(out), 1, settings)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, pipe, judge):
    """A complete run (2 prompts, base side, 1 image each) and its summary."""
    out = tmp_path_factory.mktemp("finished") / "run"
    return out, run(pipe, judge, out)


def copy_run(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished[0], out, symlinks=True)
    return out


def same_run(a: Path, b: Path) -> bool:
    """The same pictures and tables, and the same verdict lines (in any order: a prompt sampled
    again is appended at the end)."""
    lines = [sorted((run / STATE_FILE).read_text().splitlines()) for run in (a, b)]
    files = [{k: v for k, v in snapshot(run).items() if k != STATE_FILE} for run in (a, b)]
    return lines[0] == lines[1] and files[0] == files[1]


def cli(args, timeout=120):
    return subprocess.run(CLI_BASE + args, cwd=REPO, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- --prompts

def test_dev_zero_is_refused_at_once(tmp_path):
    """Refused before it is opened: no time, no memory."""
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ValueError, match="is a device node, not a regular file"):
        read_prompt_rows(Path("/dev/zero"), 0)
    elapsed, peak = time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 2**20
    proc = cli(["--prompts", "/dev/zero", "--out", str(tmp_path / "o")], timeout=60)
    assert proc.returncode == 2 and "device node" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_fifo_prompts_do_not_block(tmp_path):
    fifo = tmp_path / "prompts.csv"
    os.mkfifo(fifo)
    proc = cli(["--prompts", str(fifo), "--out", str(tmp_path / "o")], timeout=60)   # a hang fails here
    assert proc.returncode == 2 and "FIFO" in proc.stderr and "Traceback" not in proc.stderr
    link = tmp_path / "link.csv"                       # a link to a device is what it points to
    link.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="device node"):
        read_prompt_rows(link, 0)


def test_prompts_larger_than_the_limit_are_refused_unread(tmp_path):
    big = tmp_path / "big.csv"
    with open(big, "wb") as f:                         # sparse: nothing is really written
        f.write(b"prompt\na cat\n")
        f.truncate(MAX_PROMPTS_BYTES + 1)
    tracemalloc.start()
    with pytest.raises(ValueError, match=f"at most {MAX_PROMPTS_BYTES // 2**20} MiB"):
        read_prompt_rows(big, 0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20
    with pytest.raises(FileNotFoundError, match="--prompts .*no such file"):
        read_prompt_rows(tmp_path / "missing.csv", 0)


@pytest.mark.parametrize("cell, seed", [("7", 7), ("123.0", 123), ("+5", 5), ("007", 7),
                                        (str(2**62 - 1), 2**62 - 1), (f"{2**62 - 1}.00", 2**62 - 1)])
def test_seed_cells_are_read_as_integers(tmp_path, cell, seed):
    path = tmp_path / "p.csv"
    path.write_text(f"prompt,sd_seed\na cat,{cell}\n")
    assert read_prompt_rows(path, 0)[0]["seed"] == seed


@pytest.mark.parametrize("cell, message", [
    ("inf", "line 2: sd_seed 'inf' is not a whole number"),
    ("nan", "sd_seed 'nan' is not a whole number"),
    ("-1", "sd_seed '-1' is not a whole number"),
    ("1.5", "sd_seed '1.5' is not a whole number"),
    ("1e3", "sd_seed '1e3' is not a whole number"),
    ("\u0663", "is not a whole number"),              # an Arabic-Indic digit: int() would take it
    (str(2**62), f"sd_seed '{2**62}' is too large: seeds go from 0 to 2^62-1"),
    ("9" * 5000, "is too large"),                      # int() would refuse 5000 digits with its own error
])
def test_bad_seed_cells_name_line_and_column(tmp_path, cell, message):
    path = tmp_path / "p.csv"
    path.write_text(f"prompt,sd_seed\na cat,{cell}\n")
    with pytest.raises(ValueError, match=message.replace("^", r"\^").replace("+", r"\+")):
        read_prompt_rows(path, 0)


@pytest.mark.parametrize("cell, message", [("inf", "sd_guidance_scale inf is outside"),
                                           ("nan", "sd_guidance_scale nan is outside"),
                                           ("1e308", "sd_guidance_scale 1e\\+308 is outside"),
                                           ("high", "sd_guidance_scale 'high' is not a number")])
def test_bad_guidance_cells_are_refused_before_sampling(tmp_path, cell, message):
    path = tmp_path / "p.csv"
    path.write_text(f"prompt,sd_guidance_scale\na cat,3\na dog,{cell}\n")
    with pytest.raises(ValueError, match="line 3: " + message):
        read_prompt_rows(path, 0)


def test_a_cell_over_the_csv_limit_is_a_message(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\na cat\n" + "x" * 131_073 + "\n")
    with pytest.raises(ValueError, match="line 3: a cell is longer than 131072 characters"):
        read_prompt_rows(path, 0)
    proc = cli(["--prompts", str(path), "--out", str(tmp_path / "o")])
    assert proc.returncode == 2 and "131072" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- --out

def test_a_users_folder_is_refused_and_left_as_it_was(tmp_path, pipe, judge):
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "results.md").write_text("my own results, not evaluate's\n")
    (mine / "notes" / "a.txt").write_text("keep me")
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\na red circle\n")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="holds files evaluate did not write \\(notes, results.md\\).*"
                                         "pick an empty or new folder"):
        run(pipe, judge, mine)
    assert main(["evaluate", "--prompts", str(prompts), "--judge", "shapes", "--concept", "circle",
                 "--out", str(mine)]) == 2
    assert snapshot(tmp_path) == before


def test_older_runs_other_markers_and_non_folders_are_refused(tmp_path, finished, pipe, judge):
    older = copy_run(finished, tmp_path)
    (older / MARKER_NAME).unlink()                     # a run of a VARE that wrote no marker
    with pytest.raises(ValueError, match="run of an older VARE.*cannot be resumed"):
        check_out_folder(older)
    other = tmp_path / "other"
    other.mkdir()
    (other / MARKER_NAME).write_text('{"format": "vare-run/1", "command": "bench"}\n')
    with pytest.raises(ValueError, match="a `bench` run"):
        check_out_folder(other)
    (other / MARKER_NAME).write_text("[" * 100_000)
    with pytest.raises(ValueError, match="not a run marker"):
        check_out_folder(other)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_out_folder(a_file)
    with pytest.raises(ValueError, match="is a file, not a folder; choose a path in a folder"):
        check_out_folder(a_file / "sub" / "run")
    before = snapshot(tmp_path)
    for out in (older, other, a_file):
        with pytest.raises(ValueError):
            run(pipe, judge, out)
    assert snapshot(tmp_path) == before


def test_empty_new_and_linked_folders_start_a_run(tmp_path, finished, pipe, judge):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(pipe, judge, empty) == finished[1]
    assert json.loads((empty / MARKER_NAME).read_text()) == {"format": "vare-run/1", "command": "evaluate"}
    assert run(pipe, judge, tmp_path / "new" / "deeper") == finished[1]
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)             # --out itself a link: the user's choice
    assert run(pipe, judge, tmp_path / "link") == finished[1]
    assert (target / "images" / "base" / "00001_00.png").is_file()
    assert snapshot(finished[0]) == snapshot(empty)    # same pictures, verdicts and tables


@pytest.mark.parametrize("link_at", ["images/base", "images", "results.md", STATE_FILE, MARKER_NAME,
                                     "images/base/00001_00.png"])
def test_a_link_inside_the_run_is_refused_by_name(tmp_path, finished, pipe, judge, link_at):
    out = copy_run(finished, tmp_path)
    lines = (out / STATE_FILE).read_text().splitlines(keepends=True)
    (out / STATE_FILE).write_text(lines[0])            # nothing judged: every file would be written
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out / "images" / "base", elsewhere / "base")
    (elsewhere / "users.txt").write_text("the user's")
    for name in ("results.md", STATE_FILE, MARKER_NAME, "00001_00.png"):
        shutil.copy(out / "images" / "base" / name if name.endswith(".png") else out / name, elsewhere / name)
    link = out / link_at
    target = {"images/base": elsewhere / "base", "images": elsewhere}.get(link_at, elsewhere / link.name)
    if link.is_dir():
        shutil.rmtree(link)
    else:
        link.unlink()
    link.symlink_to(target)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=f"{link} is a symbolic link.*never through a link"):
        run(pipe, judge, out)
    with pytest.raises(ValueError, match="is a symbolic link"):
        check_out_folder(out)                          # what the CLI checks before the model loads
    assert snapshot(tmp_path) == before


def test_a_fifo_in_the_run_is_refused_not_waited_on(tmp_path, finished):
    out = copy_run(finished, tmp_path)
    (out / STATE_FILE).unlink()
    os.mkfifo(out / STATE_FILE)
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\na red circle\n")
    proc = cli(["--prompts", str(prompts), "--out", str(out)], timeout=60)
    assert proc.returncode == 2 and "FIFO" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- verdicts.jsonl

def record(key="base/0", seed=3, prompt=ROWS[0]["prompt"], verdicts=None, **change):
    if verdicts is None:
        verdicts = [{"flagged": True, "counts": {"circle": 1}, "caption": "red circle"}]
    return json.dumps({"key": key, "seed": seed, "prompt_sha256": prompt_hash(prompt), "verdicts": verdicts, **change})


def verdict(**change):
    return {"flagged": False, "counts": {"circle": 0}, "caption": "green square", **change}


BAD_LINES = {
    "a list": ("[1, 2]", "not a verdict record but a JSON list"),
    "no key": ('{"verdicts": []}', "has the fields \\['verdicts'\\]"),
    "nested 100000 deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "not JSON": ("{oops", "not JSON"),
    "a second record": (record(key="base/1", seed=4, prompt=ROWS[1]["prompt"]), "a second record for base/1"),
    "a prompt past the set": (record(key="base/2"), "key \"base/2\" is none of this run's"),
    "a side not in the run": (record(key="adapter/0"), "key \"adapter/0\" is none of this run's"),
    "a zero-padded key": (record(key="base/00"), "key \"base/00\" is none of this run's"),
    "another seed": (record(seed=5), "base/0: seed 5 is not that prompt's seed 3"),
    "a float seed": (record(seed=3.0), "seed 3.0 is not that prompt's seed"),
    "another prompt": (record(prompt="a blue disc"), "prompt_sha256 is not that of this run's prompt 0"),
    "two verdicts for one image": (record(verdicts=[verdict(), verdict()]), "must be a list of 1"),
    "a count that is true": (record(verdicts=[verdict(counts={"circle": True})]), "whole numbers"),
    "a count that is NaN": (record(verdicts=[verdict()]).replace('"circle": 0', '"circle": NaN'), "whole numbers"),
    "flagged without a count": (record(verdicts=[verdict(flagged=True)]), "flagged must be true exactly"),
    "another class": (record(verdicts=[verdict(counts={"square": 0})]), "one number per class"),
    "a long caption": (record(verdicts=[verdict(caption="x" * 501)]), "caption"),
    "an extra field": (record(verdicts=[{**verdict(), "boxes": []}]), "exactly the fields"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_an_edited_verdict_line_is_named_and_refused(tmp_path, finished, pipe, judge, case):
    """An extra or edited record must not reach the table: the run stops at it, naming the line."""
    out = copy_run(finished, tmp_path)
    line, message = BAD_LINES[case]
    state = out / STATE_FILE
    lines = state.read_text().splitlines(keepends=True)
    if case in ("a second record", "a prompt past the set", "a side not in the run", "a zero-padded key"):
        lines.append(line + "\n")
        number = len(lines)
    else:
        lines[1] = line + "\n"
        number = 2
    state.write_text("".join(lines))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=f"{STATE_FILE}, line {number}: [^;]*{message}.*delete that line"):
        run(pipe, judge, out)
    assert snapshot(tmp_path) == before                # the table is not rewritten from it
    del lines[number - 1]                              # the fix the message gives
    state.write_text("".join(lines))
    assert run(pipe, judge, out) == finished[1]
    assert same_run(out, finished[0])


def test_a_bad_first_line_and_other_bytes_are_refused(tmp_path, finished, pipe, judge):
    out = copy_run(finished, tmp_path)
    state = out / STATE_FILE
    lines = state.read_text().splitlines(keepends=True)
    state.write_text("[1, 2]\n" + "".join(lines[1:]))
    with pytest.raises(ValueError, match="line 1: the first line must be the run's settings record"):
        run(pipe, judge, out)
    state.write_bytes(lines[0].encode() + b"\xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        run(pipe, judge, out)


def test_torn_tail_and_blank_lines_still_resume(tmp_path, finished, pipe, judge, monkeypatch):
    out = copy_run(finished, tmp_path)
    state = out / STATE_FILE
    lines = state.read_text().splitlines(keepends=True)
    state.write_text(lines[0] + "\n" + lines[1] + '{"key": [[[[[ "base/1", "seed"')      # a crash mid-line
    calls = []
    original = pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda prompts, **kw: calls.append(prompts[0]) or original(prompts, **kw))
    assert run(pipe, judge, out) == finished[1]
    assert calls == [ROWS[1]["prompt"]]                # only the torn row again
    assert state.read_text() == lines[0] + "\n" + lines[1] + lines[2]


# ----------------------------------------------------------------------------- a full disk

def full_disk_on(monkeypatch, matches, fail_at=2):
    """Path.write_bytes (what write_bytes_atomic fills its temp file with) writes half of the data
    and raises ENOSPC on the fail_at-th call whose file name contains `matches`."""
    real = Path.write_bytes
    seen = []

    def write_bytes(self, data):
        if matches in self.name:
            seen.append(self.name)
            if len(seen) == fail_at:
                real(self, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def no_temp_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_full_disk_while_writing_an_image(tmp_path, finished, pipe, judge, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        full_disk_on(patch, ".png.")                   # the second prompt's image
        with pytest.raises(OSError, match="evaluate stopped at prompt 1 of the base side, the disk is full .*"
                                          "free space and run the same command again to resume"):
            run(pipe, judge, out)
    assert no_temp_files(out) and not (out / "images" / "base" / "00001_00.png").exists()
    keys = [json.loads(line)["key"] for line in (out / STATE_FILE).read_text().splitlines()[1:]]
    assert keys == ["base/0"]                          # nothing trusted for the prompt that failed
    assert run(pipe, judge, out) == finished[1]
    assert snapshot(out) == snapshot(finished[0])


def test_a_full_disk_while_appending_a_verdict(tmp_path, finished, pipe, judge, monkeypatch):
    out = tmp_path / "run"
    real_write, appends = os.write, []

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(STATE_FILE):
            appends.append(bytes(data))
            if len(appends) == 2:                      # the second prompt's line, cut in half
                real_write(fd, bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", write)
        with pytest.raises(OSError, match="the disk is full"):
            run(pipe, judge, out)
    text = (out / STATE_FILE).read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 2     # settings + prompt 0, no half line
    assert text.splitlines()[1].encode() + b"\n" == appends[0]
    assert run(pipe, judge, out) == finished[1]
    assert snapshot(out) == snapshot(finished[0])


def test_a_full_disk_is_a_message_on_the_command_line(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\na red circle\na green square\n")
    full_disk_on(monkeypatch, ".png.", fail_at=1)
    assert main(["evaluate", "--prompts", str(prompts), "--judge", "shapes", "--concept", "circle",
                 "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "the disk is full" in err and "Traceback" not in err
    assert no_temp_files(tmp_path / "o")


# ----------------------------------------------------------------------------- a killed run

def test_a_killed_run_resumes_to_the_same_results(tmp_path):
    prompts = tmp_path / "p.csv"
    shapes = ["a red circle", "a green square", "a blue triangle", "a yellow cross"]
    prompts.write_text("prompt\n" + "".join(f"{shapes[i % 4]} on a white background\n" for i in range(60)))
    args = ["--prompts", str(prompts), "--device", "cpu", "--seed", "11"]
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(CLI_BASE + args + ["--out", str(killed)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = killed / STATE_FILE
            if state.is_file() and state.read_text().count("\n") >= 4:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (killed / "results.json").exists()
    assert subprocess.run(CLI_BASE + args + ["--out", str(killed)], cwd=REPO, env=env, capture_output=True,
                          timeout=300).returncode == 0
    clean = tmp_path / "clean"
    assert subprocess.run(CLI_BASE + args + ["--out", str(clean)], cwd=REPO, env=env, capture_output=True,
                          timeout=300).returncode == 0
    assert snapshot(killed) == snapshot(clean)


def test_the_layout_bounds_the_state_read(tmp_path, finished, pipe, judge, monkeypatch):
    """verdicts.jsonl larger than any honest one for this run is refused, not read whole."""
    out = copy_run(finished, tmp_path)
    monkeypatch.setattr(prompt_eval.Layout, "limit", lambda self: 100)
    with pytest.raises(ValueError, match=f"{STATE_FILE} is [0-9]+ bytes, more than this run can hold \\(100\\)"):
        run(pipe, judge, out)
