"""A run folder someone else made: what a hostile checkpoint can and cannot make tlkit do.

Two kinds of author are simulated. A *forger* edits the header and recomputes every digest
(`save_checkpoint` does that), so only the header schema and the meta-device size check stand
in the way. A *tamperer* (or a flipped bit) changes the header but not the digest, which the
format v2 digest catches. The file-system attacks run in a separate process under an audit hook
(`trust_worker.py`) that records every ``open``, every ``pickle.find_class`` and every process
start, so "the payload never runs and no outside file is opened" is observed, not assumed.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE, tiny_tuner
from safetensors import safe_open
from safetensors.torch import load_file, save

import tlkit
from tlkit import CheckpointError, FineTuner
from tlkit.checkpoint import FORMAT_V1, load_checkpoint, save_checkpoint, tensors_sha256

CLASSES = ["cardboard", "glass", "metal"]
HERE = Path(__file__).resolve().parent


class Payload:
    """Pickled, this makes whoever unpickles it create the folder ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """A legitimate checkpoint of a tiny random ResNet (3 classes, 64 x 64 input)."""
    return tiny_tuner(CLASSES).save(tmp_path_factory.mktemp("original") / "best.safetensors")


def run_folder(original: Path, folder: Path, edit=None) -> Path:
    """A copy of ``original`` in ``folder``, its header changed by ``edit`` and every digest recomputed."""
    folder.mkdir(parents=True, exist_ok=True)
    path = shutil.copy(original, folder / "best.safetensors")
    if edit is not None:
        state, meta = load_checkpoint(path)
        edit(meta)
        save_checkpoint(path, state, meta)
    return Path(path)


def tamper(path: Path, change) -> None:
    """Rewrite the header's JSON text with ``change(text)``, keeping the stored sha256 and digest."""
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    header["tlkit"] = change(header["tlkit"])
    path.write_bytes(save(load_file(str(path)), metadata=header))


def kwargs(**kw):
    return lambda m: m["backbone"]["model_kwargs"].update(kw)


def field(section, **kw):
    return lambda m: m[section].update(kw)


def top(**kw):
    return lambda m: m.update(kw)


# -- the schema: a forger's header is refused, naming the file and the field ----------------------
KW = r"header field backbone\.model_kwargs\."
NOT_IN_TIMM = r"header field backbone\.name: not a model in timm's registry"
FORGED = {
    "checkpoint_path": (kwargs(checkpoint_path="evil.pth"), KW + "checkpoint_path is not allowed"),
    "path_traversal": (kwargs(checkpoint_path="../../../../etc/passwd"), KW + "checkpoint_path is not allowed"),
    "pretrained_cfg_overlay": (kwargs(pretrained_cfg_overlay={"file": "evil.pth"}), KW + "pretrained_cfg_overlay is"),
    "pretrained_cfg": (kwargs(pretrained_cfg={"file": "evil.pth"}), KW + "pretrained_cfg is not allowed"),
    "cache_dir": (kwargs(cache_dir="/tmp/elsewhere"), KW + "cache_dir is not allowed"),
    "pretrained_true": (kwargs(pretrained=True), KW + "pretrained is not allowed"),
    "huge_embed_dim": (kwargs(embed_dim=10**6), KW + "embed_dim is not allowed"),
    "huge_num_features": (kwargs(num_features=10**6), KW + "num_features is not allowed"),
    "newline_in_kwarg_name": (kwargs(**{"evil\nkey": 1}), KW + r"'evil\\nkey' is not allowed"),
    "bool_as_rate": (kwargs(drop_rate=True), KW + "drop_rate: "),
    "rate_out_of_range": (kwargs(drop_path_rate=5.0), KW + "drop_path_rate: "),
    "hf_hub_name": (field("backbone", name="hf-hub:someone/resnet18"), NOT_IN_TIMM),
    "local_dir_name": (field("backbone", name="local-dir:../../.."), NOT_IN_TIMM),
    "unknown_architecture": (field("backbone", name="resnet_does_not_exist"), NOT_IN_TIMM),
    "class_count_mismatch": (top(classes=["cardboard", "glass"]),
                             r"header field head\.num_classes is 3 but header field classes names 2"),
    "missing_key": (lambda m: m.pop("data_config"), r"header field data_config is missing"),
    "missing_nested_key": (lambda m: m["data_config"].pop("mean"), r"header field data_config\.mean is missing"),
    "std_zero": (field("data_config", std=[0.0, 0.5, 0.5]), r"header field data_config\.std\.0: "),
    "mean_nan": (field("data_config", mean=[float("nan"), 0.5, 0.5]), r"header field data_config\.mean\.0: "),
    "huge_input": (field("data_config", input_size=[3, 100_000, 64]), r"header field data_config\.input_size\.1: "),
    "tiny_crop_pct": (field("data_config", crop_pct=0.001), r"header field data_config\.crop_pct: "),
    "duplicate_class": (top(classes=["glass", "glass", "metal"]), r"header field classes: class 'glass' appears twice"),
    "control_char_class": (top(classes=["cardboard", "gl\nass", "metal"]), r"header field classes\.1: .*U\+000A"),
    "bidi_override_class": (top(classes=["cardboard", "\u202eglass", "metal"]), r"header field classes\.1: .*U\+202E"),
    "long_class_name": (top(classes=["cardboard", "g" * 10_000, "metal"]), r"header field classes\.1: "),
    "huge_hidden_dim": (field("head", hidden_dim=10**9), r"header field head\.hidden_dim(:| is) .*1000000000"),
    "bool_as_int": (top(epoch=True), r"header field epoch: "),
    "bad_train_value": (field("train_config", lr=-1), r"header field train_config\.lr: "),
    "unknown_key": (top(run_this="rm -rf ~"), r"header field run_this is not allowed"),
    "deep_nesting": (top(metrics={"x": json.loads("[" * 500 + "]" * 500)}), r"header metadata cannot be parsed"),
}


