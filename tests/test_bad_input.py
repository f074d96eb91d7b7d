"""Bad input: one-line errors naming the file, key or value, raised before training; and
nothing a failure or a kill leaves behind can damage completed results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from tiny_runs import BAD, FIXTURES, copy_task_folder, needs_fixtures, tiny_config

from blurbtune.errors import BlurbtuneError
from blurbtune.io import write_json, write_jsonl
from blurbtune.run import Refused, run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if training starts: the error must come first."""
    def fit(*args, **kwargs):
        raise AssertionError("training started before the bad input was reported")

    monkeypatch.setattr("pytorch_lightning.Trainer.fit", fit)


def error_of(tmp_path, *overrides, data_dir=FIXTURES) -> str:
    with pytest.raises(BlurbtuneError) as e:
        run(tiny_config(tmp_path / "run", tmp_path / "cache", *overrides, data_dir=data_dir))
    message = str(e.value)
    assert "\n" not in message
    return message


pytestmark = [needs_fixtures, pytest.mark.usefixtures("no_training")]


def test_missing_data_dir(tmp_path):
    msg = error_of(tmp_path, data_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "BIOSSES") in msg and "expected" in msg


def test_missing_split(tmp_path):
    data = copy_task_folder("BIOSSES", tmp_path / "data", drop=("test.tsv",))
    msg = error_of(tmp_path, data_dir=data)
    assert "test.tsv" in msg and "missing test split" in msg


def test_malformed_line(tmp_path):
    data = copy_task_folder("chemprot", tmp_path / "data",
                            {"train.tsv": BAD / "relation_missing_column.tsv"})
    msg = error_of(tmp_path, "task=chemprot", data_dir=data)
    assert "chemprot/train.tsv:2" in msg and "columns" in msg


def test_unknown_label(tmp_path):
    data = copy_task_folder("chemprot", tmp_path / "data",
                            {"dev.tsv": BAD / "relation_unknown_label.tsv"})
    msg = error_of(tmp_path, "task=chemprot", data_dir=data)
    assert "chemprot/dev.tsv:2" in msg and "'CPR:7'" in msg and "expected one of" in msg


def test_unknown_ner_tag(tmp_path):
    data = copy_task_folder("NCBI-disease", tmp_path / "data",
                            {"train.tsv": BAD / "ner_unknown_tag.tsv"})
    msg = error_of(tmp_path, "task=ncbi_disease", data_dir=data)
    assert "train.tsv:9" in msg and "B-Foo" in msg


def test_empty_split(tmp_path):
    data = copy_task_folder("BIOSSES", tmp_path / "data", {"train.tsv": BAD / "empty_train.tsv"})
    msg = error_of(tmp_path, data_dir=data)
    assert "BIOSSES/train.tsv" in msg and "no examples" in msg


def test_model_path_that_does_not_exist(tmp_path):
    msg = error_of(tmp_path, "model=minilm", f"model.name_or_path={tmp_path}/no-model")
    assert f"{tmp_path}/no-model" in msg and "no such folder" in msg


@pytest.mark.parametrize("config", [None, "{}", '{"model_type": "no-such-type"}'])
def test_a_folder_that_holds_no_model(tmp_path, config):
    """A folder without a model's config.json (or with one naming no known model type) was a
    raw ValueError traceback from transformers."""
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config)
    msg = error_of(tmp_path, "model=minilm", f"model.name_or_path={folder}")
    assert msg.startswith(f"could not load a tokenizer from {str(folder)!r}: ") or \
        msg.startswith(f"could not load model.name_or_path={str(folder)!r}: "), msg


def test_hub_id_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = error_of(tmp_path, "model=pubmedbert")
    assert "HF_HUB_OFFLINE" in msg and "model.name_or_path='microsoft/" in msg


@pytest.mark.parametrize("overrides, key", [
    (("stabilizer=freeze_lower", "stabilizer.freeze.layers=5"), "stabilizer.freeze.layers"),
    (("stabilizer=reinit_top", "stabilizer.reinit.layers=9"), "stabilizer.reinit.layers"),
])
def test_more_layers_than_the_model_has(tmp_path, overrides, key):
    msg = error_of(tmp_path, *overrides)
    assert key in msg and "between 0 and 4" in msg


