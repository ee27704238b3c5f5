"""Deep Image Prior: shapes, determinism, batched == one by one, stopping rules, purification."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from advpurify.attacks import eot_seeds, loss_gradient
from advpurify.errors import AdvpurifyError
from advpurify.evaluation.stages import Stage
from advpurify.models.skipnet import SkipConfig, SkipNet, reflect_pad_slices, upsample2x
from advpurify.purifiers import ParamError, create_purifier
from advpurify.purifiers.dip import PRESETS, DipSettings, fit, pad_to_multiple

# Small nets keep the file fast; the fitting code is the same at every size.
TINY = {"channels": 8, "skip_channels": 2, "scales": 3, "input_depth": 8}


@pytest.fixture(autouse=True)
def one_thread():
    # These nets are tiny: a second thread only adds synchronisation per op, which costs
    # seconds per test on a busy machine. Restored afterwards for the other test files.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> DipSettings:
    return DipSettings.from_preset("fast", **{**TINY, **overrides})


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10((a - b).square().mean()))


def test_paper_preset_and_overrides() -> None:
    paper = create_purifier("dip", preset="paper").settings.resolve()
    shape = (paper.channels, paper.skip_channels, paper.scales, paper.input_depth)
    assert shape == (128, 4, 5, 32)
    assert (paper.iterations, paper.lr, paper.ema) == (3000, 0.01, 0.99)
    assert paper.reg_noise_std == pytest.approx(1 / 30)
    fast = create_purifier("dip").settings.resolve()
    assert fast.iterations == PRESETS["fast"]["iterations"]
    custom = create_purifier(
        "dip", preset="paper", iterations=7, channels=16, lr=0.02, ema=0, stop="variance", window=5
    ).settings.resolve()
    values = (custom.iterations, custom.channels, custom.lr, custom.ema, custom.stop)
    assert values == (7, 16, 0.02, 0.0, "variance")
    assert custom.skip_channels == 4  # untouched values still come from the preset
    with pytest.raises(ParamError, match="preset"):
        create_purifier("dip", preset="slow")
    with pytest.raises(ParamError, match="ema"):
        create_purifier("dip", ema=1.5)
    # Sizes that could only fail every image (an allocation of exabytes) or never end.
    for name, value, bound in [
        ("channels", 10**8, "<= 1024"), ("input_depth", 5000, "<= 1024"),
        ("iterations", 10**7, "<= 1000000"), ("parallel", 10**6, "<= 4096"),
    ]:  # fmt: skip
        with pytest.raises(ParamError, match=f"{name}={value}: must be {bound}$"):
            create_purifier("dip", **{name: value})


def test_skipnet_paper_shape() -> None:
    net = SkipNet(SkipConfig(), n_nets=1, seeds=[0])
    with torch.no_grad():
        out = net(torch.rand(1, 32, 64, 64) * 0.1)
    assert out.shape == (1, 3, 64, 64)
    assert 0 < float(out.min()) and float(out.max()) < 1  # sigmoid output
    with pytest.raises(ValueError, match="multiple of 32"):
        net(torch.rand(1, 32, 48, 64))


def test_networks_are_independent_and_seeded() -> None:
    config = SkipConfig.uniform(3, 8, 2, 8)
    batch = SkipNet(config, n_nets=3, seeds=[5, 6, 7])
    single = SkipNet(config, n_nets=1, seeds=[6])
    for (name, p_batch), p_single in zip(
        batch.named_parameters(), single.parameters(), strict=True
    ):
        assert torch.equal(p_batch[1], p_single[0]), name
    z = torch.rand(3, 8, 32, 32)
    assert torch.equal(batch(z)[1:2], single(z[1:2]))
    batch.set_grouped(True)  # the CUDA path (one grouped conv) computes the same function
    assert torch.allclose(batch(z)[1:2], single(z[1:2]), atol=1e-5)


def test_cuda_helpers_match_torch_ops() -> None:
    # reflect_pad / upsample2x use slice-based versions on CUDA for deterministic backward.
    x = torch.randn(2, 5, 8, 6)
    for pad in (1, 3):
        assert torch.equal(reflect_pad_slices(x, pad), F.pad(x, (pad,) * 4, mode="reflect"))
    from advpurify.models.skipnet import _upsample_axis

    manual = _upsample_axis(_upsample_axis(x, 2), 3)
    assert torch.allclose(manual, upsample2x(x), atol=1e-6)


@pytest.mark.parametrize("size", [(64, 64), (37, 50), (5, 3), (1, 9)])
def test_pad_to_multiple_any_size(size: tuple[int, int]) -> None:
    images = torch.rand(2, 3, *size)
    padded, (top, left, h, w) = pad_to_multiple(images, 32)
    assert padded.shape[-2] % 32 == 0 and padded.shape[-1] % 32 == 0
    assert torch.equal(padded[..., top : top + h, left : left + w], images)


def test_purify_shapes_range_and_determinism(small_real_images: torch.Tensor) -> None:
    images = F.interpolate(small_real_images[:3], size=(37, 50), mode="bilinear")
    purifier = create_purifier("dip", **{**TINY, "iterations": 5})
    out = purifier(images, seeds=[1, 2, 3])
    assert out.shape == images.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(out, purifier(images, seeds=[1, 2, 3]))  # same seed, same output
    assert not torch.equal(out[0], purifier(images, seeds=[9, 2, 3])[0])
    tiny_image = images[:1, :, :1, :5]  # far smaller than the net's coarsest scale
    assert purifier(tiny_image, seeds=[0]).shape == tiny_image.shape
    # Callers (the experiment, the batch pipeline) purify under no_grad / inference_mode.
    with torch.no_grad():
        assert torch.equal(out, purifier(images, seeds=[1, 2, 3]))
    with torch.inference_mode():
        assert torch.equal(out, purifier(images, seeds=[1, 2, 3]))


def test_batched_equals_one_by_one(small_real_images: torch.Tensor) -> None:
    images = small_real_images[:3]
    settings = tiny(iterations=25)
    batched = fit(images, [10, 11, 12], settings).images
    for i, seed in enumerate([10, 11, 12]):
        alone = fit(images[i : i + 1], [seed], settings).images
        assert torch.equal(batched[i : i + 1], alone)  # bit for bit, on the CPU
    chunked = fit(images, [10, 11, 12], tiny(iterations=25, parallel=2)).images
    assert torch.equal(chunked, batched)


def test_variance_stop_per_image(small_real_images: torch.Tensor) -> None:
    images = small_real_images[:3]
    settings = tiny(iterations=300, stop="variance", window=10, patience=15)
    last_step: dict[int, int] = {}

    def hook(it: int, indices: list[int], *_: torch.Tensor) -> None:
        last_step.update({i: it for i in indices})

    result = fit(images, [1, 2, 3], settings, on_step=hook)
    assert all(1 <= it < 300 for it in result.iterations)  # each image stopped on its own
    # An image leaves the batch `patience` steps after its minimum, not when the last one ends.
    assert [last_step[i] for i in range(3)] == [it + 15 for it in result.iterations]
    alone = fit(images[2:3], [3], settings)
    assert alone.iterations == result.iterations[2:]
    assert torch.equal(alone.images, result.images[2:])


def _guard_trace(images: torch.Tensor, settings: DipSettings):
    raw: dict[int, list[torch.Tensor]] = {}
    avg: dict[int, list[torch.Tensor]] = {}

    def hook(it: int, indices: list[int], out: torch.Tensor, smoothed: torch.Tensor) -> None:
        for row, i in enumerate(indices):
            raw.setdefault(i, []).append(out[row].clone())
            avg.setdefault(i, []).append(smoothed[row].clone())

    return fit(images, list(range(len(images))), settings, on_step=hook), raw, avg


def test_divergence_guard_restores(small_real_images: torch.Tensor) -> None:
    # The guard's contract, checked exactly: an output whose fit PSNR drops more than guard_db
    # below the last accepted one is not accepted, and the next step starts from the weights
    # that made the last accepted output (no step noise and no averaging, so that output comes
    # back bit for bit). Comparing final PSNRs of a guarded and an unguarded run instead (as
    # this test once did) compares two chaotic trajectories: it flipped with the thread count.
    images = small_real_images
    wild = tiny(iterations=40, lr=1.0, ema=0.0, reg_noise_std=0.0)  # steps this large jump
    result, raw, avg = _guard_trace(images, wild)
    assert sum(result.restores) > 0
    for i in range(len(images)):
        rejected = 0
        last = raw[i][0]
        for t in range(1, len(raw[i])):
            out, drop = raw[i][t], psnr(last, images[i]) - psnr(raw[i][t], images[i])
            if torch.equal(avg[i][t], out):  # accepted
                assert drop <= wild.guard_db + 1e-3
                last = out
                continue
            rejected += 1
            assert torch.equal(avg[i][t], avg[i][t - 1]) and drop > wild.guard_db - 1e-3
            if t + 1 < len(raw[i]):
                assert torch.equal(raw[i][t + 1], last)  # restored weights, same output
        assert rejected == result.restores[i]
    unguarded, raw, avg = _guard_trace(images, tiny(**{**dataclasses.asdict(wild), "guard_db": 0}))
    assert unguarded.restores == [0] * len(images)
    assert all(torch.equal(a, r) for i in raw for a, r in zip(avg[i], raw[i], strict=True))


def _reference_fitter():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dip_reference.py"
    spec = importlib.util.spec_from_file_location("dip_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fit_group_reference


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"stop": "variance", "window": 5, "patience": 7, "iterations": 60},
        {"lr": 1.0, "ema": 0.0},  # the guard restores
        {"conv": "grouped"},
    ],
)
def test_same_outputs_as_the_reference_fitter(small_real_images: torch.Tensor, overrides) -> None:
    # The per-image state object, the flat Adam and the device-side guard change no arithmetic:
    # outputs, stopping steps and restores equal the fitter they replaced, bit for bit.
    images = F.interpolate(small_real_images[:3], size=(40, 50), mode="bilinear")
    settings = tiny(**{"iterations": 30, **overrides})
    new = fit(images, [4, 5, 6], settings)
    old = _reference_fitter()(images, [4, 5, 6], settings, None)
    assert torch.equal(new.images, old.images)
    assert (new.iterations, new.restores) == (old.iterations, old.restores)


def test_under_bpda_and_eot_with_the_attackers_seeds(small_real_images: torch.Tensor) -> None:
    # An adaptive attack through DIP: forward through a fit drawn from the attacker's own seeds
    # (never the defence's), backward as the identity, averaged over the EOT draws.
    images, labels = small_real_images[:2], torch.tensor([1, 2])
    purifier = create_purifier("dip", preset="tiny", iterations=5, scales=3, input_depth=4)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 5))
    grad = loss_gradient(model, images, labels, purifier=purifier, seeds=[7, 8], eot=2, step=3)
    expected = torch.zeros_like(images)
    for draw in range(2):
        seeds = eot_seeds([7, 8], 3, draw)
        assert not set(seeds) & {7, 8}
        purified = purifier(images, seeds).requires_grad_()
        loss = F.cross_entropy(model(purified), labels, reduction="sum")
        expected += torch.autograd.grad(loss, purified)[0] / 2
    assert torch.allclose(grad, expected, atol=1e-6)
    assert not torch.allclose(grad, loss_gradient(model, images, labels, seeds=[7, 8]))


def test_purified_is_closer_to_clean(small_real_images: torch.Tensor) -> None:
    clean = small_real_images
    # An FGSM-like perturbation: +-16/255 on every pixel, the worst case of an eps=16 attack.
    sign = torch.randint(0, 2, clean.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    adversarial = (clean + sign * 16 / 255).clamp(0, 1)
    settings = DipSettings.from_preset("fast", channels=16, scales=4, iterations=150, ema=0.0)
    out = fit(adversarial, [0, 1, 2, 3], settings).images
    gains = [psnr(out[i], clean[i]) - psnr(adversarial[i], clean[i]) for i in range(len(clean))]
    assert min(gains) > 0.0, gains  # every image ends closer to its clean original
    assert sum(gains) / len(gains) > 1.0, gains  # by more than 1 dB on average


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_deterministic_and_on_device(small_real_images: torch.Tensor) -> None:
    images = small_real_images[:2].cuda()
    purifier = create_purifier("dip", **{**TINY, "iterations": 20})
    out = purifier(images, seeds=[1, 2])
    assert out.is_cuda and out.shape == images.shape
    assert torch.equal(out, purifier(images, seeds=[1, 2]))


def test_a_run_records_the_fit_it_runs_not_how_it_was_asked_for(tmp_path: Path) -> None:
    from advpurify.pipeline.plan import PipelineOptions, prepare_run_file, run_config

    options = PipelineOptions()
    tiny_config = run_config(create_purifier("dip", preset="tiny"), options)
    # The preset's own value given again, or another scheduling of the networks: the same fit.
    same = create_purifier("dip", preset="tiny", channels=8, parallel=2)
    assert run_config(same, options) == tiny_config
    assert tiny_config["params"]["channels"] == PRESETS["tiny"]["channels"]
    prepare_run_file(tmp_path, tiny_config, overwrite=False)
    prepare_run_file(tmp_path, run_config(same, options), overwrite=False)  # resumes
    # run.json as the earlier form recorded it (the overrides, None for the preset's, and
    # parallel): the same fit, so it resumes; another fit in that form is still refused.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    old_params = {name: None for name in ("iterations", "channels", "skip_channels", "scales",
                  "input_depth", "lr", "reg_noise_std", "ema")}  # fmt: skip
    old_params.update(preset="tiny", stop="fixed", window=50, patience=100, guard_db=5.0,
                      parallel=0, conv="auto")  # fmt: skip
    record = {**tiny_config, "params": old_params, "version": "0.1.0"}
    (earlier / "run.json").write_text(json.dumps(record))
    prepare_run_file(earlier, tiny_config, overwrite=False)
    # ... and the resolved form that still carried input_scale.
    resolved = {**tiny_config["params"], "input_scale": 0.1}
    (earlier / "run.json").write_text(json.dumps({**record, "params": resolved}))
    prepare_run_file(earlier, tiny_config, overwrite=False)
    (earlier / "run.json").write_text(json.dumps({**record, "params": {**old_params, "lr": 0.5}}))
    with pytest.raises(AdvpurifyError, match=re.escape("params.lr: 0.5 -> 0.01")):
        prepare_run_file(earlier, tiny_config, overwrite=False)
    (earlier / "stage").mkdir()
    (earlier / "stage" / "config.json").write_text(json.dumps({"purifier": record}))
    Stage(earlier / "stage", {"purifier": {**tiny_config, "version": "0.1.0"}})  # reused

    for other, change in [
        ({"channels": 16}, "params.channels: 8 -> 16"),
        ({"conv": "grouped"}, "params.conv: 'auto' -> 'grouped'"),
        ({"preset": "fast"}, "params.iterations: 100 -> 550"),
    ]:
        changed = run_config(create_purifier("dip", **{"preset": "tiny", **other}), options)
        with pytest.raises(AdvpurifyError, match=re.escape(change)):
            prepare_run_file(tmp_path, changed, overwrite=False)