@pytest.mark.parametrize("attack", sorted(FORGED))
def test_a_forged_header_is_refused_naming_the_file_and_the_field(original, tmp_path, attack):
    edit, field = FORGED[attack]
    path = run_folder(original, tmp_path / "run", edit)
    with pytest.raises(CheckpointError, match=rf"^{path}: .*{field}") as info:
        FineTuner.load(tmp_path / "run")
    assert "\n" not in str(info.value)  # the CLI prints it as one line


def test_a_header_that_is_not_an_object_is_refused(original, tmp_path):
    path = run_folder(original, tmp_path / "run")
    save_checkpoint(path, load_file(str(path)), ["not", "an", "object"])
    with pytest.raises(CheckpointError, match=rf"^{path}: header metadata is a JSON list"):
        FineTuner.load(path)


def test_allowed_kwargs_that_do_not_fit_the_weights_never_build_the_real_model(original, tmp_path, monkeypatch):
    # Schema-valid values the weights were not trained with: the model built on the meta device
    # differs from the file's tensors, so the real (memory-backed) model is never built.
    import tlkit._training.loading

    def real_build(*args, **kwargs):
        raise AssertionError("the real model was built before the header was checked against the weights")

    monkeypatch.setattr(tlkit._training.loading, "create_backbone", real_build)
    cases = {"pool": kwargs(global_pool="catavgmax"), "hidden": lambda m: m["head"].update(hidden_dim=65536)}
    for name, edit in cases.items():
        path = run_folder(original, tmp_path / name, edit)
        with pytest.raises(CheckpointError, match=rf"^{path}: does not match the model: .*fc\."):
            FineTuner.load(path)


def test_weights_on_meta_puts_every_large_tensor_on_the_meta_device():
    from tlkit._meta_check import WeightsOnMeta

    with WeightsOnMeta():
        layer = torch.nn.Linear(4096, 4096)
        huge = torch.empty(10**12)  # 4 TB if it were real
        table = torch.arange(10) * 2
        kernel = torch.ones(8, 8)
    assert layer.weight.is_meta and huge.is_meta and not table.is_meta and not kernel.is_meta
    assert layer.bias.numel() == 4096 and not layer.bias.is_meta  # small: stays real, 16 kB


def test_architectures_the_meta_device_cannot_build_are_still_checked(tmp_path, monkeypatch):
    # Before timm 1.0.30 RegNets compute their widths with torch.unique, which meta tensors
    # lack; the check then builds with WeightsOnMeta. Forced here so it runs on any timm.
    import tlkit._meta_check

    monkeypatch.setattr(tlkit._meta_check, "_MODES", (tlkit._meta_check.WeightsOnMeta,))
    tuner = tiny_tuner(CLASSES, model_name="regnetx_002")
    path = tuner.save(tmp_path / "regnet" / "best.safetensors")
    x = torch.randn(2, 3, 64, 64)
    tuner.model.eval()
    torch.testing.assert_close(FineTuner.load(path).model(x), tuner.model(x), rtol=0, atol=0)
    forged = run_folder(path, tmp_path / "forged", lambda m: m["head"].update(hidden_dim=65536))
    with pytest.raises(CheckpointError, match=rf"^{forged}: does not match the model"):
        FineTuner.load(forged)


