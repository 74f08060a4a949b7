"""The charmlp command line: train, eval, sample, plot, lr-find, and its error messages."""

from __future__ import annotations

import json
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
