"""The run folder of ``effbert pretrain`` (``effbert.training.run_folder``), with real child processes: one run per
folder (a second writer stops at once, names the holder's pid, writes nothing); a kill at each file of a checkpoint
save, then ``--resume`` from the checkpoint before it; a full disk during a save; ctrl-C and SIGTERM; a resume on
other data; a longer resume keeps the learning-rate schedule unless ``--reshape-schedule``."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from effbert import commands as cli
from effbert.commands import pretrain
from effbert.training.run_folder import LOCK_FILE, RunFolder, missing_files, newest_complete

pytestmark = pytest.mark.requires("datasets", "accelerate")  # corpora and Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLPOINT = os.path.join(REPO, "tests", "killpoint")
MODEL = [
    "--layers",
    "1",
    "--hidden",
    "16",
    "--heads",
    "2",
    "--max-seq-length",
    "16",
    "--batch-size",
    "4",
    "--learning-rate",
    "2e-3",
    "--backend",
    "eager",
    "--device",
    "cpu",
    "--quiet",
    "--no-tnf",
    "--logging-steps",
    "1",
]
STOP_LINE = re.compile(
    r"^effbert pretrain: interrupted at step (\d+); (checkpoint-(\d+) is intact|no checkpoint yet);"
    r" resume with --resume$"
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small corpus of real prose, a tokenizer trained on it once and a shared datasets cache."""
    from effbert.data.tokenization import train_wordpiece

    root = tmp_path_factory.mktemp("data")
    text = " ".join(
        open(f, encoding="utf-8", errors="ignore").read()
        for f in sorted(
            os.path.join("/usr/share/common-licenses", n)
            for n in (
                os.listdir("/usr/share/common-licenses")
                if os.path.isdir("/usr/share/common-licenses")
                else []
            )
        )
        if os.path.isfile(f)
    )
    text = (
        text
        if len(text) > 20000
        else " ".join(m.__doc__ or "" for m in (os, re, json, shutil, subprocess))
    )
    sentences = [
        s for s in re.split(r"(?<=[.;:])\s+", re.sub(r"\s+", " ", text)) if len(s.split()) >= 4
    ][:200]
    (root / "corpus.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    tok = train_wordpiece([str(root / "corpus.txt")], vocab_size=200)
    tok.save_pretrained(root / "tok")
    return {
        "corpus": str(root / "corpus.txt"),
        "tok": str(root / "tok" / "tokenizer.json"),
        "cache": str(root / "cache"),
    }


def _args(files, out, *extra, data=None):
    return [
        "--data",
        data or files["corpus"],
        "--vocab",
        files["tok"],
        "--cache-dir",
        files["cache"],
        "--out",
        str(out),
        *MODEL,
        *extra,
    ]


def _env(**extra):
    path = os.pathsep.join(
        p for p in (extra.pop("PYTHONPATH", None), REPO, os.environ.get("PYTHONPATH")) if p
    )
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def _child(args, stdout=subprocess.PIPE, **env):
    """A real ``effbert pretrain`` process."""
    return subprocess.Popen(
        [sys.executable, "-m", "effbert.commands", "pretrain", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(**env),
    )


def _listing(folder):
    """``{relative path: bytes}`` of every file under ``folder``."""
    return {
        os.path.relpath(os.path.join(r, n), folder): open(os.path.join(r, n), "rb").read()
        for r, _, names in os.walk(folder)
        for n in names
    }


def _log_steps(out):
    return [
        json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"), encoding="utf-8")
    ]


def _lrs(out):
    return {
        r["step"]: r["lr"]
        for r in map(json.loads, open(os.path.join(out, "log.jsonl"), encoding="utf-8"))
    }


# ------------------------------------------------------------------------------------------ one run per folder


def test_a_second_run_on_a_held_folder_stops_at_once_and_writes_nothing(tmp_path, files, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from effbert.training.run_folder import RunFolder; "
            "RunFolder(sys.argv[1], 'effbert pretrain', ()).lock(); print('held', flush=True); "
            "sys.stdin.read()",
            str(out),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _listing(out)
        assert before == {LOCK_FILE: f"{holder.pid}\n".encode()}
        second = _child(_args(files, out, "--max-steps", "2"))
        stdout, stderr = second.communicate(timeout=300)
        assert second.returncode == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and str(out) in lines[0], stderr
        assert _listing(out) == before
        # a resume is refused the same way, in this process too
        assert pretrain.main(_args(files, out, "--max-steps", "2", "--resume")) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err and _listing(out) == before
    finally:
        holder.kill()
        holder.wait()
    # the OS dropped the dead holder's lock: the folder is free again
    RunFolder(str(out), "effbert pretrain", ()).lock().release()


def test_the_lock_is_held_for_the_whole_run_and_left_with_nothing_behind(
    tmp_path, files, monkeypatch
):
    """Every write happens under the lock; the finished folder keeps no lock file, a refused run no folder."""
    from effbert.training import run_folder

    seen = []
    train = run_folder.RunFolder.train

    def spy(self, trainer, resume):
        probe = RunFolder(self.path, "effbert pretrain", ())
        with pytest.raises(cli.UsageError, match=f"pid {os.getpid()}"):
            probe.lock()
        seen.append(True)
        return train(self, trainer, resume)

    monkeypatch.setattr(run_folder.RunFolder, "train", spy)
    out = tmp_path / "run"
    assert pretrain.main(_args(files, out, "--max-steps", "1")) == 0
    assert seen and not (out / LOCK_FILE).exists()
    assert (
        pretrain.main(_args(files, tmp_path / "refused", "--max-steps", "1", "--heads", "3")) == 2
    )
    assert not (tmp_path / "refused").exists()


def test_an_out_holding_the_users_files_is_refused(tmp_path, files, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert pretrain.main(_args(files, out, "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert (
        "holds files effbert pretrain did not write (notes.txt)" in err
        and len(err.strip().splitlines()) == 1
    )
    assert sorted(os.listdir(out)) == ["notes.txt"]


# ------------------------------------------------------------------------------- a kill during a save, then resume

KILL_POINTS = [
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
]


@pytest.fixture(scope="module")
def killed(files, tmp_path_factory):
    """One real ``effbert pretrain`` process per kill point, run side by side, each ended (half the file written,
    then ``os._exit``) while saving that file of checkpoint-2; checkpoint-1 was saved whole."""
    root = tmp_path_factory.mktemp("killed")
    procs = {}
    for point in KILL_POINTS:
        procs[point] = _child(
            _args(files, root / point, "--max-steps", "3", "--save-steps", "1"),
            PYTHONPATH=KILLPOINT,
            EFFBERT_KILL_AT=f"checkpoint-2/{point}",
        )
    done = {}
    for point, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        done[point] = (proc.returncode, stderr, root / point)
    return done


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_during_a_save_resumes_from_the_checkpoint_before(killed, files, point, capsys):
    rc, stderr, out = killed[point]
    assert rc == 9, stderr[-2000:]  # ended where the kill point is
    ckpts = out / "checkpoints"
    assert (
        missing_files(ckpts / "checkpoint-1") == [] and missing_files(ckpts / "checkpoint-2") != []
    )
    assert not (out / "model.safetensors").exists()
    assert (
        pretrain.main(_args(files, out, "--max-steps", "3", "--save-steps", "1", "--resume")) == 0
    )
    text = capsys.readouterr().out
    assert re.search(
        r"skipping incomplete checkpoint-2 \(no [^)]+\): a save that did not finish, left in place",
        text,
    ), text
    assert "resuming from step 1" in text and "done: 3 steps" in text
    assert _log_steps(out)[-2:] == [2, 3]
    assert missing_files(out / "checkpoints" / "checkpoint-3") == []


def test_an_older_incomplete_checkpoint_is_never_deleted_by_the_resume(tmp_path, files, capsys):
    """Only Trainer's own rotation (the last two kept) removes checkpoints: the resume itself deletes nothing."""
    out = tmp_path / "run"
    assert pretrain.main(_args(files, out, "--max-steps", "2", "--save-steps", "1")) == 0
    os.remove(out / "checkpoints" / "checkpoint-2" / "trainer_state.json")
    os.remove(out / "model.safetensors")
    (out / "checkpoints" / "checkpoint-7").mkdir()  # a stray, empty: not a save of this run
    capsys.readouterr()
    assert (
        pretrain.main(_args(files, out, "--max-steps", "2", "--save-steps", "1", "--resume")) == 0
    )
    text = capsys.readouterr().out
    assert (
        "skipping incomplete checkpoint-7 (no config.json" in text
        and "checkpoint-2 (no trainer_state.json)" in text
    )
    ckpts = out / "checkpoints"
    assert (ckpts / "checkpoint-7").is_dir() and missing_files(ckpts / "checkpoint-2") == []


# --------------------------------------------------------------------------------------------------- a full disk


def test_a_full_disk_during_a_save_is_one_line(tmp_path, files):
    """A 20 MiB tmpfs, filled but for room for one checkpoint and a half: the second save fails."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a tmpfs in a mount namespace")
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (unshare -rm: {probe.stderr.strip()[:200]})")
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir()
    # what the run writes before its first save and one checkpoint take, in tmpfs pages, from a run on the disk
    assert (
        pretrain.main(_args(files, tmp_path / "probe", "--max-steps", "1", "--save-steps", "1"))
        == 0
    )

    def pages(names):
        return sum(
            -(-len(v) // 4096) * 4096 for k, v in _listing(tmp_path / "probe").items() if names(k)
        )

    ckpt = pages(lambda k: k.startswith(os.path.join("checkpoints", "checkpoint-1")))
    first = pages(
        lambda k: k in ("tokenizer.json", "tokenizer_config.json", "pretrain.json", "log.jsonl")
    )
    fill = 20 * 2**20 - first - int(1.5 * ckpt) - 16 * 4096
    cmd = [
        sys.executable,
        "-m",
        "effbert.commands",
        "pretrain",
        *_args(files, mnt / "run", "--max-steps", "6", "--save-steps", "1"),
    ]
    script = (
        f"mount -t tmpfs -o size=20m tmpfs {mnt} && head -c {fill} /dev/zero > {mnt}/filler && "
        f"{subprocess.list2cmdline(cmd)} 2> {tmp_path}/stderr; echo $? > {tmp_path}/rc; "
        f"cp -r {mnt}/run {copy}"
    )
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(), timeout=600, check=True)
    stderr = (tmp_path / "stderr").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    m = re.fullmatch(
        r"effbert pretrain: error: no space left on device while saving checkpoint-(\d+); "
        r"checkpoint-(\d+) is intact",
        lines[0],
    )
    assert m and int(m[2]) < int(m[1]), lines[0]
    assert missing_files(copy / "checkpoints" / f"checkpoint-{m[2]}") == []


# ----------------------------------------------------------------------------------------------- ctrl-C, SIGTERM


def test_ctrl_c_and_sigterm_end_in_one_line(tmp_path, files):
    procs = {
        sig: _child(
            _args(files, tmp_path / sig.name, "--max-steps", "100000", "--save-steps", "2"),
            stdout=subprocess.DEVNULL,
        )
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        for sig, proc in procs.items():  # wait for a whole checkpoint, then stop the run
            deadline = time.monotonic() + 300
            while newest_complete(str(tmp_path / sig.name / "checkpoints")) is None:
                assert proc.poll() is None and time.monotonic() < deadline, f"rc {proc.poll()}"
                time.sleep(0.2)
            proc.send_signal(sig)
        for sig, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == (130 if sig == signal.SIGINT else 143), stderr[-3000:]
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
            m = STOP_LINE.match(lines[0])
            assert m and m[3] is not None and 2 <= int(m[3]) <= int(m[1]), lines[0]
            assert missing_files(tmp_path / sig.name / "checkpoints" / f"checkpoint-{m[3]}") == []
            assert not (tmp_path / sig.name / LOCK_FILE).exists()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


# ------------------------------------------------------------------------------------------------- other data


def test_resume_on_other_data_is_refused_by_name(tmp_path, files, capsys):
    corpus = tmp_path / "corpus.txt"
    shutil.copy(files["corpus"], corpus)
    out = tmp_path / "run"
    assert (
        pretrain.main(_args(files, out, "--max-steps", "1", "--save-steps", "1", data=str(corpus)))
        == 0
    )
    recorded = json.loads((out / "pretrain.json").read_text())["data"]
    assert recorded[0]["size"] == corpus.stat().st_size and len(recorded[0]["sha256_ends"]) == 64
    resume = _args(files, out, "--max-steps", "2", "--resume", data=str(corpus))
    text = corpus.read_text()
    corpus.write_text(text + "One more line of text here.\n")
    capsys.readouterr()
    assert pretrain.main(resume) == 2
    err = capsys.readouterr().err
    assert "--data:" in err and "corpus.txt" in err and f"{len(text.encode())} bytes then" in err, (
        err
    )
    corpus.write_text(text.replace("e", "E", 1))  # the same size, other bytes
    assert pretrain.main(resume) == 2
    assert "the same size, other contents" in capsys.readouterr().err
    assert pretrain.main([*resume, "--data", str(corpus), str(corpus)]) == 2
    assert "was trained on 1 file(s)" in capsys.readouterr().err
    corpus.write_text(text)  # the same data again (the path need not be the same)
    moved = tmp_path / "moved.txt"
    shutil.copy(corpus, moved)
    assert pretrain.main(_args(files, out, "--max-steps", "2", "--resume", data=str(moved))) == 0


# ----------------------------------------------------------------------------------------- a longer resume


def test_a_longer_resume_keeps_the_schedule_unless_reshaped(tmp_path, files, capsys):
    """4 steps (linear decay to 0 at step 4), then --resume --max-steps 8: the run's schedule, so
    steps 5-8 train at lr 0; with --reshape-schedule the schedule of a run started with --max-steps
    8."""
    base = tmp_path / "base"
    assert pretrain.main(_args(files, base, "--max-steps", "4", "--save-steps", "4")) == 0
    os.remove(base / "model.safetensors")
    kept, reshaped, long = tmp_path / "kept", tmp_path / "reshaped", tmp_path / "long"
    shutil.copytree(base, kept)
    shutil.copytree(base, reshaped)
    capsys.readouterr()
    assert pretrain.main(_args(files, kept, "--max-steps", "8", "--resume")) == 0
    assert (
        "keeping the run's learning-rate schedule: warm-up 0 steps, linear decay to 0 at step 4 "
        "(the steps after it train at lr 0; --reshape-schedule stretches it to --max-steps 8)"
        in capsys.readouterr().out
    )
    lr = _lrs(kept)
    assert lr[3] == _lrs(base)[3] > 0 and all(lr[s] == 0 for s in (5, 6, 7, 8))
    assert (
        pretrain.main(_args(files, reshaped, "--max-steps", "8", "--resume", "--reshape-schedule"))
        == 0
    )
    assert (
        "reshaping the learning-rate schedule (--reshape-schedule): linear decay to 0 at step 8, was 4"
        in capsys.readouterr().out
    )
    assert pretrain.main(_args(files, long, "--max-steps", "8")) == 0
    assert all(_lrs(reshaped)[s] == _lrs(long)[s] > 0 for s in (5, 6, 7, 8))
    assert json.loads((reshaped / "pretrain.json").read_text())["schedule"] == {
        "steps": 8,
        "warmup": 0,
    }
    assert (
        pretrain.main(_args(files, tmp_path / "new", "--max-steps", "2", "--reshape-schedule")) == 2
    )
    assert "--reshape-schedule goes with --resume" in capsys.readouterr().err


def test_make_readable_gives_files_the_mode_open_gives(tmp_path):
    """safetensors' save_file writes 0600 (a private temporary file renamed); make_readable gives
    every file under a folder 0666 less the umask (0644 under 022), as open() would, and names what
    it changed."""
    import torch
    from safetensors.torch import save_file

    from effbert.training.run_folder import make_readable

    old = os.umask(0o022)
    try:
        (tmp_path / "ckpt").mkdir()
        save_file({"x": torch.ones(2)}, str(tmp_path / "ckpt" / "model.safetensors"))
        (tmp_path / "plain.json").write_text("{}")

        def modes():
            return {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}

        assert modes() == {"model.safetensors": 0o600, "plain.json": 0o644}  # the cause
        assert make_readable(str(tmp_path)) == [str(tmp_path / "ckpt" / "model.safetensors")]
        assert modes() == {"model.safetensors": 0o644, "plain.json": 0o644}
        assert make_readable(str(tmp_path / "plain.json")) == []
        os.umask(0o077)
        os.chmod(tmp_path / "plain.json", 0o644)
        make_readable(str(tmp_path / "plain.json"))
        assert modes()["plain.json"] == 0o600  # the umask decides, as for open()
    finally:
        os.umask(old)
    with pytest.raises(FileNotFoundError, match="path"):
        make_readable(str(tmp_path / "missing"))
