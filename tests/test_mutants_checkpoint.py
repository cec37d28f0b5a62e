"""Tests written to kill mutmut survivors in checkpoint.py (docs/DEVELOPING.md, mutation testing).

They call checkpoint.py directly, in-process and on tiny models, so that they are fast enough to
run for every mutant (the subprocess and kill tests of test_checkpoint.py are marked slow)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import types
from pathlib import Path

import pytest
import torch

from lmforge import atomic
from lmforge import checkpoint as ck
from lmforge.checkpoint import CheckpointError
from lmforge.config import CONFIG_FORMAT_VERSION, ConfigError, LmforgeError, ModelConfig
from lmforge.model import GPT

TINY = dict(vocab_size=16, context_length=8, d_model=8, n_layer=1, n_head=2)


def _model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **overrides}))


def _files(step: int) -> dict[str, bytes]:
    return {"a.bin": f"weights of step {step}".encode(), "b.json": b'{"x": 1}\n'}


def _tokenizer(tmp_path: Path, text: str = "hello world, hello there ") -> Path:
    from lmforge.config import TokenizerConfig
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.train(text * 20, TokenizerConfig(vocab_size=260))
    return tok.save(tmp_path / "tok.json")


# ------------------------------------------------------------------------------------------ writing


def test_a_checkpoint_folder_holds_the_files_and_a_manifest_of_their_sizes_and_checksums(tmp_path):
    folder = ck.write_checkpoint(tmp_path, 5, _files(5))
    assert folder == tmp_path / "checkpoints" / "step-00000005"
    assert sorted(p.name for p in folder.iterdir()) == ["a.bin", "b.json", "manifest.json"]
    assert (folder / "a.bin").read_bytes() == b"weights of step 5"
    text = (folder / "manifest.json").read_text()
    assert text.endswith("}\n") and text.startswith('{\n  "format"')  # indented, one trailing newline
    manifest = json.loads(text)
    assert manifest == {"format": "lmforge-checkpoint", "step": 5, "files": {
        "a.bin": {"bytes": 17, "sha256": hashlib.sha256(b"weights of step 5").hexdigest()},
        "b.json": {"bytes": 9, "sha256": hashlib.sha256(b'{"x": 1}\n').hexdigest()}}}
    assert ck.verify_checkpoint(folder) is None


def test_latest_and_the_top_level_names_are_links_through_latest(tmp_path):
    ck.write_checkpoint(tmp_path, 1, _files(1))
    ck.write_checkpoint(tmp_path, 2, _files(2))
    assert os.readlink(tmp_path / "checkpoints" / "latest") == "step-00000002"
    for name in ("a.bin", "b.json"):
        assert os.readlink(tmp_path / name) == os.path.join("checkpoints", "latest", name)
    assert (tmp_path / "a.bin").read_bytes() == b"weights of step 2"


def test_stale_copies_of_latest_and_of_top_level_files_are_replaced_by_links(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "latest").mkdir(parents=True)  # what `cp -rL` of a run makes of the link
    (root / "latest" / "a.bin").write_bytes(b"old")
    (tmp_path / "a.bin").write_bytes(b"an old-layout file")
    (tmp_path / "b.json").symlink_to("somewhere/else")
    ck.write_checkpoint(tmp_path, 3, _files(3))
    assert (root / "latest").is_symlink() and os.readlink(root / "latest") == "step-00000003"
    assert (tmp_path / "a.bin").is_symlink() and (tmp_path / "a.bin").read_bytes() == b"weights of step 3"
    assert os.readlink(tmp_path / "b.json") == os.path.join("checkpoints", "latest", "b.json")


def test_a_folder_at_a_top_level_name_is_left_alone(tmp_path):
    (tmp_path / "a.bin").mkdir()
    (tmp_path / "a.bin" / "mine.txt").write_text("a user's file")
    ck.write_checkpoint(tmp_path, 1, _files(1))
    assert (tmp_path / "a.bin" / "mine.txt").read_text() == "a user's file"
    assert os.readlink(tmp_path / "b.json") == os.path.join("checkpoints", "latest", "b.json")


@pytest.mark.parametrize("keep, kept", [(2, [4, 3]), (3, [4, 3, 2]), (1, [4]), (0, [4])])
def test_the_newest_keep_checkpoints_are_kept(tmp_path, keep, kept):
    for step in range(1, 5):
        ck.write_checkpoint(tmp_path, step, _files(step), keep=keep)
    assert [s for s, _ in ck._step_dirs(tmp_path / "checkpoints")] == kept


def test_keep_defaults_to_two(tmp_path):
    for step in range(1, 4):
        ck.write_checkpoint(tmp_path, step, _files(step))
    assert [s for s, _ in ck._step_dirs(tmp_path / "checkpoints")] == [3, 2]


def test_leftovers_of_killed_writes_are_swept_by_the_next_save(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step-00000007.tmp999").mkdir(parents=True)
    (root / ".step-00000007.tmp999" / "a.bin").write_bytes(b"half")
    (root / ".latest.tmp999").symlink_to("step-00000007")
    ck.write_checkpoint(tmp_path, 8, _files(8))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000008"]


def test_a_stale_temporary_folder_of_the_same_process_is_replaced(tmp_path):
    stale = tmp_path / "checkpoints" / f".step-00000003.tmp{os.getpid()}"
    stale.mkdir(parents=True)
    (stale / "half.bin").write_bytes(b"from an earlier, failed attempt")
    folder = ck.write_checkpoint(tmp_path, 3, _files(3))
    assert sorted(p.name for p in folder.iterdir()) == ["a.bin", "b.json", "manifest.json"]


def test_saving_the_same_step_again_replaces_it_whole(tmp_path):
    ck.write_checkpoint(tmp_path, 4, {"a.bin": b"first", "gone.txt": b"only in the first"})
    folder = ck.write_checkpoint(tmp_path, 4, {"a.bin": b"second"})
    assert sorted(p.name for p in folder.iterdir()) == ["a.bin", "manifest.json"]
    assert (folder / "a.bin").read_bytes() == b"second" and ck.verify_checkpoint(folder) is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000004"]


def test_a_failed_write_says_which_step_and_file_and_leaves_nothing_behind(tmp_path, monkeypatch):
    ck.write_checkpoint(tmp_path, 1, _files(1))
    real = atomic.write_file

    def full_disk(path, data):
        if Path(path).name == "b.json":
            raise OSError(28, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(atomic, "write_file", full_disk)
    with pytest.raises(CheckpointError) as e:
        ck.write_checkpoint(tmp_path, 2, _files(2))
    msg = str(e.value)
    assert msg.startswith("could not write the checkpoint of step 2 to ")
    assert "b.json: No space left on device (the previous checkpoints are untouched;" in msg
    assert msg.endswith("then resume with --resume true)")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    assert ck.find_checkpoint(tmp_path).name == "step-00000001"


def test_an_error_without_a_file_name_names_the_temporary_folder(tmp_path, monkeypatch):
    def broken(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic, "replace", broken)
    with pytest.raises(CheckpointError) as e:
        ck.write_checkpoint(tmp_path, 3, _files(3))
    assert f"{tmp_path / 'checkpoints' / '.step-00000003.tmp'}{os.getpid()}: Input/output error" in str(e.value)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_an_error_without_a_reason_shows_the_error_itself(tmp_path, monkeypatch):
    def broken(src, dst):
        raise OSError("it broke")

    monkeypatch.setattr(atomic, "replace", broken)
    with pytest.raises(CheckpointError, match=r"\.tmp\d+: it broke \(the previous"):
        ck.write_checkpoint(tmp_path, 3, _files(3))


def test_an_interrupted_write_removes_its_temporary_folder_and_propagates(tmp_path, monkeypatch):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "fsync_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.write_checkpoint(tmp_path, 3, _files(3))
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_failures_after_the_rename_keep_the_checkpoint(tmp_path, monkeypatch):
    def no_symlinks(target, link):
        raise OSError(1, "Operation not permitted")

    def no_prune(root, keep):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(atomic, "symlink", no_symlinks)
    monkeypatch.setattr(ck, "_prune", no_prune)
    folder = ck.write_checkpoint(tmp_path, 6, _files(6))
    assert folder.name == "step-00000006" and ck.verify_checkpoint(folder) is None
    assert ck.find_checkpoint(tmp_path) == folder


def test_save_model_writes_weights_and_config_with_the_step_and_extra_config(tmp_path):
    model = _model()
    folder = ck.save_model(tmp_path, model, step=7, extra_config={"task": "t", "step": 99},
                           extra_files={"notes.txt": b"hi"}, keep=1)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                        "notes.txt"]
    text = (folder / "config.json").read_text()
    assert text.endswith("}\n") and '\n  "format": "lmforge-run",' in text
    cfg = json.loads(text)
    assert cfg["format"] == "lmforge-run" and cfg["version"] == CONFIG_FORMAT_VERSION
    assert cfg["model"] == model.config.to_dict() and cfg["task"] == "t"
    assert cfg["step"] == 99  # extra_config is applied last
    tensors, meta = ck.load_weights(folder / "model.safetensors")
    assert meta == {"format": "pt", "step": "7"}
    assert "lm_head.weight" not in tensors and torch.equal(tensors["wte.weight"], model.wte.weight)


def test_save_model_defaults_to_step_0(tmp_path):
    folder = ck.save_model(tmp_path, _model())
    assert folder.name == "step-00000000" and json.loads((folder / "config.json").read_text())["step"] == 0


def test_save_model_keeps_two_checkpoints_by_default_or_as_many_as_asked(tmp_path):
    model = _model()
    for step in (1, 2, 3):
        ck.save_model(tmp_path / "a", model, step)
        ck.save_model(tmp_path / "b", model, step, keep=1)
        ck.save_model(tmp_path / "c", model, step, keep=3)
    assert [s for s, _ in ck._step_dirs(tmp_path / "a" / "checkpoints")] == [3, 2]
    assert [s for s, _ in ck._step_dirs(tmp_path / "b" / "checkpoints")] == [3]
    assert [s for s, _ in ck._step_dirs(tmp_path / "c" / "checkpoints")] == [3, 2, 1]


def test_save_checkpoint_stores_the_trainer_state_for_resuming(tmp_path):
    model = _model()
    # Only state_dict() is used; a real optimizer's first use imports torch._dynamo (2 s).
    opt = types.SimpleNamespace(state_dict=lambda: {"state": {}, "param_groups": [{"lr": 0.5}]})
    folder = ck.save_checkpoint(tmp_path, model, opt, 3, {"tokens": 12, "elapsed": 1.5}, {"task": "x"}, keep=1)
    state = ck.load_trainer_state(folder, 3)
    assert state["step"] == 3 and state["tokens"] == 12 and state["elapsed"] == 1.5
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.5
    assert json.loads((folder / "config.json").read_text())["task"] == "x"
    ck.save_checkpoint(tmp_path, model, opt, 4, {"tokens": 0, "elapsed": 0.0})
    ck.save_checkpoint(tmp_path, model, opt, 5, {"tokens": 0, "elapsed": 0.0})
    assert [s for s, _ in ck._step_dirs(tmp_path / "checkpoints")] == [5, 4]  # keep defaults to 2
    ck.save_checkpoint(tmp_path, model, opt, 6, {"tokens": 0, "elapsed": 0.0}, keep=1)
    assert [s for s, _ in ck._step_dirs(tmp_path / "checkpoints")] == [6]


# ------------------------------------------------------------------------------------------ model state


def test_model_state_drops_a_tied_output_weight_only(tmp_path):
    tied, untied = _model(), _model(tie_embeddings=False)
    assert "lm_head.weight" not in ck.model_state(tied)
    assert "lm_head.weight" in ck.model_state(untied)
    assert set(ck.model_state(untied)) - set(ck.model_state(tied)) == {"lm_head.weight"}


def test_model_state_of_a_module_without_config_keeps_everything():
    lin = torch.nn.Linear(2, 2)
    assert set(ck.model_state(lin)) == {"weight", "bias"}


def test_model_state_is_detached_and_contiguous():
    model = _model()
    with torch.no_grad():
        model.wte.weight.data = model.wte.weight.data.t().contiguous().t()  # a non-contiguous view
    state = ck.model_state(model)
    assert all(t.is_contiguous() and not t.requires_grad for t in state.values())
    assert torch.equal(state["wte.weight"], model.wte.weight)


def test_model_state_saves_the_model_inside_a_compile_wrapper():
    model = _model()

    class Wrapper(torch.nn.Module):  # what torch.compile returns: the model as _orig_mod
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    assert set(ck.model_state(Wrapper(model))) == set(ck.model_state(model))
    assert "lm_head.weight" not in ck.model_state(Wrapper(model))


# ------------------------------------------------------------------------------------------ reading


def test_step_folders_are_found_newest_first_by_number_not_by_name(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-00000009", "step-100000000", "step-00000010", "step-0000001", "xstep-00000011",
                 "step-00000012x", ".step-00000013.tmp1"):
        (root / name).mkdir(parents=True)
    (root / "step-00000014").write_text("a file, not a folder")
    assert ck._step_dirs(root) == [(100000000, root / "step-100000000"), (10, root / "step-00000010"),
                                   (9, root / "step-00000009")]
    assert ck._step_dirs(tmp_path / "absent") == []


def _damage(folder: Path, name: str, data: bytes) -> None:
    (folder / name).unlink()
    (folder / name).write_bytes(data)


def test_verify_names_what_is_wrong(tmp_path):
    folder = ck.write_checkpoint(tmp_path, 1, {"a.bin": b"0123456789"})
    assert ck.verify_checkpoint(folder) is None
    _damage(folder, "a.bin", b"012345678")
    assert ck.verify_checkpoint(folder) == "a.bin has 9 bytes, the manifest says 10"
    _damage(folder, "a.bin", b"0123456780")
    assert ck.verify_checkpoint(folder) == "a.bin does not match its checksum"
    (folder / "a.bin").unlink()
    assert ck.verify_checkpoint(folder) == "a.bin cannot be read (No such file or directory)"


def test_verify_reports_large_sizes_with_thousands_separators(tmp_path):
    folder = ck.write_checkpoint(tmp_path, 1, {"a.bin": b"x" * 1234})
    _damage(folder, "a.bin", b"x" * 1000)
    assert ck.verify_checkpoint(folder) == "a.bin has 1,000 bytes, the manifest says 1,234"


@pytest.mark.parametrize("manifest", [None, "not json", '{"files": 3}', '{"step": 1}', "[1, 2]", '{"files": [1]}'])
def test_a_missing_or_damaged_manifest_is_reported(tmp_path, manifest):
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    if manifest is not None:
        (folder / "manifest.json").write_text(manifest)
    assert ck.verify_checkpoint(folder) == "its manifest.json is missing or damaged"


def test_own_temp_files_are_those_of_run_files():
    assert ck.is_own_temp_file("metrics.jsonl.tmp123")
    assert ck.is_own_temp_file("config.json.tmp1")
    assert not ck.is_own_temp_file("metrics.jsonl")
    assert not ck.is_own_temp_file("notes.txt.tmp1")
    assert not ck.is_own_temp_file("mine.tmp1")


def _unstarted(tmp_path: Path, *names: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for name in names:
        (run / name).write_text("x")
    return run


def test_an_unstarted_run_holds_only_its_own_files_and_a_tokenizer(tmp_path):
    run = _unstarted(tmp_path, "tokenizer.json", "metrics.jsonl", "metrics.jsonl.tmp42")
    assert ck.is_unstarted_run(run) and ck.is_run_dir(run) and not ck.has_checkpoint(run)
    (run / "notes.txt").write_text("someone else's")
    assert not ck.is_unstarted_run(run) and not ck.is_run_dir(run)


@pytest.mark.parametrize("names", [(), ("metrics.jsonl",), ("tokenizer.json", "config.json")])
def test_not_an_unstarted_run(tmp_path, names):
    run = _unstarted(tmp_path, *names)
    assert not ck.is_unstarted_run(run)
    assert not ck.is_unstarted_run(tmp_path / "absent")


def test_a_run_with_a_checkpoint_is_not_unstarted(tmp_path):
    run = _unstarted(tmp_path, "tokenizer.json")
    ck.write_checkpoint(run, 1, _files(1))
    assert not ck.is_unstarted_run(run)
    assert ck.is_run_dir(run) and ck.has_checkpoint(run)


def test_is_run_dir_reads_the_config_format(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text('{"format": "lmforge-run"}')
    assert ck.is_run_dir(tmp_path / "a")
    for i, text in enumerate(['{"format": "other"}', "[1]", "not json"]):
        d = tmp_path / f"b{i}"
        d.mkdir()
        (d / "config.json").write_text(text)
        assert not ck.is_run_dir(d)
    assert not ck.is_run_dir(tmp_path / "absent")
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    assert ck.is_run_dir(tmp_path / "c")


def test_has_checkpoint_for_both_layouts(tmp_path):
    assert not ck.has_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    assert not ck.has_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"old layout")
    assert ck.has_checkpoint(tmp_path)


def test_find_checkpoint_refuses_a_file_named_checkpoints(tmp_path):
    (tmp_path / "checkpoints").write_text("x")
    with pytest.raises(CheckpointError, match=r"checkpoints is a file, where lmforge keeps a run's checkpoints; "
                                              r"move it away$"):
        ck.find_checkpoint(tmp_path)


def test_a_damaged_newest_checkpoint_is_skipped_with_one_warning(tmp_path, capsys):
    ck.write_checkpoint(tmp_path, 1, {"a.bin": b"one"})
    newest = ck.write_checkpoint(tmp_path, 2, {"a.bin": b"two"})
    _damage(newest, "a.bin", b"tw0")
    assert ck.find_checkpoint(tmp_path, warn=False).name == "step-00000001"
    assert capsys.readouterr().err == ""
    assert ck.find_checkpoint(tmp_path).name == "step-00000001"
    assert capsys.readouterr().err == (f"lmforge: warning: skipped damaged checkpoint(s) of {tmp_path}: step 2: a.bin "
                                       "does not match its checksum; using step 1\n")
    assert ck.find_checkpoint(tmp_path).name == "step-00000001"
    assert capsys.readouterr().err == ""  # once per process


def test_the_warning_names_every_damaged_checkpoint_skipped(tmp_path, capsys):
    ck.write_checkpoint(tmp_path / "r", 1, {"a.bin": b"one"}, keep=3)
    for step in (2, 3):
        folder = ck.write_checkpoint(tmp_path / "r", step, {"a.bin": b"two"}, keep=3)
        (folder / "manifest.json").unlink()
    assert ck.find_checkpoint(tmp_path / "r").name == "step-00000001"
    assert capsys.readouterr().err == (f"lmforge: warning: skipped damaged checkpoint(s) of {tmp_path / 'r'}: step 3: "
                                       "its manifest.json is missing or damaged; step 2: its manifest.json is missing "
                                       "or damaged; using step 1\n")


def test_when_every_checkpoint_is_damaged_each_is_named(tmp_path):
    for step in (1, 2):
        folder = ck.write_checkpoint(tmp_path, step, {"a.bin": b"data"})
        (folder / "manifest.json").unlink()
    with pytest.raises(CheckpointError) as e:
        ck.find_checkpoint(tmp_path)
    assert str(e.value) == (f"every checkpoint of {tmp_path} is damaged (step 2: its manifest.json is missing or "
                            "damaged; step 1: its manifest.json is missing or damaged); train again with "
                            "--overwrite true (it replaces them)")  # once only "train again", which was refused


def test_a_run_of_the_old_layout_is_its_own_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert ck.find_checkpoint(tmp_path) == tmp_path


def test_a_link_named_config_is_not_the_old_layout(tmp_path):
    (tmp_path / "elsewhere.json").write_text("{}")
    (tmp_path / "config.json").symlink_to("elsewhere.json")
    with pytest.raises(CheckpointError, match="is not a run directory"):
        ck.find_checkpoint(tmp_path)


def test_find_checkpoint_of_an_unstarted_run_says_to_start_again(tmp_path):
    run = _unstarted(tmp_path, "tokenizer.json")
    with pytest.raises(CheckpointError) as e:
        ck.find_checkpoint(run)
    assert str(e.value) == (f"{run} has no checkpoint yet (training stopped before its first save); start it again: "
                            "the same command without --resume")


def test_find_checkpoint_of_another_folder_says_what_to_give(tmp_path):
    with pytest.raises(CheckpointError) as e:
        ck.find_checkpoint(tmp_path)
    assert str(e.value) == (f"{tmp_path} is not a run directory (no config.json); give the --out folder of "
                            "`lmforge pretrain` or `lmforge finetune`")


def _run(tmp_path: Path, config: dict | str) -> Path:
    text = config if isinstance(config, str) else json.dumps(config)
    ck.write_checkpoint(tmp_path, 1, {"config.json": text.encode()})
    return tmp_path


def test_read_run_config_of_a_run_and_of_a_checkpoint_folder(tmp_path):
    folder = ck.save_model(tmp_path, _model(), 2, {"task": "t"})
    cfg = ck.read_run_config(tmp_path)
    assert cfg["task"] == "t" and cfg["checkpoint"] == str(folder) and cfg["model"]["d_model"] == 8
    assert ck.read_run_config(folder)["checkpoint"] == str(folder)


def test_read_run_config_of_a_checkpoint_without_config(tmp_path):
    ck.write_checkpoint(tmp_path, 1, {"a.bin": b"x"})
    with pytest.raises(CheckpointError, match=r"is not a run directory \(no config.json\); give the --out folder"):
        ck.read_run_config(tmp_path)


def test_read_run_config_refuses_what_is_not_a_run_config(tmp_path):
    path = tmp_path / "checkpoints" / "step-00000001" / "config.json"
    with pytest.raises(CheckpointError) as e:
        ck.read_run_config(_run(tmp_path, "{not json"))
    assert str(e.value) == f"{path} is damaged (not JSON); restore it or train again"
    for bad in ([1], {"format": "other", "model": {}}, {"format": "lmforge-run"}):
        with pytest.raises(CheckpointError) as e:
            ck.read_run_config(_run(tmp_path, bad))
        assert str(e.value) == f"{path} is not an lmforge run config"


def test_read_run_config_refuses_invalid_utf8(tmp_path):
    ck.write_checkpoint(tmp_path, 1, {"config.json": b"\xff\xfe{"})
    with pytest.raises(CheckpointError, match=r"is damaged \(not JSON\)"):
        ck.read_run_config(tmp_path)


def test_read_run_config_refuses_a_newer_format_only(tmp_path):
    newer = {"format": "lmforge-run", "model": {}, "version": CONFIG_FORMAT_VERSION + 1}
    with pytest.raises(CheckpointError) as e:
        ck.read_run_config(_run(tmp_path, newer))
    assert str(e.value).endswith(f"config.json was written by a newer lmforge (format {CONFIG_FORMAT_VERSION + 1}); "
                                 "upgrade lmforge")
    for version in ({"version": CONFIG_FORMAT_VERSION}, {}):  # the current format, and one without a version
        assert ck.read_run_config(_run(tmp_path, {"format": "lmforge-run", "model": {}, **version}))


def test_load_weights_refuses_missing_and_damaged_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"^no weights file at .*absent.safetensors$"):
        ck.load_weights(tmp_path / "absent.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(CheckpointError) as e:
        ck.load_weights(tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'bad.safetensors'} is truncated or corrupted (Error while deserializing "
                          "header: ")  # the first line of safetensors' own message
    assert msg.endswith("); restore it or train again") and "\n" not in msg


def test_load_weights_returns_tensors_and_metadata(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    tensors, meta = ck.load_weights(tmp_path / "m.safetensors")
    assert meta == {} and torch.equal(tensors["w"], torch.ones(2))


def test_check_state_names_the_first_mismatch():
    model = _model()
    good = ck.model_state(model)
    ck.check_state(model, good, "src")
    missing = dict(good)
    del missing["wte.weight"]
    with pytest.raises(CheckpointError, match=r"^src lacks tensor 'wte.weight'; it does not match this model config$"):
        ck.check_state(model, missing, "src")
    wrong = {**good, "wte.weight": torch.zeros(3, 8)}
    with pytest.raises(CheckpointError) as e:
        ck.check_state(model, wrong, "src")
    assert str(e.value) == "src: tensor 'wte.weight' has shape (3, 8), the model config needs (16, 8)"
    extra = {**good, "zz": torch.zeros(1), "aa": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"^src has tensors this model lacks, e.g. 'aa'$"):
        ck.check_state(model, extra, "src")


def test_check_state_raises_the_error_type_asked_for():
    class Mine(CheckpointError):
        pass

    with pytest.raises(Mine):
        ck.check_state(_model(), {}, "src", Mine)


def test_load_state_into_copies_every_parameter():
    source, target = _model(), _model(tie_embeddings=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    ck.load_state_into(target, ck.model_state(source), "src")
    for (name, p), q in zip(target.named_parameters(), source.parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(CheckpointError, match="^src lacks tensor"):
        ck.load_state_into(target, {}, "src")


def test_build_model_fills_a_model_in_eval_mode_with_tied_weights():
    source = _model()
    model = ck.build_model(source.config, ck.model_state(source), "src")
    assert not model.training
    assert model.lm_head.weight is model.wte.weight
    assert model.wte.weight.dtype == torch.float32 and model.wte.weight.device.type == "cpu"
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(idx), source.eval()(idx))


def test_build_model_untied_keeps_its_own_output_weight():
    source = _model(tie_embeddings=False)
    model = ck.build_model(source.config, ck.model_state(source), "src")
    assert model.lm_head.weight is not model.wte.weight
    assert torch.equal(model.lm_head.weight, source.lm_head.weight)


def test_build_model_casts_to_the_dtype_asked_for_and_to_float32_by_default():
    source = _model()
    half = {k: v.to(torch.bfloat16) for k, v in ck.model_state(source).items()}
    assert ck.build_model(source.config, half, "src").wte.weight.dtype == torch.float32
    model = ck.build_model(source.config, ck.model_state(source), "src", dtype=torch.bfloat16)
    assert model.wte.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16


def test_build_model_puts_the_weights_on_the_device_asked_for():
    source = _model()
    model = ck.build_model(source.config, ck.model_state(source), "src", device="meta")
    assert model.wte.weight.device.type == "meta"


def test_build_model_checks_the_tensors_with_the_error_type_asked_for():
    class Mine(CheckpointError):
        pass

    with pytest.raises(Mine, match="^src lacks tensor"):
        ck.build_model(ModelConfig(**TINY), {}, "src", error=Mine)


def test_load_model_reads_the_newest_checkpoint_and_its_step(tmp_path):
    model = _model()
    ck.save_model(tmp_path, model, 3, {"task": "t"})
    loaded, cfg = ck.load_model(tmp_path)
    assert cfg["step"] == 3 and cfg["task"] == "t"
    assert torch.equal(loaded.wte.weight, model.wte.weight) and not loaded.training


def test_load_model_without_a_step_in_the_weights_says_step_0(tmp_path):
    from safetensors.torch import save

    model = _model()
    config = {"format": "lmforge-run", "model": model.config.to_dict()}
    ck.write_checkpoint(tmp_path, 1, {"config.json": json.dumps(config).encode(),
                                      "model.safetensors": save(ck.model_state(model))})
    assert ck.load_model(tmp_path)[1]["step"] == 0


def test_load_model_reports_a_bad_model_config_in_one_line(tmp_path):
    ck.write_checkpoint(tmp_path, 1, {"config.json": json.dumps(
        {"format": "lmforge-run", "model": {**TINY, "bogus": 1}}).encode()})
    with pytest.raises(CheckpointError) as e:
        ck.load_model(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'checkpoints' / 'step-00000001' / 'config.json'}: unknown model "
                                   "config keys ['bogus']")
    ck.write_checkpoint(tmp_path, 2, {"config.json": json.dumps(
        {"format": "lmforge-run", "model": {**TINY, "n_head": 3}}).encode()})
    with pytest.raises(CheckpointError, match=r"step-00000002/config.json: .*divisible by n_head"):
        ck.load_model(tmp_path)
    assert issubclass(ConfigError, LmforgeError)


def test_load_run_checks_the_tokenizer_belongs_to_the_run(tmp_path):
    from lmforge.tokenizer import Tokenizer

    tok_path = _tokenizer(tmp_path)
    tok = Tokenizer.load(tok_path)
    run = tmp_path / "run"
    ck.save_model(run, _model(), 1, {"data": {"fingerprint": tok.fingerprint}})
    (run / "tokenizer.json").write_bytes(tok_path.read_bytes())
    model, loaded = ck.load_run(run)
    assert loaded.fingerprint == tok.fingerprint and model.config.d_model == 8
    (tmp_path / "o").mkdir()
    other = _tokenizer(tmp_path / "o", "other words entirely ")
    (run / "tokenizer.json").write_bytes(other.read_bytes())
    with pytest.raises(CheckpointError) as e:
        ck.load_run(run)
    assert str(e.value) == (f"{run / 'tokenizer.json'} is not the tokenizer this run was trained with; restore it "
                            "(the run's data folder holds a copy)")


def test_load_run_puts_the_model_on_the_device_asked_for(tmp_path):
    run = tmp_path / "run"
    ck.save_model(run, _model(), 1)
    (run / "tokenizer.json").write_bytes(_tokenizer(tmp_path).read_bytes())
    model, _ = ck.load_run(run, device="meta")
    assert model.wte.weight.device.type == "meta"
    assert ck.load_run(run)[0].wte.weight.device.type == "cpu"


def test_load_run_without_a_recorded_fingerprint_takes_the_tokenizer(tmp_path):
    tok_path = _tokenizer(tmp_path)
    for i, data in enumerate(({"data": None}, {"data": "x"}, {"data": {}}, {})):
        run = tmp_path / f"run{i}"
        ck.save_model(run, _model(), 1, data)
        (run / "tokenizer.json").write_bytes(tok_path.read_bytes())
        assert ck.load_run(run)[1].vocab_size == 260


def test_load_tokenizer_of_a_run_without_one(tmp_path):
    ck.save_model(tmp_path, _model(), 1)
    with pytest.raises(CheckpointError, match=r"^.* has no tokenizer.json$"):
        ck.load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="is not a run directory"):
        ck.load_tokenizer(tmp_path / "absent")


def test_load_trainer_state_refuses_missing_damaged_and_mismatched_states(tmp_path):
    with pytest.raises(CheckpointError) as e:
        ck.load_trainer_state(tmp_path, 1)
    assert str(e.value) == (f"{tmp_path / 'trainer_state.pt'} is missing: this checkpoint holds weights only and "
                            "cannot be resumed; start without --resume")
    (tmp_path / "trainer_state.pt").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match=r"trainer_state.pt is truncated or corrupted \(UnpicklingError\); start "
                                              r"the run again without --resume$"):
        ck.load_trainer_state(tmp_path, 1)
    buf = io.BytesIO()
    torch.save({"step": 4, "moments": torch.ones(2)}, buf)
    (tmp_path / "trainer_state.pt").write_bytes(buf.getvalue())
    state = ck.load_trainer_state(tmp_path, 4)
    assert state["step"] == 4 and torch.equal(state["moments"], torch.ones(2))
    with pytest.raises(CheckpointError) as e:
        ck.load_trainer_state(tmp_path, 5)
    assert str(e.value) == (f"{tmp_path / 'trainer_state.pt'} is for step 4 but the weights are for step 5; start "
                            "again without --resume")
    buf = io.BytesIO()
    torch.save([1, 2], buf)
    (tmp_path / "trainer_state.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match=r"is for step \? but the weights are for step 5"):
        ck.load_trainer_state(tmp_path, 5)


def test_load_trainer_state_runs_no_code_from_the_file(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    buf = io.BytesIO()
    torch.save({"step": 1, "x": Evil()}, buf)
    (tmp_path / "trainer_state.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        ck.load_trainer_state(tmp_path, 1)


# ------------------------------------------------------------------------------------------ fine-tuned runs


def _freeze_all_but(model: GPT, *names: str) -> GPT:
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return model


def test_model_state_trained_only_keeps_the_parameters_that_train():
    model = _freeze_all_but(_model(), "h.0.ln_1.weight", "ln_f.bias")
    assert set(ck.model_state(model, trained_only=True)) == {"h.0.ln_1.weight", "ln_f.bias"}
    assert len(ck.model_state(model)) == len(ck.model_state(_model()))  # all of them by default


def test_model_state_trained_only_keeps_a_trained_untied_head():
    model = _model(tie_embeddings=False)
    model.replace_head(3)
    _freeze_all_but(model, "lm_head.weight", "lm_head.bias")
    state = ck.model_state(model, trained_only=True)
    assert set(state) == {"lm_head.weight", "lm_head.bias"} and state["lm_head.weight"].shape == (3, 8)


def test_model_state_trained_only_keeps_every_name_of_a_shared_tensor():
    m = torch.nn.Module()
    m.a, m.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    m.b.weight = m.a.weight  # no config says it is tied: both names are part of the state
    m.a.bias.requires_grad_(False)
    assert set(ck.model_state(m, trained_only=True)) == {"a.weight", "b.weight", "b.bias"}


def test_save_model_saves_only_trained_weights_when_the_config_says_so(tmp_path):
    model = _freeze_all_but(_model(), "ln_f.weight")
    folder = ck.save_model(tmp_path / "a", model, 1, {"weights": "trained"})
    assert set(ck.load_weights(folder / "model.safetensors")[0]) == {"ln_f.weight"}
    folder = ck.save_model(tmp_path / "b", model, 1, {"weights": "full"})
    assert "wte.weight" in ck.load_weights(folder / "model.safetensors")[0]


def test_check_state_trained_only_expects_the_trained_tensors_alone():
    model = _freeze_all_but(_model(), "ln_f.weight")
    ck.check_state(model, {"ln_f.weight": torch.ones(8)}, "src", trained_only=True)
    with pytest.raises(CheckpointError, match="lacks tensor 'wte.weight'"):
        ck.check_state(model, {"ln_f.weight": torch.ones(8)}, "src")
    with pytest.raises(CheckpointError, match="has tensors this model lacks, e.g. 'wte.weight'"):
        ck.check_state(model, {"ln_f.weight": torch.ones(8), "wte.weight": torch.ones(16, 8)}, "src",
                       trained_only=True)


def test_load_state_into_trained_only_leaves_the_rest_as_it_was():
    model = _freeze_all_but(_model(), "ln_f.weight")
    before = model.wte.weight.clone()
    ck.load_state_into(model, {"ln_f.weight": torch.full((8,), 3.0)}, "src", trained_only=True)
    assert model.ln_f.weight.tolist() == [3.0] * 8 and torch.equal(model.wte.weight, before)
    with pytest.raises(CheckpointError, match="lacks tensor"):
        ck.load_state_into(model, {"ln_f.weight": torch.ones(8)}, "src")


def test_restore_structure_rebuilds_the_head_lora_layers_and_what_trains():
    from lmforge.lora import LoRALinear

    model = _model()
    ck.restore_structure(model, {"head": {"labels": ["a", "b", "c"]},
                                 "lora": {"rank": 2, "alpha": 4.0, "dropout": 0.0, "layers": ["h.0.attn.c_attn"]},
                                 "trained": ["lm_head.weight", "h.0.attn.c_attn.lora_A"]})
    assert model.lm_head.out_features == 3 and model.lm_head.bias is not None
    layer = model.get_submodule("h.0.attn.c_attn")
    assert isinstance(layer, LoRALinear) and layer.rank == 2 and layer.alpha == 4.0
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["h.0.attn.c_attn.lora_A",
                                                                                 "lm_head.weight"]


def test_restore_structure_of_a_plain_run_changes_nothing():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    ck.restore_structure(model, {"head": None, "lora": None})
    assert [n for n, _ in model.named_parameters()] == names and model.lm_head.weight is model.wte.weight
    assert all(p.requires_grad for p in model.parameters())
    ck.restore_structure(model, {"trained": []})
    assert not any(p.requires_grad for p in model.parameters())


def _base_run(tmp_path: Path, **overrides) -> tuple[Path, dict]:
    from lmforge.tokenizer import Tokenizer

    run = tmp_path / "base"
    model = _model(**overrides)
    ck.save_model(run, model, 0, {"task": "pretrain"})
    tok = Tokenizer.load(_tokenizer(tmp_path))
    tok.save(run / "tokenizer.json")
    return run, {"spec": str(run), "params": model.num_params(), "tokenizer": tok.fingerprint}


def test_load_base_loads_and_checks_the_base_model(tmp_path):
    run, identity = _base_run(tmp_path)
    model, tok = ck.load_base({"base": identity}, tmp_path / "ft")
    assert model.num_params() == identity["params"] and tok.fingerprint == identity["tokenizer"]
    digest = ck.weights_digest(model)
    assert ck.load_base({"base": {**identity, "digest": digest}}, tmp_path / "ft")[0].num_params() == model.num_params()
    for wrong in ({"params": identity["params"] + 1}, {"tokenizer": "0" * 16}, {"params": None}, {"digest": "0" * 64}):
        with pytest.raises(CheckpointError) as e:
            ck.load_base({"base": {**identity, **wrong}}, tmp_path / "ft")
        assert str(e.value) == (f"{run} is not the base model {tmp_path / 'ft'} was fine-tuned from (its weights or "
                                "tokenizer differ); restore that model there")


def test_a_fine_tuned_base_is_loaded_with_its_adapters_merged(tmp_path):
    from lmforge.lora import LoRALinear, apply_lora, lora_config
    from lmforge.tokenizer import Tokenizer

    tuned = _model()
    apply_lora(tuned, rank=2, alpha=4.0)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.normal_()
    run = tmp_path / "lora-run"
    ck.save_model(run, tuned, 1, {"weights": "full", "lora": lora_config(tuned)})
    tok = Tokenizer.load(_tokenizer(tmp_path))
    tok.save(run / "tokenizer.json")
    merged = _model()
    identity = {"spec": str(run), "params": merged.num_params(), "tokenizer": tok.fingerprint}
    model, _ = ck.load_base({"base": identity}, tmp_path / "ft")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    idx = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model(idx), tuned.eval()(idx))


def test_weights_digest_known_answer():
    """The digest is stored in fine-tuned runs' configs: its recipe (sorted names, each name, a zero
    byte, then the tensor's bytes) must not change, or every earlier run's base check fails."""
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
        lin.bias.fill_(-1.0)
    h = hashlib.sha256()
    for name, values in (("bias", [-1.0]), ("weight", [1.0, 2.0])):
        h.update(name.encode() + b"\0")
        h.update(torch.tensor(values).numpy().tobytes())
    assert ck.weights_digest(lin) == h.hexdigest()


def test_weights_digest_covers_every_tensor_by_name_and_bytes():
    a, b = _model(), _model()
    assert ck.weights_digest(a) == ck.weights_digest(b) and len(ck.weights_digest(a)) == 64
    with torch.no_grad():
        b.h[0].ln_1.bias[3] += 1e-3
    assert ck.weights_digest(a) != ck.weights_digest(b)
    assert ck.weights_digest(a) != ck.weights_digest(a.to(torch.bfloat16))
    lin1, lin2 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    lin2.load_state_dict(lin1.state_dict())
    assert ck.weights_digest(lin1) == ck.weights_digest(lin2)
    renamed = torch.nn.Module()  # the same bytes under other names: the names are part of the digest
    renamed.w, renamed.b = torch.nn.Parameter(lin1.weight.detach().clone()), torch.nn.Parameter(lin1.bias.detach().clone())
    assert ck.weights_digest(renamed) != ck.weights_digest(lin1)


def test_load_base_that_cannot_be_loaded_says_why(tmp_path):
    absent = str(tmp_path / "gone")
    with pytest.raises(CheckpointError) as e:
        ck.load_base({"base": {"spec": absent}}, tmp_path / "ft")
    assert str(e.value).startswith(f"{tmp_path / 'ft'} holds only the fine-tuned weights; its base model {absent!r} "
                                   "cannot be loaded (no model named")
    assert str(e.value).endswith(")")


def test_load_model_lays_trained_only_weights_over_the_base(tmp_path):
    run, identity = _base_run(tmp_path)
    tuned = _model()
    tuned.replace_head(2)
    with torch.no_grad():
        tuned.lm_head.weight.fill_(0.5)
    _freeze_all_but(tuned, "lm_head.weight", "lm_head.bias")
    ck.save_model(tmp_path / "ft", tuned, 3, {"weights": "trained", "base": identity, "head": {"labels": ["x", "y"]},
                                              "trained": ["lm_head.weight", "lm_head.bias"]})
    model, cfg = ck.load_model(tmp_path / "ft")
    base, _ = ck.load_model(run)
    assert cfg["step"] == 3 and not model.training
    assert model.lm_head.weight.shape == (2, 8) and model.lm_head.weight.unique().tolist() == [0.5]
    assert torch.equal(model.wte.weight, base.wte.weight)  # the rest is the base's
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight", "lm_head.bias"]
    assert ck.load_model(tmp_path / "ft", device="meta")[0].lm_head.weight.device.type == "meta"


def test_load_model_of_a_trained_only_run_names_the_run_and_its_weights_file(tmp_path):
    run, identity = _base_run(tmp_path)
    tuned = _freeze_all_but(_model(), "ln_f.weight")
    folder = ck.save_model(tmp_path / "ft", tuned, 1, {"weights": "trained", "base": {**identity, "params": 1},
                                                       "trained": ["ln_f.weight"]})
    with pytest.raises(CheckpointError, match=f"is not the base model {folder} was fine-tuned from"):
        ck.load_model(tmp_path / "ft")
    folder = ck.save_model(tmp_path / "ft2", tuned, 1, {"weights": "trained", "base": identity,
                                                        "trained": ["ln_f.weight", "ln_f.bias"]})
    with pytest.raises(CheckpointError) as e:
        ck.load_model(tmp_path / "ft2")
    assert str(e.value) == (f"{folder / 'model.safetensors'} lacks tensor 'ln_f.bias'; it does not match this model "
                            "config")


@pytest.mark.parametrize("tie", [True, False])
def test_load_model_of_a_full_run_with_lora_layers(tmp_path, tie):
    from lmforge.lora import LoRALinear, apply_lora, lora_config

    tuned = _model(tie_embeddings=tie)
    apply_lora(tuned, rank=2, alpha=4.0)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.fill_(0.25)  # B starts at zero: make the adapters count
    ck.save_model(tmp_path, tuned, 2, {"weights": "full", "lora": lora_config(tuned)})
    model, cfg = ck.load_model(tmp_path)
    assert not model.training and isinstance(model.get_submodule("h.0.attn.c_attn"), LoRALinear)
    assert model.wte.weight.dtype == torch.float32 and model.wte.weight.device.type == "cpu"
    assert (model.lm_head.weight is model.wte.weight) == tie
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(idx), tuned.eval()(idx))


def test_load_model_of_a_full_run_with_a_head(tmp_path):
    tuned = _model()
    tuned.replace_head(3)
    ck.save_model(tmp_path, tuned, 2, {"head": {"labels": ["a", "b", "c"]}})
    model, _ = ck.load_model(tmp_path)
    assert model.lm_head.out_features == 3 and model.lm_head.weight is not model.wte.weight and not model.training
    assert torch.equal(model.lm_head.bias, tuned.lm_head.bias)
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(idx), tuned.eval()(idx))
    assert ck.load_model(tmp_path, device="meta")[0].lm_head.weight.device.type == "meta"


def test_load_model_of_a_low_precision_run_with_a_head_is_float32(tmp_path):
    tuned = _model()
    tuned.replace_head(3)
    ck.save_model(tmp_path, tuned.to(torch.bfloat16), 2, {"head": {"labels": ["a", "b", "c"]}})
    model, _ = ck.load_model(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.lm_head.weight, tuned.lm_head.weight.float())


def test_load_model_of_a_run_with_a_head_checks_its_tensors(tmp_path):
    tuned = _model()
    tuned.replace_head(3)
    folder = ck.save_model(tmp_path, tuned, 2, {"head": {"labels": ["a", "b"]}})  # one label fewer than the head has
    with pytest.raises(CheckpointError) as e:
        ck.load_model(tmp_path)
    assert str(e.value) == (f"{folder / 'model.safetensors'}: tensor 'lm_head.weight' has shape (3, 8), the model "
                            "config needs (2, 8)")


def test_load_model_names_the_weights_file_that_does_not_fit(tmp_path):
    folder = ck.save_model(tmp_path, _model(), 1)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["d_model"] = 16  # another model than the weights
    ck.write_checkpoint(tmp_path, 2, {"config.json": json.dumps(config).encode(),
                                      "model.safetensors": (folder / "model.safetensors").read_bytes()})
    with pytest.raises(CheckpointError) as e:
        ck.load_model(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'checkpoints' / 'step-00000002' / 'model.safetensors'}: tensor ")