def test_kwargs_a_model_does_not_take_are_a_checkpoint_error(original, tmp_path):
    path = run_folder(original, tmp_path / "run", kwargs(img_size=64))  # ResNets take no img_size
    with pytest.raises(CheckpointError, match=rf"^{path}: header field backbone does not build: .*img_size"):
        FineTuner.load(path)


def test_resource_settings_come_from_the_caller_not_the_file(original, tmp_path):
    hostile = {"num_workers": 8, "device": "cuda:7", "eval_batch_size": 100_000, "compile": True,
               "distributed": "auto", "sync_batchnorm": True, "find_unused_parameters": True,
               "progress": True, "feature_cache_dir": "/etc"}
    path = run_folder(original, tmp_path / "run", lambda m: m["train_config"].update(hostile))
    tuner = FineTuner.load(path, device="cpu")
    c = tuner.config
    assert (c.num_workers, c.device, c.eval_batch_size, c.compile, c.feature_cache_dir) == (0, "cpu", None, False, None)
    assert (c.sync_batchnorm, c.find_unused_parameters, c.progress) == (False, False, True)
    assert tuner.eval_batch_size == 16 and tuner.feature_cache.cache_dir is None
    assert tuner.checkpoint_metadata["train_config"]["num_workers"] == 8  # kept for the record only
    # the caller's choices still apply, resource fields included
    assert FineTuner.load(path, device="cpu", num_workers=1, progress=False).config.num_workers == 1
    # training settings (what the weights were made with) still come from the file
    assert c.lr == tiny_tuner(CLASSES).config.lr


def test_every_train_config_field_is_either_a_resource_or_a_stored_setting():
    # A new TrainConfig field (a log folder, a service URL...) must be classified before it can
    # be read from a stranger's file.
    from tlkit import TrainConfig
    from tlkit._header import RUNTIME_FIELDS, STORED_FIELDS

    assert not RUNTIME_FIELDS & STORED_FIELDS
    assert set(TrainConfig.model_fields) == RUNTIME_FIELDS | STORED_FIELDS


# -- the digest: header edits that keep the stored digest -----------------------------------------
TAMPERED = {
    "renamed_class": lambda t: t.replace('"glass"', '"fl' + 'ass"'),  # 'g' ^ 0x01 == 'f'
    "mean_0.5_to_0.4": lambda t: t.replace('"mean": [0.5', '"mean": [0.4', 1),
    "swapped_class_order": lambda t: t.replace('["cardboard", "glass", "metal"]', '["glass", "cardboard", "metal"]'),
    "epoch_changed": lambda t: t.replace('"epoch": 0', '"epoch": 7'),
}


@pytest.mark.parametrize("change", sorted(TAMPERED))
def test_a_header_edit_without_a_new_digest_is_refused(original, tmp_path, change):
    path = run_folder(original, tmp_path / "run")
    tamper(path, TAMPERED[change])
    with pytest.raises(CheckpointError, match=rf"^{path}: corrupted or edited checkpoint header"):
        FineTuner.load(path)


def test_a_flipped_bit_in_the_header_is_refused(original, tmp_path):
    path = run_folder(original, tmp_path / "run")
    blob = bytearray(path.read_bytes())
    header_len = int.from_bytes(blob[:8], "little")
    i = blob.index(b"glass", 8, 8 + header_len)
    blob[i] ^= 0x01  # glass -> flass: still valid JSON, still a valid header
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=rf"^{path}: corrupted or edited checkpoint header"):
        FineTuner.load(path)


def test_a_recomputed_digest_is_not_a_signature(original, tmp_path):
    # The limit, stated in the threat model: a forger who swaps the class order and recomputes
    # the digest produces a valid file. Only the source of the file can vouch for its labels.
    path = run_folder(original, tmp_path / "run", lambda m: m.update(classes=["glass", "cardboard", "metal"]))
    assert FineTuner.load(path).classes == ["glass", "cardboard", "metal"]


def test_format_v1_files_still_load_and_their_header_is_not_covered(original, tmp_path):
    state, meta = load_checkpoint(original)
    v1 = tmp_path / "v1.safetensors"
    header = {"format": FORMAT_V1, "tlkit": json.dumps(meta), "sha256": tensors_sha256(state)}
    v1.write_bytes(save(state, metadata=header))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(FineTuner.load(v1).model(x), FineTuner.load(original).model(x), rtol=0, atol=0)
    tamper(v1, TAMPERED["renamed_class"])
    assert FineTuner.load(v1).classes == ["cardboard", "flass", "metal"]  # v1: no header digest
    tamper(v1, lambda t: t.replace('"model_kwargs": {}', '"model_kwargs": {"checkpoint_path": "evil.pth"}'))
    with pytest.raises(CheckpointError, match=r"checkpoint_path is not allowed"):  # the schema still applies
        FineTuner.load(v1)


