import json

import pytest
import torch

from learn.export import ArtifactError, export_towers, verify_manifest, write_manifest
from learn.towers.model import TowerConfig, TwinTowers
from learn.utils import file_sha256


@pytest.fixture
def artifact_dir(tmp_path):
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "config.json").write_text('{"d": 16}\n')
    return tmp_path


def test_round_trip_records_sizes_hashes_info_and_versions(artifact_dir):
    info = {"encoder": "tiny-test", "shapes": {"d_llm": 16}}
    written = write_manifest(artifact_dir, ["weights.bin", "sub/config.json"], info)
    on_disk = json.loads((artifact_dir / "manifest.json").read_text())
    assert on_disk == written
    assert written["files"]["weights.bin"] == {"size": 1024, "sha256": file_sha256(artifact_dir / "weights.bin")}
    assert written["files"]["sub/config.json"]["size"] == 10
    assert written["info"] == info
    assert written["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert {"python", "torch", "numpy", "learn"} <= set(written["versions"])
    assert verify_manifest(artifact_dir) == written
    assert sorted(p.name for p in artifact_dir.iterdir()) == ["manifest.json", "sub", "weights.bin"]


def test_flipped_byte_names_the_file_and_both_checksums(artifact_dir):
    write_manifest(artifact_dir, ["weights.bin", "sub/config.json"], {})
    expected = file_sha256(artifact_dir / "weights.bin")
    data = bytearray((artifact_dir / "weights.bin").read_bytes())
    data[100] ^= 0x01
    (artifact_dir / "weights.bin").write_bytes(bytes(data))
    actual = file_sha256(artifact_dir / "weights.bin")
    with pytest.raises(ArtifactError, match="weights.bin") as err:
        verify_manifest(artifact_dir)
    assert expected in str(err.value) and actual in str(err.value)
    assert isinstance(err.value, ValueError)


def test_missing_file_and_missing_manifest(artifact_dir):
    with pytest.raises(ArtifactError, match="manifest.json"):
        verify_manifest(artifact_dir)
    write_manifest(artifact_dir, ["weights.bin", "sub/config.json"], {})
    (artifact_dir / "sub" / "config.json").unlink()
    with pytest.raises(ArtifactError, match="sub/config.json.*missing"):
        verify_manifest(artifact_dir)
    with pytest.raises(ArtifactError, match="sub/config.json"):
        write_manifest(artifact_dir, ["sub/config.json"], {})


def test_names_must_stay_inside_the_directory(artifact_dir):
    for bad in ["../weights.bin", "/etc/passwd", "manifest.json"]:
        with pytest.raises(ValueError):
            write_manifest(artifact_dir, [bad], {})
    write_manifest(artifact_dir, ["weights.bin"], {})
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    manifest["files"]["../weights.bin"] = manifest["files"]["weights.bin"]
    (artifact_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="relative"):
        verify_manifest(artifact_dir)


def test_manifest_over_exported_towers(tmp_path):
    torch.manual_seed(0)
    cfg = TowerConfig(d_llm=16, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0, d_out=8)
    paths = export_towers(TwinTowers(cfg, torch.randn(10, 16)), tmp_path)
    names = sorted(p.name for p in paths.values())
    write_manifest(tmp_path, names, {"encoder": "test", "config": cfg.to_dict()})
    assert set(verify_manifest(tmp_path)["files"]) == set(names)
    with open(paths["item_tower"], "r+b") as fh:
        fh.seek(50)
        byte = fh.read(1)
        fh.seek(50)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="item_tower.pt2"):
        verify_manifest(tmp_path)
