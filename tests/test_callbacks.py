"""Callbacks see every hook in order, can add to records, stop training, and carry state across resume."""

import json

import pytest
from conftest import CrashAfter, photo_split, tiny_tuner

from tlkit import FreezePolicy
from tlkit.callbacks import HOOKS, Callback, CallbackList, EarlyStopping

CLASSES = ["cardboard", "glass", "metal"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return photo_split(tmp_path_factory.mktemp("cb"), CLASSES)


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def __getattribute__(self, name):
        if name in HOOKS:
            calls = object.__getattribute__(self, "calls")
            return lambda tuner, *args: calls.append((name, tuner.epoch, tuner.step))
        return object.__getattribute__(self, name)


def test_a_callback_sees_every_hook_in_order(data, tmp_path):
    train, val = data  # 12 images, batch 4: 3 steps per epoch
    rec = Recorder()
    policy = FreezePolicy.linear_probe().then(1, depth=0)
    tiny_tuner(CLASSES, output_dir=tmp_path / "run", policy=policy, epochs=2, callbacks=[rec]).fit(train, val)
    names = [c[0] for c in rec.calls]
    epoch = ["on_epoch_start", *["on_train_batch_end"] * 3, "on_validation_end", "on_epoch_end", "on_checkpoint_saved"]
    assert names == ["on_fit_start", *epoch, epoch[0], "on_phase_start", *epoch[1:], "on_fit_end"]
    steps = [s for n, _, s in rec.calls if n == "on_train_batch_end"]
    assert steps == [1, 2, 3, 4, 5, 6]  # tuner.step already counts the step just taken
    assert [e for n, e, _ in rec.calls if n == "on_checkpoint_saved"] == [1, 2]  # completed epochs


class Counter(Callback):
    """Counts epochs into its state and into each record (so metrics.jsonl shows it)."""

    def __init__(self):
        self.count = 0

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]

    def on_epoch_end(self, tuner, record):
        self.count += 1
        record["counted"] = self.count


def test_callback_state_and_record_keys_survive_a_resume(data, tmp_path):
    train, val = data
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        tiny_tuner(CLASSES, output_dir=run, epochs=3, callbacks=[Counter(), CrashAfter(2, KeyboardInterrupt)]).fit(train, val)
    fresh = Counter()
    history = tiny_tuner(CLASSES, output_dir=run, epochs=3, callbacks=[fresh]).fit(train, val, resume=True)
    assert fresh.count == 3
    assert [r["counted"] for r in history] == [1, 2, 3]
    assert [json.loads(x)["counted"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_should_stop_from_a_callback_ends_fit_after_the_epoch(data):
    train, val = data

    class StopAtTwo(Callback):
        def on_epoch_end(self, tuner, record):
            tuner.should_stop = record["epoch"] == 2

    assert len(tiny_tuner(CLASSES, epochs=5, callbacks=[StopAtTwo()]).fit(train, val)) == 2


def test_state_keys_are_unique_for_two_callbacks_of_one_class():
    a, b = Counter(), Counter()
    a.count, b.count = 1, 2
    state = CallbackList([a, b]).state_dict()
    assert state == {"Counter": {"count": 1}, "Counter#2": {"count": 2}}
    c, d = Counter(), Counter()
    CallbackList([c, d]).load_state_dict(state)
    assert (c.count, d.count) == (1, 2)


def test_early_stopping_rebuilds_its_state_from_history_when_none_was_saved():
    class T:  # the attributes EarlyStopping reads
        class config:
            best_metric = "top1"
            progress = False

        class policy:
            @staticmethod
            def boundaries():
                return []

        history = [{"epoch": 1, "top1": 0.5}, {"epoch": 2, "top1": 0.7}, {"epoch": 3, "top1": 0.6}]
        is_main, should_stop = True, False

    stop = EarlyStopping(patience=2)
    stop.on_fit_start(T, None, None)
    assert (stop.best, stop.best_epoch) == (0.7, 2)
    record = {"epoch": 4, "top1": 0.65}
    stop.on_epoch_end(T, record)
    assert T.should_stop and record["early_stop"]
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)


def test_redirected_output_gets_one_plain_line_per_epoch_and_no_bar_frames(tmp_path, capfd):
    # capfd: stdout/stderr are files here, as in a CI log or `tlkit train > log`
    train, val = photo_split(tmp_path, ("cardboard", "glass"))
    tuner = tiny_tuner(train.classes, epochs=3, progress=True)
    tuner.fit(train, val)
    out, err = capfd.readouterr()
    log = out + err
    assert "\r" not in log and "\x1b" not in log
    lines = [ln for ln in log.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in lines] == ["1/3", "2/3", "3/3"]


def test_progress_epochs_keeps_the_epoch_lines_and_never_shows_bars_even_on_a_terminal(tmp_path, monkeypatch, capsys):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    train, val = photo_split(tmp_path, ("cardboard", "glass"))
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    tiny_tuner(train.classes, epochs=2, progress="epochs").fit(train, val)
    log = term.getvalue() + capsys.readouterr().out
    assert "\r" not in log  # no tqdm frame
    assert [ln.split()[1] for ln in log.splitlines() if ln.startswith("epoch ")] == ["1/2", "2/2"]
    term.truncate(0)
    tiny_tuner(train.classes, epochs=1, progress=True).fit(train, val)
    assert "\r" in term.getvalue()  # the same terminal shows bars with progress=True


def test_epoch_lines_show_the_trainable_count_at_the_start_and_at_each_phase(tmp_path, capfd):
    from tlkit import FreezePolicy

    train, val = photo_split(tmp_path, ("cardboard", "glass"))
    policy = FreezePolicy.linear_probe().then(2, depth=0)
    tuner = tiny_tuner(train.classes, epochs=3, progress=True, policy=policy)
    history = tuner.fit(train, val)
    out, err = capfd.readouterr()
    lines = [ln for ln in (out + err).splitlines() if ln.startswith("epoch ")]
    counts = [r["trainable_params"] for r in history]
    assert counts[0] == counts[1] < counts[2]
    assert f"trainable {counts[0]:,}" in lines[0] and "trainable" not in lines[1]
    assert f"trainable {counts[2]:,}" in lines[2]
