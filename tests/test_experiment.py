"""The ``attack``, ``eval`` and ``experiment`` commands end to end, and their bad-input errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from advpurify.cli import app
from advpurify.errors import AdvpurifyError
from advpurify.images import load_image, save_image

runner = CliRunner()
LITE0 = ["--classifier", "efficientnet-lite0", "--device", "cpu"]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _link_samples(sample_paths: list[Path], folder: Path, count: int) -> list[Path]:
    """A small data folder (symlinks to the read-only sample images)."""
    folder.mkdir(parents=True, exist_ok=True)
    links = []
    for path in sample_paths[:count]:
        link = folder / path.name
        link.symlink_to(path)
        links.append(link)
    return links


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    """Photos without labels (scikit-image's built-in samples) and one broken file."""
    import skimage.data

    folder = tmp_path / "photos"
    for name in ("astronaut", "coffee", "chelsea"):
        image = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1) / 255.0
        save_image(image.float(), folder / f"{name}.png")
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    return folder


def test_experiment_writes_the_table_resumes_and_refuses_other_settings(tmp_path, sample_paths):
    data = tmp_path / "data"
    _link_samples(sample_paths, data, 4)
    out = tmp_path / "report"
    args = [
        "experiment",
        "--data",
        data,
        *LITE0,
        "--attack",
        "fgsm",
        "--eps",
        "16",
        "--methods",
        "rescale,jpeg",
        "--param",
        "jpeg.quality=60",
        "--adaptive",
        "--adaptive-n",
        "2",
        "--adaptive-steps",
        "1",
        "--eot",
        "1",
        "--grid",
        "2",
        "-o",
        out,
    ]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "| Image Type | Top-1 | Top-3 |" in result.stdout

    report = json.loads((out / "report.json").read_text())
    types = [row["image_type"] for row in report["rows"]]
    assert types == [
        "Clean",
        "Adversarial (FGSM eps=16)",
        "rescale on adversarial",
        "rescale on clean",
        "jpeg on adversarial",
        "jpeg on clean",
    ]
    assert report["n"] == 4 and report["label_source"] == "path"
    assert report["methods"]["jpeg"]["quality"] == 60
    for row in report["rows"]:
        for key in ("top1", "top3", "top5"):
            assert 0.0 <= row[key] <= 1.0
        assert row["top1"] <= row["top3"] <= row["top5"]
        if row["kind"] == "purified":
            assert row["seconds_per_image"] > 0
        if row["kind"] == "purified" and row["input"] == "adversarial":
            assert 0.0 <= row["adaptive_top1"] <= row["adaptive_top3"] <= 1.0
            assert row["adaptive_n"] == 2
        if row["input"] == "clean":
            assert "adaptive_top1" not in row
    assert report["rows"][1]["top1"] <= report["rows"][0]["top1"]

    markdown = (out / "report.md").read_text()
    assert markdown.count("\n| ") >= 6 and "| Image Type | Top-1 | Top-3 | Top-5 |" in markdown
    for figure in ("grid.png", "accuracy.png"):
        assert (out / "figures" / figure).stat().st_size > 1000
    adversarial = sorted((out / "adversarial" / "images").glob("*.png"))
    assert len(adversarial) == 4 and load_image(adversarial[0]).shape == (3, 224, 224)
    with (out / "predictions.csv").open() as handle:
        assert len(list(csv.reader(handle))) == 5

    # A rerun reuses every stage: no image is rewritten and the numbers are identical.
    stored = sorted((out / "methods").rglob("*.png")) + adversarial
    stamps = {p: p.stat().st_mtime_ns for p in stored}
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "reusing 4/4" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in stored} == stamps
    rerun = json.loads((out / "report.json").read_text())
    assert [r["top1"] for r in rerun["rows"]] == [r["top1"] for r in report["rows"]]

    # Other settings into the same folder: refused, not mixed.
    changed = invoke(*[a if a != "16" else "8" for a in args])
    assert changed.exit_code == 1
    assert "other settings" in changed.stderr and "--overwrite" in changed.stderr

    # One more image in the folder: only that image is computed, the others are reused.
    (data / sample_paths[4].name).symlink_to(sample_paths[4])
    grown = invoke(*args)
    assert grown.exit_code == 0, grown.output
    assert "adversarial: reusing 4/5" in grown.stderr
    assert {p: p.stat().st_mtime_ns for p in stored} == stamps
    assert json.loads((out / "report.json").read_text())["n"] == 5


