"""The command line end to end on a tiny model, and every documented error with its exit code."""
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from vitopt.cli import main

TINY = "timm:vit_tiny_patch16_224:img_size=20,patch_size=4,embed_dim=36,depth=1,num_heads=3,num_classes=5"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny.vitopt"
    code = main(["compile", TINY, "--target", "cpu", "--backend", "onnxruntime", "--preset",
                 "lossless", "--max-batch", "4", "--bench-batch", "1", "--runs", "2", "-o", str(out)])
    assert code == 0
    return out


def test_compile_writes_an_artifact_and_a_report(artifact, capsys):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["backend"]["name"] == "onnxruntime"
    assert manifest["token_schedule"][1] == 26
    assert [p["name"] for p in manifest["passes"]] == ["fuse_qkv", "fold_layer_scale",
                                                        "trim_last_block"]
    assert manifest["latency"][0]["batch"] == 1


def test_inspect_shows_the_stage_table(artifact, capsys):
    assert main(["inspect", str(artifact)]) == 0
    out = capsys.readouterr().out
    assert "attn0" in out and "mlp0" in out and "GFLOPs" in out and "onnxruntime" in out


def test_run_prints_top_k(artifact, tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((31, 27, 3)) * 255).astype("uint8")).save(image)
    assert main(["run", str(artifact), str(image), "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith("photo.png:") and len(lines) == 4


def test_passes_lists_kind_and_doc(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fuse_qkv" in out and "exact" in out and "lossless" in out


def test_bench_compares_with_eager(artifact, capsys):
    assert main(["bench", str(artifact), "--batch", "1,2", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "eager torch ms" in out and "speedup" in out


@pytest.mark.parametrize("args, code, message", [
    (["compile", "/nonexistent/model.pt", "-o", "x"], 1, "no such file"),
    (["compile", "torchvision:resnet18", "-o", "x"], 1, "not a Vision Transformer"),
    (["compile", TINY, "--pass", "nope", "-o", "x"], 1, "unknown pass"),
    (["compile", TINY, "--preset", "warp", "-o", "x"], 1, "unknown preset"),
    (["compile", TINY, "--target", "tpu", "-o", "x"], 1, "unknown target"),
    (["compile", TINY, "--pass", "fuse_qkv:r=2", "-o", "x"], 1, "no option"),
    (["compile", TINY, "--target", "cuda", "-o", "x"], 3, "needs an NVIDIA GPU"),
])
def test_errors_have_messages_and_exit_codes(args, code, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists(), "a failed compile must not leave an artifact"


def test_corrupt_file_and_malicious_pickle(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a real archive")
    assert main(["compile", str(corrupt), "-o", str(tmp_path / "a")]) == 1
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil()))
    assert main(["compile", str(evil), "-o", str(tmp_path / "b")]) == 1
    assert "--trust-pickle" in capsys.readouterr().err
    assert not marker.exists()


def test_corrupted_artifact_is_refused(artifact, tmp_path, capsys):
    import shutil
    broken = tmp_path / "broken.vitopt"
    shutil.copytree(artifact, broken)
    engine = next(p for p in broken.iterdir() if p.name != "manifest.json")
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    assert main(["inspect", str(broken)]) == 1
    err = capsys.readouterr().err
    assert engine.name in err and "recompile" in err


def test_wrong_image_size_at_run_time(artifact):
    import vitopt
    from vitopt.errors import InputError
    runtime = vitopt.load(artifact)
    with pytest.raises(InputError, match="20x20"):
        runtime(np.zeros((2, 3, 24, 24), np.float32))
    with pytest.raises(InputError, match="3-channel"):
        runtime(np.zeros((2, 1, 20, 20), np.float32))
