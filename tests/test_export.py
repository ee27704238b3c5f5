"""ONNX export: parity with torch on the 100 real sample images, fused graphs, refusals, cache."""

from __future__ import annotations

import os

import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from advpurify.cli import app
from advpurify.export.exporter import export_fused, export_model
from advpurify.export.fused import NOT_EXPORTABLE, NotExportableError, build_purifier
from advpurify.models.registry import get_exportable, register_exportable
from advpurify.runtime.onnx import ExportError, check_model, compare_with_torch, export_onnx
from advpurify.runtime.onnx_cache import cached_onnx, onnx_cache_dir
from advpurify.runtime.parity import ParityError, compare, report


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVPURIFY_HOME", str(tmp_path / "home"))


class Tiny(nn.Module):
    """A small CNN classifier with preprocessing inside (mean/std), [0, 1] RGB in."""

    def __init__(self, classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features((x - self.mean) / 0.25).flatten(1))


class Lying(Tiny):
    """Computes something else while being exported: its ONNX file must fail the parity check."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + 1.0 if torch.compiler.is_exporting() else out


register_exportable("test-tiny", lambda w: Tiny(), sample_shape=(3, 32, 32))
register_exportable("test-lying", lambda w: Lying(), sample_shape=(3, 32, 32))


def calibrate(classifier: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights whose top-1 depends on the image.

    Random GoogLeNet features (after ReLU and pooling) share a large mean, so a random last
    layer gives every image the same top-1; re-initialising with He-scaled weights and setting
    the last layer's bias to cancel the mean feature (measured on synthetic images, not on the
    test images) leaves the image-dependent part to decide.
    """
    from advpurify.export.exporter import synthetic_images

    gen = torch.Generator().manual_seed(seed)
    layers = [m for m in classifier.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for layer in layers:
            fan_in = layer.weight[0].numel()
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
            if layer.bias is not None:
                layer.bias.zero_()
        last = layers[-1]
        captured = []
        hook = last.register_forward_hook(lambda m, i, o: captured.append(i[0]))
        classifier(synthetic_images(8, 224, 224, seed=1))
        hook.remove()
        last.bias.copy_(-last.weight @ captured[0].mean(0))
    return classifier.eval()


@pytest.mark.parametrize(
    "name, weights",
    [("efficientnet-lite0", None), ("googlenet", "random")],
    ids=["efficientnet-lite0-real-weights", "googlenet-random-weights"],
)
def test_parity_on_all_100_sample_images(name, weights, full_sample_paths, tmp_path):
    sample_paths = full_sample_paths
    from advpurify.evaluation.classify import Preprocess
    from advpurify.models.imagenet import wnid_to_index

    classifier = get_exportable(name).build(weights)
    if weights == "random":
        calibrate(classifier)
    prepare = Preprocess.of(classifier)  # the classifier's resize + crop, on 8-bit images
    inputs = torch.stack([prepare(p) for p in sample_paths])
    assert inputs.shape == (100, 3, 224, 224)
    path = export_onnx(classifier, tmp_path / f"{name}.onnx", inputs[:2])
    check_model(path)
    report = compare_with_torch(
        classifier, path, inputs, logits=True, batch_size=25, source="sample images"
    )
    print(f"\n{name} ({weights or 'real'} weights): {report.summary()}")
    assert report.count == 100
    assert report.top1_agreement == 1.0, report.top1_disagreements
    assert report.max_abs_diff < 1e-3
    # Not a degenerate network whose top-1 is the same whatever the image.
    assert len(set(report.reference_top1)) >= 10
    if weights is None:
        # Real weights: the published accuracy on these images (91% top-1) holds for the file.
        truth = [wnid_to_index()[p.name[:9]] for p in sample_paths]
        hits = sum(int(a == b) for a, b in zip(report.top1, truth, strict=True))
        assert hits >= 88


def test_dynamic_batch_and_metadata(tmp_path):
    path = export_model("test-tiny", tmp_path / "tiny.onnx").path
    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].dim_value and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["advpurify.model"] == "test-tiny" and "advpurify.exporter" in meta
    from advpurify.runtime.ort import ort_session

    session = ort_session(path)
    for batch in (1, 5):
        out = session.run(None, {"input": torch.rand(batch, 3, 32, 32).numpy()})[0]
        assert out.shape == (batch, 10)


def test_fixed_batch_export(tmp_path, sample_dir):
    result = export_model(
        "test-tiny", tmp_path / "b4.onnx", batch=4, check_images=sample_dir, check_count=6
    )  # 6 images: the last chunk is padded to 4
    dims = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 4
    assert result.parity.count == 6 and result.parity.top1_agreement == 1.0