@pytest.mark.parametrize("decay", ["0", "-0.5", "1.5"])
def test_llrd_decay_outside_0_1(tmp_path, decay):
    msg = error_of(tmp_path, "stabilizer=llrd", f"stabilizer.llrd.decay={decay}")
    assert "stabilizer.llrd.decay" in msg and "(0, 1]" in msg


def test_max_length_beyond_position_embeddings(tmp_path):
    msg = error_of(tmp_path, "task.max_length=1000")
    assert "task.max_length=1000" in msg and "512 position embeddings" in msg


def test_unknown_stabilizer_knob_added(tmp_path):
    msg = error_of(tmp_path, "stabilizer=llrd", "+stabilizer.llrd.decai=0.5")
    assert "stabilizer.llrd.decai" in msg and "known: ['decay']" in msg


def test_unknown_stabilizer_knob_is_rejected_by_the_config(tmp_path):
    with pytest.raises(ConfigCompositionException, match=r"stabilizer\.llrd\.decai"):
        tiny_config(tmp_path, tmp_path, "stabilizer=llrd", "stabilizer.llrd.decai=0.5")


def test_a_failed_rerun_never_overwrites_completed_results(tmp_path, monkeypatch):
    monkeypatch.undo()  # this one trains
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache")
    run(cfg)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*.json*")}
    cfg.data_dir = str(tmp_path / "gone")  # a rerun that would fail if it ran
    # Its data cannot be compared with the folder's record: refused, not skipped (issue 28).
    with pytest.raises(Refused, match="this command's data cannot be read"):
        run(cfg)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*.json*")} == before


def test_a_kill_mid_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "predictions.jsonl"
    write_jsonl(path, [{"id": 1}])
    script = (
        "import os, signal, sys\n"
        "from blurbtune.io import write_jsonl\n"
        "def rows():\n"
        "    yield {'id': 2}\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"write_jsonl({str(path)!r}, rows())\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", script], env=env)
    assert done.returncode == -9
    assert path.read_text() == '{"id": 1}\n'


def test_a_crash_mid_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json(path, {"status": "completed"})

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"status": "running"})
    assert json.loads(path.read_text()) == {"status": "completed"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def _train(tmp_path, *args):
    env = {**os.environ, "BLURB_DATA_DIR": str(FIXTURES), "OMP_NUM_THREADS": "1",
           "BLURBTUNE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args, "model=tiny",
                           "trainer.max_epochs=1", "data.max_train_examples=8",
                           "data.max_eval_examples=4"],
                          env=env, capture_output=True, text=True, cwd=tmp_path)


@pytest.mark.slow
def test_train_py_single_run_bad_input_is_one_line_and_status_2(tmp_path):
    done = _train(tmp_path, "stabilizer=freeze_lower", "stabilizer.freeze.layers=9")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: stabilizer.freeze.layers")
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_train_py_multirun_records_the_bad_run_and_goes_on(tmp_path):
    done = _train(tmp_path, "-m", "stabilizer=freeze_lower", "stabilizer.freeze.layers=9,1",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert done.returncode == 1, done.stderr[-2000:]  # after the other run: see sweep_outcome
    assert "stabilizer.freeze.layers=9" in done.stderr.strip().splitlines()[-1]
    status = {p.parent.name: json.loads(p.read_text())["status"]
              for p in (tmp_path / "sweep").glob("*/results.json")}
    assert sorted(status.values()) == ["completed", "failed"]
    failed = next(p for p in (tmp_path / "sweep").glob("*layers=9*/results.json"))
    assert "stabilizer.freeze.layers" in json.loads(failed.read_text())["error"]


def _fine_tuned_folder(tmp_path, task: str) -> Path:
    """A model folder as `save_model=true` leaves it: the tiny encoder with `task`'s head."""
    from blurbtune.models import load_model, load_tokenizer

    cfg = tiny_config(tmp_path / "unused", tmp_path / "cache", f"task={task}")
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    folder = tmp_path / f"{task}-model"
    load_model(cfg.model, cfg.task, tokenizer).save_pretrained(folder)
    return folder


def test_a_fine_tuned_head_for_other_labels(tmp_path):
    folder = _fine_tuned_folder(tmp_path, "biosses")
    msg = error_of(tmp_path, "task=gad", f"model.name_or_path={folder}")
    assert f"model.name_or_path='{folder}'" in msg
    assert "1 label (score)" in msg and "2 labels (0, 1)" in msg
    assert "model.new_head=true" in msg


def test_new_head_keeps_the_encoder_and_trains_a_fresh_head(tmp_path):
    """Even where the shapes fit (GAD's two labels, BioASQ's yes/no), the head is new."""
    from safetensors.torch import load_file

    from blurbtune.families import encoder_parts
    from blurbtune.models import load_model, load_tokenizer

    folder = _fine_tuned_folder(tmp_path, "gad")
    saved = load_file(folder / "model.safetensors")
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache", "task=bioasq",
                      f"model.name_or_path={folder}", "model.new_head=true")
    model = load_model(cfg.model, cfg.task, load_tokenizer(cfg.model, cfg.task))
    state = model.state_dict()
    head = encoder_parts(model).head_prefixes
    assert head == ["classifier"]
    heads = [k for k in saved if k.startswith("classifier.")]
    assert heads and all(state[k].shape == saved[k].shape for k in heads)
    assert not torch.equal(state["classifier.weight"], saved["classifier.weight"])  # biases: 0
    encoder = [k for k in saved if k.startswith("bert.") and "word_embeddings" not in k]
    assert encoder and all(torch.equal(state[k], saved[k]) for k in encoder)
    assert list(model.config.id2label.values()) == list(cfg.task.labels)