def test_experiment_without_labels_reports_agreement(tmp_path, photo_dir):
    out = tmp_path / "report"
    result = invoke(
        "experiment",
        "--data",
        photo_dir,
        *LITE0,
        "--methods",
        "bitdepth",
        "--eps",
        "8",
        "-o",
        out,
        "--grid",
        "1",
    )
    assert result.exit_code == 2  # the broken file is reported; exit 2 as purify-batch
    assert "broken.jpg" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["label_source"] == "clean-prediction" and report["n"] == 3
    # The pseudo-labels are the classifier's own top-1 on each clean photo, computed here
    # independently of the experiment's code path.
    from advpurify.models.classifiers import load_classifier

    lite0 = load_classifier("efficientnet-lite0", device="cpu")
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        image = lite0.prepare(load_image(photo_dir / row["path"])[None])
        image = image.mul(255).round().div(255)  # the experiment keeps 8-bit images
        assert int(row["label"]) == int(lite0.logits(image).argmax())
    # Each row's number is the share of its predictions that agree with those labels.
    agree = sum(r["adversarial"] == r["label"] for r in rows) / len(rows)
    assert report["rows"][1]["top1"] == pytest.approx(agree)
    assert [f["path"].endswith("broken.jpg") for f in report["failed"]] == [True]
    assert "agreement with the clean prediction" in (out / "report.md").read_text()


def test_attack_then_eval(tmp_path, sample_paths):
    data = tmp_path / "in"
    _link_samples(sample_paths, data / "sub", 2)
    out = tmp_path / "adv"
    result = invoke("attack", data, "-o", out, *LITE0, "--attack", "fgsm", "--eps", "16")
    assert result.exit_code == 0, result.output
    written = sorted(out.rglob("*.png"))
    assert [p.relative_to(out).parent.as_posix() for p in written] == ["sub", "sub"]
    assert load_image(written[0]).shape == (3, 224, 224)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert {"label", "clean_pred", "adv_pred", "label_name", "output"} <= set(record)
        assert record["status"] == "done"

    summary = tmp_path / "eval.json"
    per_image = tmp_path / "eval.csv"
    result = invoke("eval", out, *LITE0, "--json", summary, "--csv", per_image)
    assert result.exit_code == 0, result.output
    numbers = json.loads(summary.read_text())
    assert numbers["n"] == 2 and numbers["label_source"] == "path"
    assert 0.0 <= numbers["top1"] <= numbers["top3"] <= numbers["top5"] <= 1.0
    adv_hits = sum(r["adv_pred"] == r["label"] for r in records)
    assert numbers["top1"] == adv_hits / 2  # eval agrees with the attack's own manifest
    with per_image.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and rows[0]["label_wnid"].startswith("n")


