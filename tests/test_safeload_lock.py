"""The shared guards of issue "trust round 2": bounded parsing of user files and one owner per output folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hiposeg.errors import UserError
from hiposeg.lock import LOCK_NAME, DirectoryLock
from hiposeg.safeload import MAX_DEPTH, load_json, load_yaml


def test_json_nested_beyond_the_parser_is_a_user_error_naming_the_file():
    with pytest.raises(UserError, match="cfg.json nests its values too deeply"):
        load_json("[" * 100_000 + "]" * 100_000, "cfg.json")


def test_json_nested_beyond_max_depth_but_parseable_is_refused():
    deep = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    with pytest.raises(UserError, match=f"more than {MAX_DEPTH} levels"):
        load_json(deep, "m.json")
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert load_json(ok, "m.json") is not None


def test_json_syntax_error_names_the_file():
    with pytest.raises(UserError, match=r"h\.json is not valid JSON: Expecting"):
        load_json("{", "h.json")


def test_yaml_alias_bomb_is_refused_quickly():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="expands to more than 1,000,000 values through YAML aliases"):
        load_yaml("\n".join(lines), "bomb.yaml")
    assert time.perf_counter() - t0 < 2.0


def test_yaml_small_aliases_still_work_and_recursion_is_refused():
    assert load_yaml("base: &b {lr: 0.1}\nrun: *b\n", "c.yaml") == {"base": {"lr": 0.1}, "run": {"lr": 0.1}}
    with pytest.raises(UserError, match="refers to itself"):
        load_yaml("a: &a [*a]\n", "c.yaml")
    with pytest.raises(UserError, match="nests its values"):
        load_yaml("[" * 5000 + "]" * 5000, "c.yaml")


def test_yaml_python_tags_are_refused():
    with pytest.raises(UserError, match="not valid YAML"):
        load_yaml("!!python/object/apply:os.system ['true']", "c.yaml")


HOLDER = textwrap.dedent("""
    import sys, time
    from hiposeg.lock import DirectoryLock
    lock = DirectoryLock(sys.argv[1], "run directory").acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_second_owner_is_refused_naming_the_holder_and_a_killed_holder_frees_the_lock(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"run directory {run} is in use by another hiposeg process \(pid "
                                            rf"{holder.pid} on "):
            DirectoryLock(run, "run directory").acquire()
        record = json.loads((run / LOCK_NAME).read_text())
        assert record["pid"] == holder.pid
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # the killed holder's lock is stale: the kernel released it, the next owner gets it at once
    with DirectoryLock(run, "run directory") as lock:
        assert lock.held
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not lock.held


def test_integers_beyond_python_s_digit_limit_are_a_user_error():
    big = "9" * 5000
    with pytest.raises(UserError, match=r"h\.json is not valid JSON: .*4300"):
        load_json(f'{{"id": {big}}}', "h.json")
    with pytest.raises(UserError, match=r"c\.yaml is not valid YAML for hiposeg: .*4300"):
        load_yaml(f"optim:\n  iters: {big}\n", "c.yaml")


def test_a_lock_file_that_is_a_hard_link_or_a_fifo_is_refused_and_left_unchanged(tmp_path):
    victim = tmp_path / "important.txt"
    victim.write_text("important\n")
    out = tmp_path / "out"
    out.mkdir()
    os.link(victim, out / LOCK_NAME)
    with pytest.raises(UserError, match="is a hard link to another file"):
        DirectoryLock(out, "prepared dataset").acquire()
    assert victim.read_text() == "important\n"
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / LOCK_NAME)
    with pytest.raises(UserError, match="is not a regular file"):
        DirectoryLock(fifo_dir, "run directory").acquire()
