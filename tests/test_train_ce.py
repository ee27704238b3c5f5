"""Training the Context Encoder on a few real photographs: losses, checkpoints, resume, CLI."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from advpurify.images import load_image, save_image
from advpurify.train.context_encoder import (
    TrainConfig,
    Trainer,
    TrainError,
    load_checkpoint,
    train,
)
from advpurify.train.crops import CropDataset


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Four real photographs (scikit-image's data set, not the evaluation images), downscaled,
    plus one corrupt file that training must skip with a warning."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        image = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float() / 255
        small = torch.nn.functional.interpolate(
            image[None], scale_factor=0.4, antialias=True, mode="bilinear"
        )[0].clamp(0, 1)
        save_image(small, folder / f"{name}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return folder


def _held_out_l2(photos: Path, checkpoint: Path, seed: int) -> tuple[float, float]:
    """The weighted L2 of the initial and the trained generator on 16 fixed crops."""
    from advpurify.images import find_images
    from advpurify.models.context_encoder import build_generator, fill_hole
    from advpurify.train.context_encoder import centre_of, l2_weights

    paths = [p for p in find_images(photos) if p.suffix == ".png"]
    crops = CropDataset(paths, seed=123).batch(0, 16) * 2 - 1
    weights = l2_weights(10.0, torch.device("cpu"))
    torch.manual_seed(seed)  # the trainer builds its generator right after seeding
    initial = build_generator("small")
    trained = build_generator("small")
    trained.load_state_dict(load_checkpoint(checkpoint)["G"])
    with torch.no_grad():  # batch statistics (train mode): running means are young at step 12
        return tuple(
            float((weights * (g.train()(fill_hole(crops)) - centre_of(crops)) ** 2).mean())
            for g in (initial, trained)
        )


def _config(photos: Path, output: Path, **changes) -> TrainConfig:
    values = dict(
        data=photos,
        output=output,
        steps=8,
        size="small",
        batch_size=4,
        checkpoint_every=4,
        sample_every=8,
        seed=1,
        workers=0,
    )
    values.update(changes)
    return TrainConfig(**values)


def test_losses_finite_l2_decreases_samples_written(photos: Path, tmp_path: Path, capsys) -> None:
    result = train(_config(photos, tmp_path / "ce.pt", steps=12, sample_every=12))
    assert [h["step"] for h in result.history] == list(range(1, 13))
    for entry in result.history:
        assert all(torch.isfinite(torch.tensor(v)) for v in entry.values())
    l2 = [h["l2"] for h in result.history]
    assert sum(l2[-4:]) < sum(l2[:4]), f"L2 did not decrease: {l2}"
    # On one fixed batch of held crops, the trained generator's L2 is well below the initial one.
    before, after = _held_out_l2(photos, tmp_path / "ce.pt", seed=1)
    assert after < 0.85 * before, f"held-out L2 {before:.4f} -> {after:.4f}"
    assert "broken.jpg" in capsys.readouterr().err  # skipped with a warning, training went on

    state = load_checkpoint(tmp_path / "ce.pt")
    assert state["step"] == 12 and state["size"] == "small"
    [sample] = result.samples
    grid = load_image(sample)
    assert grid.shape[0] == 3 and grid.shape[1] > 128 * 8  # 8 rows of context/inpainted/real


def test_crops_do_not_depend_on_workers_or_order(photos: Path) -> None:
    from torch.utils.data import DataLoader

    from advpurify.images import find_images
    from advpurify.train.crops import SampleRange

    paths = find_images(photos)  # the broken file included: a sample that draws it redraws
    dataset = CropDataset(paths, seed=7)
    expected = dataset.batch(4, 8)
    assert not torch.equal(expected[:4], dataset.batch(0, 4))  # samples differ from each other
    loader = DataLoader(dataset, batch_size=4, sampler=SampleRange(4, 12), num_workers=2)
    got = torch.cat([crops for crops, _ in loader])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # worker threads: rounding
    assert torch.equal(CropDataset(paths, seed=7)[9][0], expected[5])  # any order, any process


def test_resume_continues_from_saved_step(photos: Path, tmp_path: Path) -> None:
    straight = train(_config(photos, tmp_path / "straight.pt", steps=6))

    # Asked to stop during step 3: the step completes, the checkpoint is written, the run stops.
    interrupted = tmp_path / "resumed.pt"
    trainer = Trainer(_config(photos, interrupted, steps=6, checkpoint_every=100))
    stopped = trainer.run(should_stop=lambda: trainer.step == 3)
    assert stopped.interrupted and stopped.step == 3
    assert load_checkpoint(interrupted)["step"] == 3

    resumed = train(_config(photos, interrupted, steps=6, resume=True))
    assert resumed.start_step == 3
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    # Same crops, same optimiser state: the resumed run ends where the straight one did.
    for a, b in zip(straight.history[3:], resumed.history, strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    g_straight = load_checkpoint(tmp_path / "straight.pt")["G"]
    g_resumed = load_checkpoint(interrupted)["G"]
    for key, value in g_straight.items():
        torch.testing.assert_close(g_resumed[key], value, rtol=1e-4, atol=1e-6)

    # A resume with a new learning rate trains with it (the saved moments carry on).
    trainer = Trainer(_config(photos, interrupted, steps=7, resume=True, lr=1e-3, g_lr_mult=2.0))
    assert [g["lr"] for g in trainer.optD.param_groups] == [1e-3]
    assert [g["lr"] for g in trainer.optG.param_groups] == [2e-3]
    assert trainer.optG.state  # the moments were restored

    with pytest.raises(TrainError, match="exists: pass --resume"):
        train(_config(photos, interrupted))
    with pytest.raises(TrainError, match="trained with --size small"):
        train(_config(photos, interrupted, resume=True, size="paper"))
    notes: list[str] = []
    Trainer(_config(photos, tmp_path / "new.pt", resume=True), warn=notes.append)
    assert notes == [f"{tmp_path / 'new.pt'}: no checkpoint there to resume, a new run starts"]
    # Other samples would start another run midway: refused, the checkpoint untouched.
    before = interrupted.read_bytes()
    for field, option in (("batch_size", "--batch-size"), ("seed", "--seed")):
        saved = _config(photos, interrupted).__getattribute__(field)
        with pytest.raises(TrainError, match=f"trained with {option} {saved}, not {saved + 1}"):
            train(_config(photos, interrupted, steps=7, resume=True, **{field: saved + 1}))
    assert interrupted.read_bytes() == before


def test_cli_trains_and_reports_errors_in_one_line(
    photos: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from typer.testing import CliRunner

    from advpurify.cli import app

    output = tmp_path / "cli.pt"
    args = [
        "train",
        "context-encoder",
        "--data",
        str(photos),
        "-o",
        str(output),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--sample-every",
        "0",
        "--workers",
        "0",  # loader workers: test_crops_do_not_depend_on_workers_or_order
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "steps 1..2" in result.output and output.is_file()

    # SIGTERM (a job scheduler) during step 2 of 4: the step completes, the checkpoint is
    # written, the command says how to continue and exits 130; --resume finishes the run.
    stopped = tmp_path / "stopped.pt"
    train_step = Trainer.train_step

    def terminate_in_step_2(self, crops):
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(self, crops)

    monkeypatch.setattr(Trainer, "train_step", terminate_in_step_2)
    four = [*args[:5], str(stopped), "--steps", "4", *args[8:]]
    result = CliRunner().invoke(app, four)
    assert result.exit_code == 130, result.output
    assert "interrupted at step 2" in result.stderr
    assert load_checkpoint(stopped)["step"] == 2
    monkeypatch.setattr(Trainer, "train_step", train_step)
    result = CliRunner().invoke(app, [*four, "--resume"])
    assert result.exit_code == 0 and "steps 3..4" in result.output

    # A checkpoint inside the data folder is refused: its sample grids would become data.
    before = sorted(p.name for p in photos.iterdir())
    inside = [*args[:5], str(photos / "ce.pt"), *args[6:]]
    result = CliRunner().invoke(app, inside)
    assert result.exit_code == 1 and "inside the input folder" in result.stderr
    assert sorted(p.name for p in photos.iterdir()) == before

    # The entry point prints a user error as one line (no traceback) and exits 1.
    from advpurify.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "advpurify",
            "train",
            "context-encoder",
            "--data",
            str(empty),
            "-o",
            str(tmp_path / "x.pt"),
            "--steps",
            "1",
        ],
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {empty}: no image files found"]


@pytest.mark.gpu
def test_cuda_mixed_precision_training(photos: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    result = train(_config(photos, tmp_path / "gpu.pt", steps=4, device="cuda", amp=True))
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in result.history)
    resumed = train(_config(photos, tmp_path / "gpu.pt", steps=6, device="cuda", resume=True))
    assert [h["step"] for h in resumed.history] == [5, 6]


def test_a_folder_of_unreadable_images_is_named(tmp_path: Path) -> None:
    broken = [tmp_path / "a.jpg", tmp_path / "b.png"]
    for path in broken:
        path.write_bytes(b"not an image")
    with pytest.raises(
        TrainError, match=rf"none of the 2 images could be read \(the last: .*{tmp_path}"
    ):
        CropDataset(broken, seed=0)[0]