def test_attack_jpeg_outputs_are_reported_as_written_and_eval_reads_the_manifest(
    tmp_path, photo_dir
):
    (photo_dir / "broken.jpg").unlink()
    out = tmp_path / "adv"
    result = invoke("attack", photo_dir, "-o", out, *LITE0, "--eps", "4", "--format", "jpg")
    assert result.exit_code == 0, result.output
    assert "JPEG compression is itself a purification" in result.stderr
    assert len(list(out.glob("*.jpg"))) == 3
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]

    # No labels in the names: eval takes the attack's own (its clean predictions) from the
    # manifest, and its numbers are those of the files, as the attack reported them.
    summary = tmp_path / "eval.json"
    result = invoke("eval", out, *LITE0, "--json", summary)
    assert result.exit_code == 0, result.output
    assert "agreement with clean prediction" in result.stdout
    numbers = json.loads(summary.read_text())
    assert numbers["label_source"] == "attack-manifest:clean-prediction"
    assert numbers["top1"] == pytest.approx(sum(r["adv_pred"] == r["label"] for r in records) / 3)
    # An explicit --reference still wins.
    result = invoke("eval", out, *LITE0, "--reference", photo_dir, "--json", summary)
    assert result.exit_code == 0, result.output
    assert json.loads(summary.read_text())["label_source"] == "clean-prediction"
    # Without the manifest nothing says what the labels are.
    (out / "manifest.jsonl").unlink()
    result = invoke("eval", out, *LITE0)
    assert result.exit_code == 1 and "--reference" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "{data}", "--classifier", "no-such-net"], "unknown classifier"),
        (["attack", "{data}", "-o", "{tmp}/o", "--attack", "deepfool", *LITE0], "unknown attack"),
        (["attack", "{data}", "-o", "{tmp}/o", "--eps", "0", *LITE0], "eps=0"),
        (["experiment", "--data", "{data}", "-o", "{tmp}/o", "--eps", "300", *LITE0], "eps=300"),
        (["experiment", "--data", "{tmp}/empty", "-o", "{tmp}/o", *LITE0], "no images found"),
        (
            ["experiment", "--data", "{data}", "-o", "{tmp}/o", "--methods", "nope", *LITE0],
            "unknown method",
        ),
        (["eval", "{data}", "--labels", "{tmp}/labels.csv", *LITE0], "outside 0..999"),
        (["attack", "{data}", "-o", "{data}/adv", *LITE0], "inside the input folder"),
        (["experiment", "--data", "{data}", "-o", "{data}/r", *LITE0], "inside the input folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(tmp_path, sample_paths, args, message):
    data = tmp_path / "data"
    _link_samples(sample_paths, data, 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "labels.csv").write_text(f"{sample_paths[0].name},1000\n")
    filled = [a.format(data=data, tmp=tmp_path) for a in args]
    result = invoke(*filled)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in result.output
    assert [p.name for p in data.iterdir()] == [sample_paths[0].name]  # input untouched


def test_console_script_exit_code(tmp_path, sample_paths):
    """The real process: one line on stderr, exit status 1."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    process = subprocess.run(
        [
            sys.executable,
            "-c",
            "from advpurify.cli import main; main()",
            "attack",
            str(sample_paths[0]),
            "-o",
            str(tmp_path / "o"),
            "--eps",
            "256",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert process.returncode == 1
    assert process.stderr.strip().splitlines() == [
        "error: eps=256: must be in (0, 255] (units of 1/255)"
    ]


def test_stage_keeps_images_apart_when_names_differ_only_by_extension(tmp_path):
    from advpurify.evaluation.stages import Stage

    keys = ["cat.jpg", "cat.png", "sub/dog.jpg"]
    shades = torch.tensor([0.0, 1.0, 0.5])

    def compute(indices):
        return shades[indices].view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()

    first = Stage(tmp_path / "stage", {"method": "x"}).run(keys, compute, batch_size=2)

    def must_not_run(indices):
        raise AssertionError(f"recomputed {indices}")

    resumed = Stage(tmp_path / "stage", {"method": "x"}).run(keys, must_not_run, batch_size=2)
    means = [float(image.float().mean()) for image in resumed]
    assert means == [0.0, 255.0, 128.0]
    assert torch.equal(first, resumed)
    written = sorted(
        p.relative_to(tmp_path / "stage/images").as_posix()
        for p in (tmp_path / "stage/images").rglob("*.png")
    )
    assert written == ["cat.jpg.png", "cat.png.png", "sub/dog.png"]


def test_a_stage_never_mixes_with_or_clears_files_it_did_not_write(tmp_path):
    from advpurify.evaluation.stages import Stage, StageMismatchError

    def compute(indices):
        return torch.zeros(len(indices), 3, 4, 4)

    foreign = tmp_path / "attack-output"
    foreign.mkdir()
    (foreign / "manifest.jsonl").write_text("{}\n")
    for overwrite in (False, True):
        with pytest.raises(StageMismatchError, match="e.g. manifest.jsonl"):
            Stage(foreign, {"method": "x"}, overwrite=overwrite)
    assert [p.name for p in foreign.iterdir()] == ["manifest.jsonl"]

    stage = tmp_path / "stage"
    Stage(stage, {"method": "x"}).run(["a.png"], compute, batch_size=1)
    (stage / "notes.txt").write_text("mine")
    (stage / "nested").mkdir()
    (stage / "nested" / "config.json").write_text("{}")  # e.g. an adaptive stage's purified
    # Other settings with overwrite: the stage's own files go, the user's stay.
    Stage(stage, {"method": "y"}, overwrite=True).run(["b.png"], compute, batch_size=1)
    assert sorted(p.name for p in stage.iterdir()) == [
        "config.json", "images", "nested", "notes.txt", "timing.json"
    ]  # fmt: skip
    assert [p.name for p in (stage / "images").iterdir()] == ["b.png"]
    assert (stage / "notes.txt").read_text() == "mine"


def test_experiment_refuses_an_attack_folder_and_options_it_would_not_use(tmp_path, photo_dir):
    adv = tmp_path / "adv"
    adv.mkdir()
    (adv / "manifest.jsonl").write_text("")
    before = sorted(p.name for p in photo_dir.iterdir())
    for args, message in [
        (["-o", adv], "holds an attack's or a purify-batch run's outputs (manifest.jsonl)"),
        (["-o", photo_dir / "report"], "is inside the input folder"),
        (["-o", tmp_path / "r", "--eot", "3"], "--eot goes with --adaptive"),
        (["-o", tmp_path / "r", "--adaptive-n", "3"], "--adaptive-n goes with --adaptive"),
        (["-o", tmp_path / "r", "--methods", "jpeg,,bitdepth"], "an empty name between commas"),
        (["-o", tmp_path / "r", "--steps", "5"], "fgsm is one step of size eps: steps"),
    ]:
        result = invoke("experiment", "--data", photo_dir, *args, *LITE0)
        assert result.exit_code == 1 and message in result.stderr, (args, result.output)
    # Refused before anything was written, the input folder included (no write probe there).
    assert sorted(p.name for p in photo_dir.iterdir()) == before
    assert [p.name for p in adv.iterdir()] == ["manifest.jsonl"]
    assert not (tmp_path / "r").exists()


def test_attack_and_eval_keep_inputs_apart_that_differ_only_by_extension(tmp_path, sample_paths):
    data = tmp_path / "in"
    data.mkdir()
    (data / "x.jpg").symlink_to(sample_paths[0])
    (data / "x.png").symlink_to(sample_paths[1])
    out = tmp_path / "adv"
    result = invoke("attack", data, "-o", out, *LITE0, "--eps", "4")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["x.jpg.png", "x.png.png"]
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {Path(r["input"]).name: Path(r["output"]).name for r in records} == {
        "x.jpg": "x.jpg.png",
        "x.png": "x.png.png",
    }
    # Each adversarial image is compared with its own clean image's prediction.
    per_image = tmp_path / "eval.csv"
    result = invoke("eval", out, *LITE0, "--reference", data, "--csv", per_image)
    assert result.exit_code == 0, result.output
    with per_image.open() as handle:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    by_input = {Path(r["input"]).name: r for r in records}
    assert int(rows["x.jpg.png"]["label"]) == by_input["x.jpg"]["clean_pred"]
    assert int(rows["x.png.png"]["label"]) == by_input["x.png"]["clean_pred"]
    assert by_input["x.jpg"]["clean_pred"] != by_input["x.png"]["clean_pred"]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("a.png", 0),  # the same path
        ("a.jpg.png", 1),  # named after a.jpg because a.png clashed
        ("sub/b.png", 2),  # the only sub/b.*
        ("c", 3),  # no extension at all
    ],
)
def test_reference_images_are_matched_exactly_then_by_name(key, expected):
    from advpurify.evaluation.accuracy import match_reference

    ref = ["a.png", "a.jpg", "sub/b.jpg", "c.tif", "d.jpg", "d.png"]
    assert match_reference([key], ref, Path("ref")) == [expected]


def test_reference_matching_refuses_to_guess():
    from advpurify.evaluation.accuracy import match_reference
    from advpurify.evaluation.labels import LabelError

    ref = ["d.jpg", "d.png"]
    with pytest.raises(LabelError, match=r"d\.webp could be any of d\.jpg, d\.png"):
        match_reference(["d.webp"], ref, Path("ref"))
    with pytest.raises(LabelError, match="no image for e.png"):
        match_reference(["e.png"], ref, Path("ref"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["attack", "{data}", "-o", "{tmp}/o", "--target", "5000"], "outside 0..999"),
        (["attack", "{data}", "-o", "{tmp}/o", "--format", "gif"], "--format 'gif'"),
        (["attack", "{tmp}/missing", "-o", "{tmp}/o"], "no such file or folder"),
        (["eval", "{data}"], "no labels"),
        (["eval", "{data}", "--reference", "{tmp}/missing"], "--reference"),
    ],
)
def test_cheap_checks_come_before_the_classifier_loads(tmp_path, args, message, monkeypatch):
    import advpurify.cli.evaluate

    def must_not_load(*args, **kwargs):
        raise AssertionError("the classifier was loaded before a cheap check")

    monkeypatch.setattr(advpurify.cli.evaluate, "_load", must_not_load)
    data = tmp_path / "data"
    data.mkdir()
    save_image(torch.rand(3, 16, 16), data / "photo.png")  # no WordNet id: no labels
    result = invoke(*[a.format(data=data, tmp=tmp_path) for a in args])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_experiment_without_a_grid_writes_the_report_never_through_symlinks(tmp_path, sample_paths):
    data = tmp_path / "data"
    _link_samples(sample_paths, data, 2)
    out = tmp_path / "report"
    (out / "figures").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / "predictions.csv").symlink_to(victim)
    (out / "figures" / "accuracy.png").symlink_to(victim)
    result = invoke(
        "experiment", "--data", data, "-o", out, *LITE0, "--methods", "bitdepth", "--grid", "0"
    )
    assert result.exit_code == 0, result.output
    assert (out / "report.md").is_file() and not (out / "figures" / "grid.png").exists()
    assert victim.read_text() == "precious\n"
    for written in (out / "predictions.csv", out / "figures" / "accuracy.png"):
        assert written.is_file() and not written.is_symlink()


def test_a_replaced_or_relabelled_image_is_attacked_again_on_a_rerun(tmp_path, sample_paths):
    data, out = tmp_path / "data", tmp_path / "report"
    data.mkdir()
    (data / "x.jpg").write_bytes(sample_paths[0].read_bytes())
    (data / "y.jpg").write_bytes(sample_paths[1].read_bytes())
    labels = tmp_path / "labels.csv"
    labels.write_text("x.jpg,1\ny.jpg,2\n")
    args = ["--methods", "bitdepth", "--labels", labels, "--grid", "0", *LITE0]
    assert invoke("experiment", "--data", data, "-o", out, *args).exit_code == 0
    adv = out / "adversarial" / "images"
    y_before = (adv / "y.png").stat().st_mtime_ns

    (data / "x.jpg").write_bytes(sample_paths[2].read_bytes())  # same name, another photo
    labels.write_text("x.jpg,1\ny.jpg,3\n")  # and y relabelled
    assert invoke("experiment", "--data", data, "-o", out, *args).exit_code == 0
    fresh = tmp_path / "fresh"
    assert invoke("experiment", "--data", data, "-o", fresh, *args).exit_code == 0
    for name in ("x.png", "y.png"):
        assert (adv / name).read_bytes() == (fresh / "adversarial" / "images" / name).read_bytes()
    assert (adv / "y.png").stat().st_mtime_ns != y_before  # a new label: a new attack
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows == (fresh / "predictions.csv").read_text().splitlines()


def test_a_method_with_other_settings_is_refused_before_any_work(tmp_path, sample_paths):
    data, out = tmp_path / "data", tmp_path / "report"
    _link_samples(sample_paths, data, 2)
    first = ["--methods", "bitdepth,jpeg", "--grid", "0", *LITE0]
    assert invoke("experiment", "--data", data, "-o", out, *first).exit_code == 0
    # bitdepth comes first and is unchanged; jpeg's quality is not: refused before bitdepth runs.
    result = invoke(
        "experiment",
        "--data",
        data,
        "-o",
        out,
        "--methods",
        "bitdepth,jpeg",
        "--param",
        "jpeg.quality=50",
        "--grid",
        "0",
        *LITE0,
    )
    assert result.exit_code == 1 and "jpeg/adversarial holds results made with other" in (
        result.stderr
    )
    assert "bitdepth on adversarial" not in result.stderr


def test_an_image_too_elongated_to_classify_fails_alone(tmp_path):
    from advpurify.evaluation.dataset import load_dataset
    from advpurify.models.classifiers import resize_center_crop

    save_image(torch.rand(3, 16, 16), tmp_path / "ok.png")
    save_image(torch.rand(3, 1, 40000), tmp_path / "strip.png")  # resized: 256 x 10M
    data = load_dataset(tmp_path, lambda x: resize_center_crop(x, 256, 224), 224)
    assert [p.name for p in data.paths] == ["ok.png"]
    assert "too elongated" in data.failures[0].reason


def test_labels_from_an_attack_manifest_follow_their_source_and_refuse_bad_lines(tmp_path):
    from advpurify.evaluation.labels import LabelError, attack_manifest_labels, resolve_labels

    root = tmp_path / "adv"
    root.mkdir()
    for name in ("a.png", "n01440764_fish.png"):
        (root / name).write_bytes(b"")
    lines = [
        {"status": "done", "name": "a.png", "label": 3, "label_source": "csv"},
        {"status": "done", "name": "n01440764_fish.png", "label": 7, "label_source": "csv"},
        {"status": "failed", "input": "x.png", "reason": "corrupt"},
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("\ufeff" + "".join(json.dumps(r) + "\n" for r in lines))  # a BOM too
    # Some names carry no WordNet id: the attack's record labels them all.
    labels = resolve_labels(sorted(root.glob("*.png")), root)
    assert (labels.indices, labels.source) == ([3, 7], "attack-manifest")
    # Labels that came from clean predictions, even through a second attack, stay agreement.
    lines[1]["label_source"] = "attack-manifest:clean-prediction"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert attack_manifest_labels(root)[1] == "attack-manifest:clean-prediction"
    for bad, message in [
        ("[1, 2]", "line 1: not a JSON object"),
        ('{"status": "done", "name": 5, "label": 1}', "line 1: no output name"),
        ('{"status": "done", "name": "a.png", "label": 1000}', "line 1: class index 1000"),
        ("{not json", "line 1: not JSON"),
        ('{"status": "done", "name": "a.png", "label": 1}\n'
         '{"status": "done", "name": "a.png", "label": 2}', "line 2: a.png is labelled twice"),
    ]:  # fmt: skip
        manifest.write_text(bad + "\n")
        with pytest.raises(LabelError, match=message):
            attack_manifest_labels(root)


def test_eval_labels_a_sub_folder_from_the_manifest_above_and_only_what_it_lists(tmp_path):
    from advpurify.evaluation.labels import SOURCE_CLEAN, LabelError, resolve_labels

    adv = tmp_path / "adv"
    (adv / "sub").mkdir(parents=True)
    records = [
        {"status": "done", "name": "sub/a.png", "label": 3, "label_source": "csv"},
        {"status": "done", "name": "b.png", "label": 4, "label_source": "csv"},
    ]
    (adv / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    a = adv / "sub" / "a.png"
    a.write_bytes(b"")
    assert resolve_labels([a], adv / "sub", search_up=True).indices == [3]
    # attack and experiment read their input folder's own manifest only, as before.
    assert resolve_labels([a], adv / "sub").source == SOURCE_CLEAN
    # A file the attack never wrote, named like one it did, is not labelled by its name.
    stray = adv / "sub" / "b.png"
    stray.write_bytes(b"")
    with pytest.raises(LabelError, match="no label for sub/b.png"):
        resolve_labels([stray], adv / "sub", search_up=True)
    stray.unlink()
    # A purify-batch copy of the sub-folder: followed back to the attack's manifest above it.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "run.json").write_text("{}")
    record = {"status": "done", "input": str(a), "output": str(copy / "a.png")}
    (copy / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    (copy / "a.png").write_bytes(b"")
    followed = resolve_labels([copy / "a.png"], copy, search_up=True)
    assert (followed.indices, followed.source) == ([3], "attack-manifest")
    # Another tool's manifest.jsonl above a folder: no labels, as without it.
    (tmp_path / "ws" / "photos").mkdir(parents=True)
    (tmp_path / "ws" / "manifest.jsonl").write_text('["dataset-v2", 3]\n')
    photo = tmp_path / "ws" / "photos" / "x.png"
    photo.write_bytes(b"")
    assert resolve_labels([photo], photo.parent, search_up=True).source == SOURCE_CLEAN


def test_attack_refuses_a_purify_batch_output_folder(tmp_path, photo_dir):
    out = tmp_path / "purified"
    assert invoke("batch", photo_dir, "-m", "bitdepth", "-o", out, "-q").exit_code == 2
    before = sorted(p.name for p in out.iterdir())
    result = invoke("attack", photo_dir, "-o", out, *LITE0)
    assert result.exit_code == 1 and "holds a purify-batch run (run.json)" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_experiment_on_an_attack_output_reports_agreement(tmp_path, photo_dir):
    (photo_dir / "broken.jpg").unlink()
    adv = tmp_path / "adv"
    assert invoke("attack", photo_dir, "-o", adv, *LITE0, "--eps", "4").exit_code == 0
    out = tmp_path / "exp"
    result = invoke("experiment", "--data", adv, "-o", out, "--methods", "rescale", *LITE0)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["label_source"] == "attack-manifest:clean-prediction"
    assert "the manifest of the attack" in (out / "report.md").read_text()


def test_a_second_attack_never_leaves_the_first_ones_outputs_beside_its_own(tmp_path, photo_dir):
    (photo_dir / "broken.jpg").unlink()
    out = tmp_path / "adv"
    assert invoke("attack", photo_dir, "-o", out, *LITE0, "--eps", "2").exit_code == 0
    # The same images again (new eps): each output is replaced, fine.
    assert invoke("attack", photo_dir, "-o", out, *LITE0, "--eps", "4").exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    result = invoke("attack", photo_dir, "-o", out, *LITE0, "--format", "webp")
    assert result.exit_code == 1 and "holds another attack's outputs" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_attack_and_experiment_outputs_carry_their_inputs_colour_profile(tmp_path, photo_dir):
    from PIL import Image, ImageCms

    (photo_dir / "broken.jpg").unlink()
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    with Image.open(photo_dir / "coffee.png") as photo:
        photo.save(photo_dir / "coffee.png", icc_profile=icc)

    def profiles(folder: Path) -> dict[str, bytes | None]:
        found = {}
        for path in folder.glob("*.png"):
            with Image.open(path) as image:
                found[path.stem] = image.info.get("icc_profile")
        return found

    adv = tmp_path / "adv"
    assert invoke("attack", photo_dir, "-o", adv, *LITE0, "--eps", "2").exit_code == 0
    assert profiles(adv) == {"coffee": icc, "astronaut": None, "chelsea": None}
    out = tmp_path / "exp"
    args = ["--methods", "rescale", "--grid", "0", *LITE0]
    assert invoke("experiment", "--data", photo_dir, "-o", out, *args).exit_code == 0
    stages = sorted(out.rglob("images"))
    assert stages  # the adversarial and the purified images
    for images in stages:
        assert profiles(images) == {"coffee": icc, "astronaut": None, "chelsea": None}


def test_target_reached_leaves_out_images_already_predicted_as_the_target(tmp_path, photo_dir):
    (photo_dir / "broken.jpg").unlink()
    first = tmp_path / "first"
    assert invoke("attack", photo_dir, "-o", first, *LITE0, "--eps", "1").exit_code == 0
    records = [json.loads(line) for line in (first / "manifest.jsonl").read_text().splitlines()]
    target = records[0]["clean_pred"]  # one image's class before any attack
    already = sum(r["clean_pred"] == target for r in records)
    assert already < 3  # the three photos are of different classes
    result = invoke(
        "attack", photo_dir, "-o", tmp_path / "t", *LITE0, "--eps", "1", "--target", target
    )
    assert result.exit_code == 0, result.output
    assert f"of the {3 - already} images not already predicted as it" in result.stdout


def test_eval_follows_the_attack_labels_through_a_purify_batch_copy(
    tmp_path, photo_dir, monkeypatch
):
    (photo_dir / "broken.jpg").unlink()
    sub = photo_dir / "sub"
    sub.mkdir()
    (photo_dir / "chelsea.png").rename(sub / "chelsea.png")
    monkeypatch.chdir(tmp_path)  # the paths the manifests record are relative to here
    assert invoke("attack", "photos", "-o", "adv", *LITE0, "--eps", "2").exit_code == 0
    assert invoke("batch", "adv", "-m", "bitdepth", "-o", "purified", "-q").exit_code == 0
    # A resume records every output again (skipped): still one input per output.
    assert invoke("batch", "adv", "-m", "bitdepth", "-o", "purified", "-q").exit_code == 0
    from advpurify.evaluation.labels import purified_copy_labels

    purified = sorted((tmp_path / "purified").rglob("*.png"))
    with (tmp_path / "purified" / "manifest.jsonl").open("a") as manifest:
        manifest.write('{"status": "done", "output": 5, "input": null}\n')  # passed over
    assert purified_copy_labels(purified, tmp_path / "purified").source.startswith("attack")
    # Both folders moved together, eval run from elsewhere: still found.
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("adv", "purified"):
        (tmp_path / name).rename(moved / name)
    monkeypatch.chdir(photo_dir)
    summary = tmp_path / "eval.json"
    result = invoke("eval", moved / "purified", *LITE0, "--json", summary)
    assert result.exit_code == 0, result.output
    assert json.loads(summary.read_text())["label_source"] == "attack-manifest:clean-prediction"

    # A sub-folder of either run is labelled by its run's manifest, one level up.
    from advpurify.evaluation.accuracy import check_eval_inputs
    from advpurify.evaluation.labels import resolve_labels

    everything = sorted((moved / "purified").rglob("*.png"))
    whole = resolve_labels(everything, moved / "purified")
    chelsea = whole.indices[everything.index(moved / "purified" / "sub" / "chelsea.png")]
    for run in ("adv", "purified"):
        root, paths = check_eval_inputs(moved / run / "sub")
        labels = resolve_labels(paths, root, search_up=True)  # as eval reads them
        assert (labels.indices, labels.source) == ([chelsea], whole.source)

    # An output whose input is no longer in the attack's manifest: said, not guessed.
    records = (moved / "adv" / "manifest.jsonl").read_text().splitlines()
    kept = [line for line in records if "chelsea" not in line]
    (moved / "adv" / "manifest.jsonl").write_text("\n".join(kept) + "\n")
    result = invoke("eval", moved / "purified", *LITE0)
    assert result.exit_code == 1 and "no label for sub/chelsea.png" in result.stderr


def test_eval_report_files_stay_outside_and_take_any_file_name(tmp_path, photo_dir):
    (photo_dir / "broken.jpg").unlink()
    odd = os.fsdecode(b"caf\xe9.png")  # a name that is not UTF-8
    (photo_dir / "coffee.png").rename(photo_dir / odd)
    adv = tmp_path / "adv"
    assert invoke("attack", photo_dir, "-o", adv, *LITE0, "--eps", "2").exit_code == 0
    before = sorted(p.name for p in adv.iterdir())
    (tmp_path / "l.csv").write_text("astronaut.png,3\n")
    for args, message in [
        (["--csv", adv / "x.csv"], "write it elsewhere"),
        (["--json", adv / "manifest.jsonl"], "write it elsewhere"),
        (["--json", tmp_path / "r", "--csv", tmp_path / "r"], "the same file as --json"),
        (["--labels", tmp_path / "l.csv", "--reference", photo_dir], "give one"),
    ]:
        result = invoke("eval", adv, *LITE0, *args)
        assert result.exit_code == 1 and message in result.stderr, (args, result.output)
    assert sorted(p.name for p in adv.iterdir()) == before
    # A sub-folder's labels come from the manifest above it: that, too, is never written.
    from advpurify.evaluation.accuracy import check_report_files

    (adv / "sub").mkdir()
    with pytest.raises(AdvpurifyError, match="write it elsewhere"):
        check_report_files(adv / "sub", {"--json": adv / "manifest.jsonl"})
    check_report_files(adv / "sub", {"--json": adv / "summary.json"})
    per_image = tmp_path / "per-image.csv"
    (adv / "linked").symlink_to(photo_dir)  # not entered, and said: the figures cover less
    result = invoke("eval", adv, *LITE0, "--csv", per_image)
    assert result.exit_code == 0, result.output
    assert "note: 1 folder reached through a symbolic link not entered (e.g. linked)" in (
        result.stderr
    )
    assert b"caf\xe9.png" in per_image.read_bytes()  # the file's own name, as --labels reads it


def test_labels_file_of_the_originals_labels_their_outputs(tmp_path):
    from advpurify.evaluation.labels import LabelError, resolve_labels

    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("a.jpg,3\nb.jpg,4\nc.jpg,5\nc.webp,6\n")
    out = tmp_path / "out"
    paths = [out / "a.jpg.png", out / "b.png"]  # as purify-batch and attack name outputs
    assert resolve_labels(paths, out, csv_path).indices == [3, 4]
    with pytest.raises(LabelError, match="c.png could be any of c.jpg, c.webp"):
        resolve_labels([out / "c.png"], out, csv_path)