def test_a_v2_file_without_its_digest_is_refused(original, tmp_path):
    path = run_folder(original, tmp_path / "run")
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    del header["digest"]
    path.write_bytes(save(load_file(str(path)), metadata=header))
    with pytest.raises(CheckpointError, match=rf"^{path}: corrupted checkpoint .*without its sha256 and digest"):
        FineTuner.load(path)


def test_a_legitimate_checkpoint_round_trips(tmp_path):
    tuner = tiny_tuner(CLASSES)
    path = tuner.save(tmp_path / "run" / "best.safetensors")
    loaded = FineTuner.load(tmp_path / "run", progress=False)
    x = torch.randn(2, 3, 64, 64)
    tuner.model.eval()
    torch.testing.assert_close(loaded.model(x), tuner.model(x), rtol=0, atol=0)
    assert loaded.classes == CLASSES and loaded.data_config == tuner.data_config
    assert loaded.head == tuner.head and loaded.policy == tuner.policy and loaded.augment == tuner.augment
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "tlkit.checkpoint.v2"


def test_saving_a_checkpoint_load_would_refuse_warns(tmp_path):
    from tlkit import BackboneConfig, HeadReplacer, create_backbone

    config = BackboneConfig(name="test_resnet", pretrained=False, model_kwargs={"zero_init_last": False})
    model = create_backbone(config)
    HeadReplacer(3).apply(model)
    tuner = FineTuner(model, CLASSES, config=tiny_tuner(CLASSES).config, data_config=tiny_tuner(CLASSES).data_config)
    with pytest.warns(UserWarning, match=r"FineTuner.load will refuse .*model_kwargs\.zero_init_last is not allowed"):
        tuner.save(tmp_path / "m.safetensors")