def test_dry_run_needs_no_data(tmp_path):
    run(tiny_config(tmp_path / "run", tmp_path / "cache", "stabilizer=llrd", "dry_run=true",
                    data_dir=tmp_path / "no-data-here"))
    assert (tmp_path / "run" / "param_groups.json").is_file()
    assert not (tmp_path / "no-data-here").exists()


def _data_check(data_dir) -> tuple[int, str]:
    import contextlib
    import io

    from blurbtune.data_check import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["check", str(data_dir)])
    return status, out.getvalue()


def test_data_check_exits_1_when_a_split_is_missing(tmp_path):
    import shutil

    data = tmp_path / "blurb"
    shutil.copytree(FIXTURES, data)
    assert _data_check(data)[0] == 0  # all there (the fixtures are small: counts differ)
    (data / "BIOSSES" / "test.tsv").unlink()
    status, out = _data_check(data)
    assert status == 1
    biosses = next(line for line in out.splitlines() if line.startswith("BIOSSES"))
    assert biosses.endswith("missing test, differs train/dev")
    assert "1 split(s) missing or unreadable: exit status 1." in out


@pytest.mark.parametrize("mentions, known", [(4246, True), (4245, False)])
def test_data_check_says_why_a_count_differs_where_it_is_known(tmp_path, mentions, known):
    """BLURB's own BC5CDR-disease dev.tsv has 4,246 mentions, Table 3 says 4,244."""
    dev = tmp_path / "dev.tsv"
    dev.write_text("".join(f"w{i}\tB-Disease\n" for i in range(mentions)))  # one per word
    data = copy_task_folder("BC5CDR-disease", tmp_path / "blurb", {"dev.tsv": dev})
    _, out = _data_check(data)
    row = next(line for line in out.splitlines() if line.startswith("BC5-disease"))
    assert f"{mentions:,} / 4,244" in row
    assert row.endswith("differs train/test, known difference dev" if known  # fixture sizes
                        else "differs train/dev/test")
    note = "bc5disease/dev: 4,246 vs 4,244: BLURB's own BC5CDR-disease dev.tsv has 2 more"
    assert (note in out) == known


@pytest.mark.parametrize("task, folder, split_file, fixture, where", [
    ("biosses", "BIOSSES", "train.tsv", "biosses_latin1.tsv", ":3: byte 0xef at column 5"),
    ("ncbi_disease", "NCBI-disease", "dev.tsv", "ner_latin1.tsv", ":3: byte 0xf6 at column 3"),
    ("pubmedqa", "pubmedqa", "test_set.json", "pubmedqa_latin1.json",
     ":3: byte 0xe9 at column 24"),
])
def test_a_file_that_is_not_utf8_names_its_line(tmp_path, task, folder, split_file, fixture,
                                                where):
    """It raised UnicodeDecodeError '... in position 1665': no file, no line."""
    data = copy_task_folder(folder, tmp_path / "data", {split_file: BAD / fixture})
    msg = error_of(tmp_path, f"task={task}", data_dir=data)
    assert f"{folder}/{split_file}{where} is not UTF-8" in msg
    assert msg.endswith("expected UTF-8 text (re-save the file as UTF-8)")