def test_fp16_export_runs_on_ort_within_tolerance(tmp_path):
    result = export_model("test-tiny", tmp_path / "half.onnx", fp16=True)
    types = {init.data_type for init in onnx.load(str(result.path)).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    assert result.parity.passed and result.parity.max_abs_diff > 0


def test_one_parity_rule_for_every_check():
    """Max difference within the tolerance, and no top-1 flip outside a near tie."""
    ref = torch.tensor([[5.0, 1.0, 0.0], [2.0, 1.9995, 0.0], [0.0, 3.0, 1.0]])
    same = report(ref, ref + 4e-4, logits=True)  # tolerance 1e-3 x 5
    assert same.passed and same.top1_agreement == 1.0
    near_tie = ref.clone()
    near_tie[1] = torch.tensor([1.9995, 2.0, 0.0])  # a flip inside a 5e-4 margin: rounding
    tie = report(ref, near_tie, logits=True)
    assert tie.passed and tie.top1_disagreements == (1,) and tie.real_flips == ()
    winner = torch.tensor([[2.0, 1.0, 0.0]])
    flipped = torch.tensor([[1.45, 1.55, 0.0]])  # every value within 0.6 of torch's ...
    wide = report(winner, flipped, logits=True, tolerance=0.6)
    assert wide.max_abs_diff <= wide.tolerance  # ... but top-1 flipped on a margin of 1
    assert not wide.passed and wide.real_flips == (0,)
    with pytest.raises(ExportError, match="model.onnx: output does not match torch"):
        wide.check("model.onnx", ExportError)
    far = report(ref, ref + 0.01, logits=False)
    assert not far.passed and far.top1_agreement is None
    with pytest.raises(ParityError, match="output shape"):
        report(ref, ref[:2], logits=True)
    # compare() runs both callables on the same inputs (chunked, a fixed batch padded).
    module = Tiny()
    calls: list[int] = []

    def fixed_four(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return module(x)

    inputs = torch.rand(6, 3, 32, 32)
    result = compare(module, fixed_four, inputs, logits=True, fixed_batch=4, names=("a", "b"))
    assert calls == [4, 4] and result.count == 6 and result.max_abs_diff == 0.0
    assert result.summary().startswith("b vs a on 6 inputs")


def test_a_file_that_disagrees_with_torch_fails_loudly_and_is_not_kept(tmp_path):
    target = tmp_path / "lying.onnx"
    with pytest.raises(ExportError, match=f"^{target}: output does not match torch"):
        export_model("test-lying", target)  # named as asked, not as the scratch file
    assert not target.exists()
    export_model("test-tiny", target)  # a good file there: a failed export leaves it alone
    good = target.read_bytes()
    with pytest.raises(ExportError, match="does not match torch"):
        export_model("test-lying", target)
    assert target.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.mark.parametrize("opset", [17, 999, True])
def test_an_opset_the_exporters_cannot_write_is_refused_before_exporting(tmp_path, opset):
    with pytest.raises(ExportError, match=f"opset {opset!r}: use 18 to"):
        export_model("test-tiny", tmp_path / "x.onnx", opset=opset)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("method", ["rescale", "bitdepth", "median"])
def test_fused_graph_matches_the_purifier_code(method, tmp_path, sample_dir):
    result = export_fused(
        method,
        "test-tiny",
        tmp_path / f"{method}.onnx",
        size=64,
        check_images=sample_dir,
        check_count=8,
    )
    assert result.parity.count == 8 and result.parity.top1_agreement == 1.0
    meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert meta["advpurify.model"] == f"{method}+test-tiny"


@pytest.mark.parametrize("method", sorted(NOT_EXPORTABLE))
def test_methods_that_are_not_graphs_refuse_with_the_reason(method):
    with pytest.raises(NotExportableError, match=f"purifier {method} cannot be exported: .+"):
        build_purifier(method)


def test_cli_fused_export(tmp_path, sample_dir):
    # The deployment command (--classifier googlenet in the README); a small classifier here.
    out = tmp_path / "rescale-tiny.onnx"
    result = CliRunner().invoke(
        app,
        [
            "export",
            "--purifier",
            "rescale",
            "-p",
            "factor=0.25",
            "--classifier",
            "test-tiny",
            "--size",
            "96",
            "-o",
            str(out),
            "--check-images",
            str(sample_dir),
            "--check-count",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "top-1 identical on 4/4" in result.output
    check_model(out)


def test_cli_refusals_and_missing_tensorrt_are_one_line_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "export",
            "--purifier",
            "dip",
            "--classifier",
            "googlenet",
            "-o",
            str(tmp_path / "x.onnx"),
        ],
    )
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: purifier dip cannot be exported: {NOT_EXPORTABLE['dip']}"]
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["export", "test-tiny", "-o", str(tmp_path / "x.engine")])
        assert result.exit_code == 1
        assert "error: backend tensorrt: " in result.output
        assert not (tmp_path / "x.engine").exists()
    result = runner.invoke(app, ["export", "--list"])
    assert result.exit_code == 0 and "googlenet" in result.output and "rescale" in result.output


def test_classifiers_differing_only_in_preprocessing_have_different_cache_keys():
    import dataclasses

    from advpurify.models.classifiers import Classifier
    from advpurify.models.spec import Preprocessing
    from advpurify.runtime.onnx_cache import module_digest

    net = Tiny()
    bilinear = Classifier("net", net, Preprocessing())
    bicubic = Classifier("net", net, dataclasses.replace(Preprocessing(), interpolation="bicubic"))
    assert module_digest(bilinear) == module_digest(Classifier("net", net, Preprocessing()))
    assert module_digest(bilinear) != module_digest(bicubic)


def test_onnx_cache_reuses_and_rebuilds_corrupt_files(tmp_path):
    module = Tiny()
    notes: list[str] = []
    first = cached_onnx(module, (3, 32, 32), name="tiny", notify=notes.append)
    stamp = first.stat().st_mtime_ns
    assert cached_onnx(module, (3, 32, 32), name="tiny") == first
    assert first.stat().st_mtime_ns == stamp  # reused, not exported again
    assert first.parent == onnx_cache_dir()
    # Other weights or another input size: another file.
    assert cached_onnx(Tiny(seed=1), (3, 32, 32), name="tiny") != first
    assert cached_onnx(module, (3, 48, 48), name="tiny") != first
    # A corrupted file (same size, one byte changed) is detected by its hash and rebuilt.
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    again = cached_onnx(module, (3, 32, 32), name="tiny", notify=notes.append)
    assert again == first and any("rebuilding" in n for n in notes)
    check_model(again)
    os.remove(str(first) + ".sha256")  # no recorded digest: not trusted either
    cached_onnx(module, (3, 32, 32), name="tiny")
    assert (first.parent / (first.name + ".sha256")).is_file()


def test_random_weights_are_the_same_network_every_time():
    from advpurify.models.registry import get_model

    spec = get_model("efficientnet-lite0")
    first, second = spec.build("random").state_dict(), spec.build("random").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    before = torch.rand(1)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    spec.build("random")  # the caller's random stream is left as it was
    assert torch.equal(torch.rand(1), expected) and before.shape == (1,)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            "bench --method rescale --json {tmp}/folder.json --device cpu --batch-size 1",
            "is a folder",
        ),
        (
            "export --purifier rescale --classifier test-tiny --triton-repo {tmp}/repo "
            "--triton-batch-wait-ms -5",
            "--triton-batch-wait-ms -5: must be in 0..10000",
        ),
        ("export test-tiny -o {tmp}/x.txt", "name an ONNX file or an engine"),
        (
            "export test-lying --purifier rescale --classifier test-tiny -o {tmp}/x.onnx",
            "name the classifier once",
        ),
        ("export test-tiny -o {tmp}/x.onnx --size 300", "--size goes with --purifier"),
        (
            "export test-tiny -o {tmp}/x.onnx --triton-layout bogus",
            "--triton-layout goes with --triton-repo",
        ),
        ("export test-tiny -o {tmp}/x.onnx --triton-max-batch 8", "--triton-max-batch goes with"),
        ("bench --method rescale --plot {tmp}/x.txt", "name a .png file"),
        ("bench --method rescale --weights nope", "--weights FILE goes with --classifier"),
    ],
)
def test_export_and_bench_refuse_bad_options_before_any_work(tmp_path, args, message):
    (tmp_path / "folder.json").mkdir()
    result = CliRunner().invoke(app, args.format(tmp=tmp_path).split())
    assert result.exit_code == 1 and message in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["folder.json"]


def test_the_torchscript_fallback_never_writes_another_opset_than_asked(tmp_path, monkeypatch):
    from advpurify.runtime import onnx as onnx_runtime

    real_export = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("torch.export cannot trace this module")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    path = tmp_path / "m.onnx"
    example = torch.rand(1, 3, 8, 8)
    with pytest.raises(ExportError, match="opset 21: torch.export: .*cannot trace.*"
                       "stops at opset 20: use --opset 20 or lower"):  # fmt: skip
        onnx_runtime._export_to(module, example, path, opset=21, dynamic_batch=False)
    assert not path.exists()
    asked = onnx_runtime._export_to(module, example, path, opset=18, dynamic_batch=False)
    assert asked.startswith("torchscript") and onnx_runtime.file_opset(path) == 18