def test_a_run_folder_checkpoint_linking_out_of_the_folder_is_not_opened(original, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.safetensors").symlink_to(original)  # e.g. to ~/.ssh/id_rsa
    with pytest.raises(CheckpointError, match=r"run/best.safetensors: is a symbolic link out of the run folder"):
        FineTuner.load(tmp_path / "run")
    (tmp_path / "run" / "best.safetensors").unlink()
    shutil.copy(original, tmp_path / "run" / "epoch3.safetensors")
    (tmp_path / "run" / "best.safetensors").symlink_to("epoch3.safetensors")  # inside: fine
    assert FineTuner.load(tmp_path / "run").classes == CLASSES


# -- under the audit hook: no payload runs, no outside file is opened, no process starts ----------
@pytest.fixture(scope="module")
def audited(original, tmp_path_factory) -> dict:
    """Every file-system attack, run once in one `trust_worker.py` process; its results by name."""
    root = tmp_path_factory.mktemp("audited")
    payload = root / "payload" / "evil.pth"
    payload.parent.mkdir()
    torch.save({"state_dict": Payload(root / "marker")}, payload)
    control = root / "payload" / "control.pth"  # the same payload with its own marker
    torch.save({"state_dict": Payload(root / "control_marker")}, control)
    photo = shutil.copy(sorted((SAMPLE / "glass").iterdir())[0], root / "photo.jpg")
    runs = {
        "checkpoint_path": kwargs(checkpoint_path=str(payload)),
        "path_traversal": kwargs(checkpoint_path="../../../../../../../../etc/passwd"),
        "pretrained_cfg_overlay": kwargs(pretrained_cfg_overlay={"file": str(payload)}),
        "pretrained_cfg": kwargs(pretrained_cfg={"file": str(payload)}),
        "local_dir_name": lambda m: m["backbone"].update(name=f"local-dir:{payload.parent}"),
        "num_workers": lambda m: m["train_config"].update(num_workers=8, compile=True, feature_cache_dir="/etc"),
        "legit": None,
    }
    folders = {name: run_folder(original, root / name, edit).parent for name, edit in runs.items()}
    (root / "symlink_out").mkdir()
    (root / "symlink_out" / "best.safetensors").symlink_to(folders["legit"] / "best.safetensors")
    folders["symlink_out"] = root / "symlink_out"
    cases = [{"name": "control_unsafe_torch_load", "action": "unsafe_torch_load", "run": str(control)}]
    cases += [{"name": n, "action": "evaluate" if n == "num_workers" else "load", "run": str(f)}
              for n, f in folders.items()]
    cases += [{"name": f"cli_{n}", "action": "cli", "argv": ["predict", "--checkpoint", str(folders[n]), str(photo)]}
              for n in ("checkpoint_path", "legit")]
    (root / "cases.json").write_text(json.dumps(cases))
    src = str(Path(tlkit.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    # cwd: the relative "../../etc/passwd" would resolve from inside a run folder
    proc = subprocess.run([sys.executable, str(HERE / "trust_worker.py"), str(root / "cases.json"),
                           str(root / "results.json")], capture_output=True, text=True, timeout=300, env=env,
                          cwd=folders["legit"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    return {"results": results, "root": root, "payload": payload, "photo": Path(photo), "folders": folders}


def _allowed(path: str, run: Path, extra: tuple[Path, ...] = ()) -> bool:
    roots = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix), Path(tlkit.__file__).parent, run, *extra}
    return any(Path(path).is_relative_to(r.resolve()) or Path(path).is_relative_to(r) for r in roots)


def test_the_audit_hook_sees_a_live_payload(audited):
    # The control: unpickled without weights_only, the payload file runs its code, and the
    # hook records the pickle class it resolves. So the absence of both below means something.
    r = audited["results"]["control_unsafe_torch_load"]
    assert (audited["root"] / "control_marker").is_dir()
    assert ["pickle", "posix.mkdir"] in r["events"]


ATTACKS = ["checkpoint_path", "path_traversal", "pretrained_cfg_overlay", "pretrained_cfg", "local_dir_name",
           "symlink_out", "num_workers", "legit", "cli_checkpoint_path", "cli_legit"]


@pytest.mark.parametrize("name", ATTACKS)
def test_no_payload_runs_no_outside_file_is_opened_no_process_starts(audited, name):
    r = audited["results"][name]
    run = audited["folders"][name.removeprefix("cli_")]
    opened = [e[1] for e in r["events"] if e[0] == "open"]
    assert not (audited["root"] / "marker").exists()
    assert [e for e in r["events"] if e[0] == "pickle"] == []
    assert [e for e in r["events"] if e[0] == "process"] == []
    assert str(audited["payload"]) not in opened and "/etc/passwd" not in opened
    outside = [p for p in opened if not _allowed(p, run, (audited["photo"],))]
    assert outside == [], outside
    if name in ("legit", "num_workers", "cli_legit"):
        assert "error" not in r and r.get("exit", 0) == 0, r
    elif name.startswith("cli_"):
        assert r["exit"] == 2
        assert str(audited["photo"]) not in opened  # refused before any image was read
    else:
        assert r["error"] == "CheckpointError" and r["message"].startswith(str(run)), r


def test_the_hook_records_the_files_a_command_reads(audited):
    # The positive control for "no outside file is opened": the legitimate predict's photo is seen.
    opened = [e[1] for e in audited["results"]["cli_legit"]["events"] if e[0] == "open"]
    assert str(audited["photo"]) in opened


def test_evaluate_starts_no_worker_process_whatever_the_file_says(audited):
    assert audited["results"]["num_workers"]["num_workers"] == 0


def test_cli_predict_on_a_bad_run_exits_non_zero_with_one_line_naming_the_file(audited):
    r = audited["results"]["cli_checkpoint_path"]
    run = audited["folders"]["checkpoint_path"]
    lines = r["stderr"].splitlines()
    assert r["exit"] == 2 and len(lines) == 1, r["stderr"]
    assert lines[0].startswith(f"tlkit predict: error: {run / 'best.safetensors'}: header field "
                               "backbone.model_kwargs.checkpoint_path is not allowed")


def test_skipping_meta_values_changes_no_shape_and_leaves_real_tensors_alone():
    import timm

    from tlkit._meta import MetaValuesSkipped

    for name in ["resnet18", "vit_tiny_patch16_224", "efficientnet_b0"]:
        with torch.device("meta"):
            plain = timm.create_model(name, pretrained=False)
            with MetaValuesSkipped():
                fast = timm.create_model(name, pretrained=False)
        assert [(n, p.shape) for n, p in plain.named_parameters()] == [(n, p.shape) for n, p in fast.named_parameters()]
        assert [(n, b.shape) for n, b in plain.named_buffers()] == [(n, b.shape) for n, b in fast.named_buffers()]
    with MetaValuesSkipped():
        real = torch.full((3,), 5.0).clamp_(max=1.0)
    assert real.tolist() == [1.0, 1.0, 1.0]