def test_a_split_that_is_a_folder(tmp_path):
    data = copy_task_folder("BIOSSES", tmp_path / "data", drop=("dev.tsv",))
    (data / "BIOSSES" / "dev.tsv").mkdir()
    msg = error_of(tmp_path, data_dir=data)
    assert msg == (f"{data / 'BIOSSES' / 'dev.tsv'}: is not a file; expected the dev split of "
                   "task 'biosses' as a file")


def test_data_check_lists_a_file_that_is_not_utf8_as_unreadable(tmp_path):
    import shutil

    data = tmp_path / "blurb"
    shutil.copytree(FIXTURES, data)
    shutil.copyfile(BAD / "biosses_latin1.tsv", data / "BIOSSES" / "dev.tsv")
    status, out = _data_check(data)
    assert status == 1
    assert next(line for line in out.splitlines() if line.startswith("BIOSSES")).endswith(
        "error dev")
    assert (f"  biosses/dev: {data / 'BIOSSES' / 'dev.tsv'}:3: byte 0xef at column 5 is not "
            "UTF-8 (invalid continuation byte)") in out
    assert "1 split(s) missing or unreadable: exit status 1." in out


@pytest.mark.parametrize("score", ["nan", "inf", "-inf"])
def test_a_score_that_is_not_finite(tmp_path, score):
    """float() takes 'nan': the run then diverged on a NaN gold score, recorded as a finding."""
    data = copy_task_folder("BIOSSES", tmp_path / "data")
    train = data / "BIOSSES" / "train.tsv"
    lines = train.read_text().splitlines()
    pair_id, s1, s2, _ = lines[2].split("\t")
    lines[2] = "\t".join([pair_id, s1, s2, score])
    train.write_text("\n".join(lines) + "\n")
    msg = error_of(tmp_path, data_dir=data)
    assert msg == f"{train}:3: expected a numeric score, got {score!r}"


@pytest.mark.parametrize("entry, expected", [
    ({"QUESTION": "Q?", "CONTEXTS": "one string", "final_decision": "yes"},
     "expected QUESTION a string and CONTEXTS a list of strings"),  # was joined letter by letter
    (["a", "list"], "is a JSON list; expected an object with QUESTION, CONTEXTS and "
                    "final_decision"),
])
def test_a_pubmedqa_entry_of_the_wrong_shape(tmp_path, entry, expected):
    data = copy_task_folder("pubmedqa", tmp_path / "data")
    path = data / "pubmedqa" / "pqal_fold0" / "train_set.json"
    entries = json.loads(path.read_text())
    first = next(iter(entries))
    entries[first] = entry
    path.write_text(json.dumps(entries))
    msg = error_of(tmp_path, "task=pubmedqa", data_dir=data)
    assert msg.startswith(f"{path}: entry '{first}'") and msg.endswith(expected)


def test_data_check_lists_a_split_that_is_a_folder_as_unreadable(tmp_path):
    data = copy_task_folder("BIOSSES", tmp_path / "blurb", drop=("dev.tsv",))
    (data / "BIOSSES" / "dev.tsv").mkdir()
    status, out = _data_check(data)
    assert status == 1
    assert f"  biosses/dev: {data / 'BIOSSES' / 'dev.tsv'}: is not a file" in out
    assert next(line for line in out.splitlines() if line.startswith("BIOSSES")).endswith(
        "error dev")  # it said "missing dev"


def test_data_check_on_the_folder_of_one_dataset_says_to_give_its_parent(tmp_path):
    data = copy_task_folder("BIOSSES", tmp_path / "blurb")
    status, out = _data_check(data / "BIOSSES")
    assert status == 1
    assert (f"{data / 'BIOSSES'} looks like the folder of one dataset: give the folder that "
            f"holds the dataset folders (here {data}).") in out


def test_a_cache_dir_that_is_a_file(tmp_path):
    (tmp_path / "cache-file").write_text("")
    msg = error_of(tmp_path, f"data.cache_dir={tmp_path / 'cache-file'}")
    assert msg.startswith(f"data.cache_dir='{tmp_path / 'cache-file'}': cannot be a folder")
    assert msg.endswith("expected a folder for the tokenised splits, or null for none")
