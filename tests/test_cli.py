"""`nef-transformers fit`: a real run, its errors, and a real 2-process accelerate launch."""

import os

import numpy as np
import pytest

from nef_transformers.cli import main
from nef_transformers.data.metadata import get_spec
from nef_transformers.data.weights import load_nef_dataset


def test_fit_command_writes_a_loadable_dataset(tmp_path, capsys):
    out = tmp_path / "mnist"
    code = main(["fit", "--source", "mnist", "--num-fields", "6", "--out", str(out), "--steps", "4",
                 "--hidden-dim", "4", "--seed", "3", "--device", "cpu"])
    assert code == 0
    dataset = load_nef_dataset(out)
    assert len(dataset) == 6 and get_spec(dataset).hidden_dim == 4
    assert len(set(np.asarray(dataset["label"]).tolist())) > 1  # a seeded subset, not the first class only
    assert "6 fields of SirenSpec" in capsys.readouterr().out
    from PIL import Image

    preview = Image.open(out / "preview.png")  # 6 pairs of 28-pixel digits, scaled up for reading
    assert preview.width >= 6 * (2 * 28 + 1) and preview.height > 28


@pytest.mark.parametrize("args, message", [
    (["--source", "mnist", "--num-fields", "6000"], "more than the source has"),
    (["--source", "no-such-source"], "neither one of"),
])
def test_fit_command_errors_are_one_line(tmp_path, capsys, args, message):
    assert main(["fit", "--out", str(tmp_path / "x"), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value", [("--num-fields", "0"), ("--steps", "-3"), ("--omega-0", "zero")])
def test_invalid_flags_are_rejected_by_the_parser(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--source", "mnist", "--out", str(tmp_path), flag, value])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_two_process_accelerate_launch_splits_the_shards(tmp_path, accelerate_launch):
    """HF_NOTES.md: only --multi_gpu with a CPU accelerator really starts 2 gloo processes on CPU."""
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = accelerate_launch(["-m", "nef_transformers.cli", "fit", "--source", "mnist", "--num-fields", "12", "--out",
                                str(out), "--steps", "3", "--hidden-dim", "4", "--shard-size", "4", "--device", "cpu"],
                               env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[2 processes]" in result.stdout
    assert "[process 1]" in result.stderr  # the second process really fitted shards
    dataset = load_nef_dataset(out)
    assert len(dataset) == 12 and sorted(dataset["index"]) == dataset["index"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "shard-000000-000004", "shard-000004-000008", "shard-000008-000012"]


def test_fit_command_on_voxel_grids_and_mesh_folders(tmp_path, shared_data):
    import trimesh

    voxels = tmp_path / "voxels"
    assert main(["fit", "--source", str(shared_data / "shapes" / "modelnet10_chair_32.npz"), "--num-fields", "2",
                 "--out", str(voxels), "--steps", "3", "--hidden-dim", "4"]) == 0
    dataset = load_nef_dataset(voxels)
    assert "iou" in dataset.column_names and get_spec(dataset).in_dim == 3

    meshes = tmp_path / "meshes"
    for name, mesh in [("box", trimesh.creation.box()), ("ball", trimesh.creation.icosphere(subdivisions=2))]:
        (meshes / name).mkdir(parents=True)
        mesh.export(meshes / name / "model.obj")
    assert main(["fit", "--source", str(meshes), "--out", str(tmp_path / "mesh-run"), "--steps", "3",
                 "--hidden-dim", "4"]) == 0
    dataset = load_nef_dataset(tmp_path / "mesh-run")
    assert sorted(dataset["label"]) == [0, 1] and len(dataset) == 2
