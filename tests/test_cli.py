"""The charmlp command line: train, eval, sample, plot, lr-find, and its error messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from charmlp.cli import main

from _train_util import NAMES_TXT, write_words

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--steps", "400", "--hidden", "32", "--init", "default", "--threads", "1",
         "--eval-every", "200", "--checkpoint-every", "200", "-q"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *SMALL, "--samples", "4", "--out", str(run)]) == 0
    return run


def test_train_prints_corpus_losses_and_samples(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "corpus: names package (US Census 1990 first names): 5,163 words" in text
    assert "final losses" in text and "perplexity" in text and "bits/char" in text
    for split in ("train", "dev", "test"):
        assert f"\n  {split} " in text
    assert "samples (seed" in text and "occur in the training words" in text
    results = json.loads((out / "results.json").read_text())
    assert results["losses"]["dev"]["loss"] < 3.0
    assert len(results["samples"]) == 10


def test_train_progress_goes_to_stderr(tmp_path, capsys):
    args = [a for a in SMALL if a != "-q"]
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "step" in err and "steps/s" in err and "ETA" in err and "400/400 100.0%" in err


def test_resume_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--steps", "200", "--lr-schedule", "constant", "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--steps", "400", "-q"]) == 0
    assert "resuming at step 200" in capsys.readouterr().out
    assert main(["train", "--resume", str(out), "--hidden", "64"]) == 2
    assert "--hidden 64 differs" in capsys.readouterr().err


def test_eval(run_dir, capsys):
    assert main(["eval", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "at step 400" in text and "train" in text and "dev" in text and "test" in text
    assert main(["eval", str(run_dir), "--json", "--reference"]) == 0
    data = json.loads(capsys.readouterr().out)
    results = json.loads((run_dir / "results.json").read_text())
    for split in ("train", "dev", "test"):
        assert data["losses"][split]["loss"] == pytest.approx(results["losses"][split]["loss"], abs=1e-4)


def test_eval_on_another_word_list(run_dir, tmp_path, capsys):
    good = write_words(tmp_path / "good.txt", ["Anna", "bob"])
    assert main(["eval", str(run_dir), "--data", str(good)]) == 0
    assert "good.txt" in capsys.readouterr().out
    bad = write_words(tmp_path / "bad.txt", ["anna", "zoë"])
    assert main(["eval", str(run_dir), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "'ë'" in err and "'zoë'" in err and "not in the vocabulary" in err


def test_sample_is_deterministic(run_dir, capsys):
    args = ["sample", str(run_dir), "-n", "8", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert main(["sample", str(run_dir), "-n", "8", "--seed", "4"]) == 0
    assert capsys.readouterr().out != first
    assert "8 samples" in first and "occur in the training words" in first


def test_sample_options(run_dir, capsys):
    assert main(["sample", str(run_dir), "-n", "5", "--temperature", "0.7", "--top-k", "5",
                 "--prefix", "Ma"]) == 0
    words = [l.strip(" *") for l in capsys.readouterr().out.splitlines()[1:-1]]
    assert len(words) == 5 and all(w.startswith("ma") for w in words)
    assert main(["sample", str(run_dir), "--prefix", "é"]) == 2
    assert "not in the vocabulary" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", str(run_dir), "--temperature", "0"])


def test_plot(run_dir, tmp_path, capsys):
    assert main(["plot", str(run_dir), "--out-dir", str(tmp_path)]) == 0
    for name in ("loss.png", "embedding.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert "loss.png" in capsys.readouterr().out


def test_plot_of_a_2d_embedding(tmp_path):
    from charmlp.checkpoint import load_checkpoint
    from charmlp.plot import embedding_2d

    run = tmp_path / "run"
    assert main(["train", *SMALL, "--steps", "50", "--emb-dim", "2", "--out", str(run)]) == 0
    assert main(["plot", str(run)]) == 0
    assert (run / "embedding.png").read_bytes()[:8] == PNG
    table = load_checkpoint(run)["model"]["state_dict"]["embed.table"]
    xy, how = embedding_2d(table)
    assert (xy == table.double().numpy()).all() and "principal" not in how
    xy5, how5 = embedding_2d(table.repeat(1, 3))
    assert xy5.shape == (27, 2) and "principal components" in how5


def test_lr_find(tmp_path, capsys):
    out = tmp_path / "sweep.png"
    assert main(["lr-find", "--num", "100", "--hidden", "32", "--threads", "1", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    assert "suggested lr" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/nonexistent/words.txt"], "/nonexistent/words.txt: no such file"),
    (["train", "--resume", "/nonexistent/run"], "no checkpoint"),
    (["eval", "/nonexistent/run"], "no checkpoint"),
    (["sample", "/nonexistent/run"], "no checkpoint"),
    (["train", "--test-count", "100000", "--steps", "10"], "leave no training words"),
])
def test_errors_are_one_line_messages(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("charmlp ")


def test_bad_data_files_through_the_cli(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert f"{empty}: is empty" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_corrupt_checkpoint_through_the_cli(run_dir, tmp_path, capsys):
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    ck = bad / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:-100])
    for cmd in (["eval", str(bad)], ["sample", str(bad)], ["train", "--resume", str(bad)]):
        assert main(cmd) == 2
        assert "corrupt or truncated" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["train", "--steps", "-5"], ["train", "--lr", "abc"],
                                  ["train", "--optimizer", "rmsprop"], ["frobnicate"]])
def test_bad_flags_exit_2(args):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2


def test_python_dash_m_and_console_script(run_dir):
    r = subprocess.run([sys.executable, "-m", "charmlp", "sample", str(run_dir), "-n", "3", "--seed", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "3 samples" in r.stdout
    exe = shutil.which("charmlp")
    if exe is None:
        pytest.skip("the charmlp console script is not on PATH (package not pip-installed)")
    r2 = subprocess.run([exe, "sample", str(run_dir), "-n", "3", "--seed", "1"],
                        capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and r2.stdout == r.stdout


@pytest.mark.skipif(not NAMES_TXT.exists(), reason=f"{NAMES_TXT} not present")
def test_train_on_names_txt_reports_its_size(tmp_path, capsys):
    assert main(["train", *SMALL, "--steps", "20", "--data", str(NAMES_TXT), "--samples", "0",
                 "--out", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert f"{NAMES_TXT}: 32,033 words" in text
    assert "182,625 / 22,655 / 22,866" in text


# --------------------------------------------------------------------------- never silently wrong


def _one_line_error(capsys, *fragments) -> str:
    err = capsys.readouterr().err
    assert err.startswith("charmlp ") and err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def _strict_json(text: str):
    """json.loads that refuses Python's non-standard NaN/Infinity."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_a_diverging_run_is_a_clear_error_and_leaves_a_consistent_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--steps", "200", "--lr", "1000", "--out", str(run)]) == 2
    err = _one_line_error(capsys, "training diverged at step ", "lower --lr")
    step = int(err.split("diverged at step ")[1].split()[0].replace(",", ""))
    assert step < 64  # (the first chunk's minibatch losses say so, step by step)
    from charmlp.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run)  # a valid checkpoint of the diverged state...
    assert ckpt["diverged"]["step"] == step
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + ckpt["step"]  # ...and the metrics logged up to it
    results = _strict_json((run / "results.json").read_text())
    assert results["diverged"]["step"] == step and results["steps"] == ckpt["step"]
    assert json.loads((run / "config.json").read_text())["train_config"]["lr"] == 1000
    # eval reports it (a perplexity that overflows is inf, not an OverflowError)
    assert main(["eval", str(run)]) == 0
    assert "inf" in capsys.readouterr().out
    assert main(["eval", str(run), "--json"]) == 0
    data = _strict_json(capsys.readouterr().out)
    assert float(data["losses"]["dev"]["perplexity"]) == float("inf")
    assert main(["plot", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    _one_line_error(capsys, "diverged", "lower --lr")


def test_a_divergence_after_a_checkpoint_keeps_the_last_good_one(tmp_path, capsys):
    run = tmp_path / "run"
    # 100 good steps at 0.1, a checkpoint, then --lr-final 1e4 from step 100 on
    assert main(["train", *SMALL, "--steps", "200", "--lr", "0.1", "--lr-final", "10000",
                 "--checkpoint-every", "100", "--out", str(run)]) == 2
    err = _one_line_error(capsys, "training diverged at step 1", "kept as")
    from charmlp.checkpoint import load_checkpoint

    assert load_checkpoint(run / "checkpoint-step100.pt")["step"] == 100
    assert "diverged" not in load_checkpoint(run / "checkpoint-step100.pt")
    assert str(run / "checkpoint-step100.pt") in err
    assert main(["eval", str(run / "checkpoint-step100.pt")]) == 0


def test_out_under_a_file_or_a_file_is_a_one_line_error(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert main(["train", *SMALL, "--steps", "10", "--out", str(a_file / "run")]) == 2
    _one_line_error(capsys, f"cannot write {a_file / 'run'}", "which is a file")
    assert main(["train", *SMALL, "--steps", "10", "--out", str(a_file)]) == 2
    _one_line_error(capsys, f"cannot write {a_file}", "is a file")
    assert a_file.read_text() == "keep me"


def test_a_read_only_run_dir_is_a_one_line_error(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("permissions do not apply (running as root?)")
        assert main(["train", *SMALL, "--steps", "10", "--out", str(ro / "run")]) == 2
        _one_line_error(capsys, f"cannot write {ro / 'run'}", "Permission denied")
        assert main(["train", *SMALL, "--steps", "10", "--out", str(ro)]) == 2
        _one_line_error(capsys, f"cannot write {ro / '.lock'}", "Permission denied")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("where", ["checkpoint", "metrics"])
def test_a_full_disk_is_a_one_line_error(tmp_path, capsys, monkeypatch, where):
    """(Root ignores permissions, and a full disk cannot be made here: the write fails as
    a full disk would, through the same code path.)"""
    import errno

    import charmlp.checkpoint as ckpt_mod
    import charmlp.train.rundir as rundir_mod

    def disk_full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "checkpoint":
        monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    else:
        monkeypatch.setattr(rundir_mod._RunFiles, "log_steps", disk_full)
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--steps", "100", "--checkpoint-every", "50", "--out", str(run)]) == 2
    _one_line_error(capsys, f"cannot write {run}", "No space left on device")
    assert not list(run.glob(".*.tmp-*"))  # (the failed write cleaned up after itself)


@pytest.mark.parametrize("cmd", [["train", "--steps", "10"], ["lr-find", "--num", "10"]])
def test_seeds_must_fit_in_64_bits(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*cmd, "--seed", str(2**63)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seed: expected an integer below 2**63" in err and "Traceback" not in err


def test_the_largest_seed_works(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", str(run_dir), "--seed", str(2**64)])
    assert exc.value.code == 2 and "below 2**63" in capsys.readouterr().err
    assert main(["sample", str(run_dir), "-n", "2", "--seed", str(2**63 - 1)]) == 0
    assert main(["train", *SMALL, "--steps", "10", "--seed", str(2**63 - 1),
                 "--out", str(tmp_path / "run")]) == 0


@pytest.mark.parametrize("content, message", [("", "is empty"), ("step,lr,loss\n", "no steps logged")])
def test_plot_of_empty_metrics_is_a_one_line_error(run_dir, tmp_path, capsys, content, message):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "metrics.csv").write_text(content)
    assert main(["plot", str(run)]) == 2
    _one_line_error(capsys, f"{run / 'metrics.csv'}: {message}")


def test_plot_does_not_create_a_mistyped_run_dir(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "no-such-run")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "no-such-run").exists()


def test_sample_of_non_finite_parameters_is_a_one_line_error(run_dir, tmp_path, capsys):
    from charmlp.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    state = load_checkpoint(run)
    state["model"]["state_dict"]["embed.table"][0, 0] = float("nan")
    save_checkpoint(run / "checkpoint.pt", state)
    assert main(["sample", str(run)]) == 2
    _one_line_error(capsys, "parameters are not finite")
