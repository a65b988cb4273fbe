"""The artifact directory: round trip, hashes, versions, and no half-written artifact, ever."""
import json
from pathlib import Path

import numpy as np
import pytest

import vitopt
import vitopt.artifact as artifact
from vitopt.artifact import (FORMAT_VERSION, MANIFEST, hardware_info, input_spec, output_spec,
                             read_manifest, source_spec, write_artifact)
from vitopt.errors import ArtifactError


def manifest(**extra):
    base = {"backend": {"name": "onnxruntime", "version": "1.0"}, "precision": "fp32",
            "input": input_spec((20, 20), 3, (0.5,) * 3, (0.25,) * 3, max_batch=4),
            "output": output_spec("logits", [f"c{i}" for i in range(7)]),
            "passes": [{"name": "prune_tokens", "config": {"keep": 0.7}}],
            "token_schedule": [26, 26, 19]}
    base.update(extra)
    return base


@pytest.fixture
def written(tmp_path):
    engine = tmp_path / "built.onnx"
    engine.write_bytes(b"\x08\x01engine")
    return write_artifact(tmp_path / "model.vitopt", manifest(),
                          {"model.onnx": engine, "extra.bin": b"\x00" * 100})


def leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_round_trip(written):
    data = read_manifest(written)
    assert data["format_version"] == FORMAT_VERSION
    assert data["vitopt_version"] == vitopt.__version__
    assert data["created"] and data["hardware"]["cpu"]
    assert set(data["files"]) == {"model.onnx", "extra.bin"}
    assert len(data["files"]["model.onnx"]) == 64
    assert data["input"]["shape"] == [3, 20, 20] and data["input"]["layout"] == "NCHW"
    assert data["passes"][0]["config"] == {"keep": 0.7}
    assert (written / "extra.bin").read_bytes() == b"\x00" * 100
    assert read_manifest(written / MANIFEST) == data  # the manifest's path works too
    assert not leftovers(written.parent)


def test_numpy_values_and_source_hash(tmp_path):
    model_file = tmp_path / "model.pt"
    model_file.write_bytes(b"weights")
    path = write_artifact(tmp_path / "a", manifest(accuracy={"top1": np.float32(0.5)},
                                                   source=source_spec("deit", model_file),
                                                   token_schedule=np.array([5, 3])),
                          {"e.onnx": b"x"})
    data = read_manifest(path)
    assert data["accuracy"]["top1"] == 0.5 and data["token_schedule"] == [5, 3]
    assert data["source"]["sha256"] == artifact.sha256_file(model_file)


def test_hardware_info():
    info = hardware_info()
    assert {"cpu", "flags", "cores", "machine", "gpu"} <= set(info)
    assert info["cores"] >= 1 and set(info["flags"]) <= set(artifact.CPU_FLAGS)
    info["flags"].append("mutated")
    assert "mutated" not in hardware_info()["flags"]  # callers get a copy


def test_changed_byte_is_a_hash_mismatch(written):
    engine = written / "model.onnx"
    data = bytearray(engine.read_bytes())
    data[3] ^= 0x01
    engine.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.onnx .*corrupt.*sha256.*vitopt compile"):
        read_manifest(written)
    assert read_manifest(written, verify=False)["files"]


def test_missing_engine_file(written):
    (written / "extra.bin").unlink()
    with pytest.raises(ArtifactError, match="extra.bin is missing"):
        read_manifest(written)


def test_missing_artifact_and_missing_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="no artifact at .*vitopt compile"):
        read_manifest(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is a file, not an artifact directory"):
        read_manifest(tmp_path / "file")


def rewrite(path, change):
    data = json.loads((path / MANIFEST).read_text())
    change(data)
    (path / MANIFEST).write_text(json.dumps(data))


@pytest.mark.parametrize("version, message", [(FORMAT_VERSION + 1, "newer.*upgrade vitopt"),
                                              (0, "older.*vitopt compile"),
                                              ("1", "no valid format_version")])
def test_wrong_format_version(written, version, message):
    rewrite(written, lambda data: data.update(format_version=version))
    with pytest.raises(ArtifactError, match=message):
        read_manifest(written)


def test_invalid_json_and_missing_keys(written):
    rewrite(written, lambda data: data.pop("precision"))
    with pytest.raises(ArtifactError, match="lacks precision"):
        read_manifest(written)
    (written / MANIFEST).write_text('{"format_version": 1,')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(written)


def test_failure_midway_leaves_nothing(tmp_path):
    files = {"a.onnx": b"first", "b.bin": tmp_path / "was-never-built.bin"}
    with pytest.raises(ArtifactError, match="b.bin.*does not exist"):
        write_artifact(tmp_path / "out.vitopt", manifest(), files)
    assert not list(tmp_path.iterdir())


def test_failure_midway_keeps_the_old_artifact(written, monkeypatch):
    before = read_manifest(written)

    def crash(*_):
        raise KeyboardInterrupt  # even an interrupt while hashing must not damage anything

    monkeypatch.setattr(artifact, "sha256_file", crash)
    with pytest.raises(KeyboardInterrupt):
        write_artifact(written, manifest(precision="int8"), {"new.onnx": b"new"})
    monkeypatch.undo()
    assert read_manifest(written) == before
    assert not leftovers(written.parent)


def test_replacing_an_artifact(written):
    write_artifact(written, manifest(precision="int8"), {"new.onnx": b"new"})
    data = read_manifest(written)
    assert data["precision"] == "int8" and list(data["files"]) == ["new.onnx"]
    assert not (written / "model.onnx").exists()
    assert not leftovers(written.parent)


def test_never_replaces_something_else(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(ArtifactError, match="refusing to replace.*not a vitopt artifact"):
        write_artifact(tmp_path / "photos", manifest(), {"e.onnx": b"x"})
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ArtifactError, match="a file is already there"):
        write_artifact(tmp_path / "notes.txt", manifest(), {"e.onnx": b"x"})
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"


@pytest.mark.parametrize("name", ["../escape.onnx", "sub/e.onnx", MANIFEST, ".hidden", ""])
def test_bad_file_names(tmp_path, name):
    with pytest.raises(ArtifactError, match="bad engine file name"):
        write_artifact(tmp_path / "a", manifest(), {name: b"x"})
    assert not list(tmp_path.iterdir())


def test_manifest_must_have_the_runtime_keys(tmp_path):
    incomplete = manifest()
    del incomplete["input"]
    with pytest.raises(ArtifactError, match="lacks input"):
        write_artifact(tmp_path / "a", incomplete, {"e.onnx": b"x"})
    assert not list(tmp_path.iterdir())
