"""What a user sees while training: on a real terminal (a pseudo-terminal read back through a terminal
emulator, pyte) the bar, `iteration/total`, the speed, the time left and the phase stay on one line in
every frame at 80 and 120 columns, with the loss terms below; the time left is defined however slow a
step; off a terminal every log step is one plain line. Also the bars of eval/predict/prepare."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pyte
import pytest
import yaml
from rich.console import Console

from faults import child_env
from hiposeg.config import PHASE_NAMES
from hiposeg.progress import format_duration, work_progress
from hiposeg.runlog import TrainView

ITERS = 12
BAR_LINE = re.compile(r"^train (\S+) .*\s(\d+)/(\d+)\s+(\d+\.\d+ it/s|\d+\.\d s/it|-- it/s)\s+ETA (\d+:\d\d:\d\d|-:--:--)\s*$")
# Every redraw of a Rich live display starts by returning to column 0 and erasing the line (then the lines
# above it): the output split before each such start is one complete frame per piece.
REDRAW = b"\r\x1b[2K"


def tiny_config_file(data: Path, path: Path) -> Path:
    """The suite's tiny run (conftest.tiny_config) as a --config file, logging every 2 iterations."""
    path.write_text(yaml.safe_dump({
        "data": {"dataset": "custom", "root": str(data), "crop": [64, 64], "workers": 0},
        "model": {"backbone": "resnet18", "output_stride": 16, "embed_dim": 32},
        "optim": {"iters": ITERS, "batch_size": 2},
        "run": {"device": "cpu", "log_every": 2, "eval_mode": "whole", "ckpt_every": 100}}))
    return path


def terminal_frames(args: list[str], columns: int) -> list[list[str]]:
    """Run `python -m hiposeg ARGS` on a pseudo-terminal of 24 x `columns` and return the screen after
    each complete redraw, as the terminal shows it."""
    env = {k: v for k, v in child_env().items() if k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    child = pexpect.spawn(sys.executable, ["-m", "hiposeg", *map(str, args)], dimensions=(24, columns), env=env,
                          timeout=600)
    output = child.read()
    child.close()
    assert child.exitstatus == 0, output.decode(errors="replace")[-3000:]
    screen = pyte.Screen(columns, 24)
    stream = pyte.ByteStream(screen)
    frames = []
    for piece in re.split(b"(?=" + re.escape(REDRAW) + b")", output):
        stream.feed(piece)
        frames.append([line.rstrip() for line in screen.display])
    return frames


def bar_line(frame: list[str]) -> tuple[int, re.Match] | None:
    """(row, match) of the training display's first line in a frame, if it is on the screen."""
    for row, line in enumerate(frame):
        if line.startswith("train "):
            return row, BAR_LINE.match(line)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("columns", [80, 120])
def test_on_a_terminal_the_bar_count_speed_and_time_left_are_in_every_frame(tiny_data, tmp_path, columns):
    config = tiny_config_file(tiny_data, tmp_path / "tiny.yaml")
    frames = terminal_frames(["train", "--config", config, "--out", tmp_path / "run"], columns)
    showing = [i for i, f in enumerate(frames) if bar_line(f)]
    assert len(showing) >= 3, "\n".join(frames[-1])
    phases, terms_seen = set(), False
    for frame in frames[showing[0]:showing[-1] + 1]:  # from the first step to the end of training
        found = bar_line(frame)
        assert found is not None, "the display left the screen:\n" + "\n".join(frame)
        row, match = found
        assert match, f"bar, count, speed or ETA missing at {columns} columns: {frame[row]!r}"
        phase, done, total, _, left = match.groups()
        assert int(total) == ITERS and 0 <= int(done) <= ITERS
        phases.add(phase)
        if int(done) > 0:
            assert left != "-:--:--", frame[row]  # defined from the first finished step on
        below = " ".join(frame[row + 1:row + 3])
        terms_seen |= "loss=" in below and "lr=" in below
    assert phases <= {*PHASE_NAMES, "evaluating"} and "4-align" in phases, phases
    assert terms_seen
    # every log step redraws at once (not only at the once-a-second refresh), so each one is on screen
    shown = {int(bar_line(f)[1].group(2)) for f in frames[showing[0]:showing[-1] + 1]}
    assert set(range(2, ITERS + 1, 2)) <= shown, sorted(shown)
    assert bar_line(frames[showing[-1]])[1].group(2) == str(ITERS)


def test_the_time_left_is_the_runs_own_average_and_counts_down_between_slow_steps():
    """Steps 45 s apart (Rich's own estimate keeps 30 s of samples, and showed -:--:--)."""
    now = [1000.0]
    view = TrainView(total=10, start_iter=0, window=2, clock=lambda: now[0])
    assert view.status() == ("-- it/s", "-:--:--")  # nothing done yet: nothing to go by
    for it in (1, 2, 3):
        now[0] += 45.0
        view.advance(it, "1-ce")
    assert view.status() == ("45.0 s/it", format_duration(7 * 45))  # 0:05:15
    now[0] += 15.0  # no step for 15 s: the time left counts down
    assert view.status() == ("45.0 s/it", "0:05:00")
    now[0] += 105.0  # a step of 120 s: the window (the last 2 steps, 45 + 120 s) follows the run's speed
    view.advance(4, "2-high")
    assert view.status() == ("82.5 s/it", format_duration(6 * 82.5))  # 0:08:15


def test_the_bars_of_eval_predict_and_prepare_go_by_their_own_average():
    """Items 40 s apart; a resumed `prepare` starts with its finished files counted, not timed."""
    now = [500.0]
    console = Console(width=80, force_terminal=True, color_system=None, record=True)
    bar = work_progress(unit="img", console=console, clock=lambda: now[0])
    task = bar.add_task("prepare", total=10, completed=4)
    shown = []
    for done in (4, 5, 6):
        bar.update(task, completed=done)
        console.print(bar.get_renderable())
        shown.append(console.export_text().splitlines()[-1])
        now[0] += 40.0
    assert shown[0].endswith("4/10 -- img/s  ETA -:--:--")
    assert shown[1].endswith("5/10 40.0 s/img  ETA 0:03:20"), shown[1]
    assert shown[2].endswith("6/10 40.0 s/img  ETA 0:02:40"), shown[2]


@pytest.mark.slow
def test_off_a_terminal_each_log_step_is_one_plain_line(tiny_data, tmp_path):
    out = tmp_path / ("a-long-run-directory-name-" * 4) / "run"  # longer than 80 columns with the rest
    config = tiny_config_file(tiny_data, tmp_path / "tiny.yaml")
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "hiposeg", "train", "--config", str(config), "--out", str(out)],
                              stdout=f, stderr=subprocess.STDOUT, env={**child_env(), "COLUMNS": "80"}, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\x1b[" not in text
    steps = [line for line in text.splitlines() if line.startswith("iter ")]
    assert [int(s.split()[1].split("/")[0]) for s in steps] == list(range(2, ITERS + 1, 2))
    for line in steps:
        assert re.match(rf"iter \d+/{ITERS}  \S+ (it/s|s/it)  ETA \d+:\d\d:\d\d  \[[1-4]-\w+\]  loss=\S+ ce=\S+ .*lr=\S+$",
                        line), line
    assert os.path.getsize(out / "metrics.jsonl") > 0
