"""``advpurify attack``, ``advpurify eval`` and ``advpurify experiment``: thin wrappers."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from advpurify import checks
from advpurify.cli.options import given
from advpurify.errors import AdvpurifyError
from advpurify.files import check_writable_file, check_writable_folder, display_name

# The rest was done but some files could not be read: as purify-batch (1 is a refused command).
PARTIAL = 2

CLASSIFIER_HELP = "googlenet, efficientnet-lite0, timm:NAME or torchvision:NAME"


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def _images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


def _target_reached(summary: dict) -> str:
    if "already_target" not in summary:
        return ""
    already = summary["already_target"]
    if "target_success" not in summary:
        return ", every image was already predicted as the target"
    if not already:
        return f", target reached {summary['target_success']:.1%}"
    return (
        f", target reached {summary['target_success']:.1%} of the "
        f"{_images(summary['n'] - already)} not already predicted as it"
    )


def _check_labels(labels: Path | None) -> None:
    """Read a labels file before the (slow) classifier loads, so its errors come first."""
    if labels is not None:
        from advpurify.evaluation.labels import read_labels_csv

        read_labels_csv(labels)


def _load(classifier: str, backend: str, device: str, weights: str | None):
    from advpurify.models.classifiers import load_classifier

    return load_classifier(classifier, backend=backend, device=device, weights=weights)


def attack_command(
    input: Path = typer.Argument(..., help="An image or a folder of images (recursive)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the adversarial images."),
    attack: str = typer.Option("fgsm", help="fgsm, ifgsm or pgd."),
    eps: float = typer.Option(16.0, help="Largest change per pixel, in 1/255 (0 < eps <= 255)."),
    steps: int | None = typer.Option(None, help="Iterations (ifgsm/pgd)."),
    step_size: float | None = typer.Option(None, help="Step size in 1/255 (ifgsm/pgd)."),
    random_start: bool | None = typer.Option(
        None, "--random-start/--no-random-start", help="Start from a random point (pgd: on)."
    ),
    target: str | None = typer.Option(
        None, help="Targeted attack towards this class (index 0-999 or WordNet id)."
    ),
    classifier: str = typer.Option("googlenet", "--classifier", "-c", help=CLASSIFIER_HELP),
    weights: str | None = typer.Option(None, help="Local weights file for the classifier."),
    labels: Path | None = typer.Option(None, help="CSV: path,class index or WordNet id."),
    format: str = typer.Option("png", "--format", help="png (lossless), jpg or webp."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(16, min=1),
    seed: int = typer.Option(0, help="Seeds the random start."),
) -> None:
    """Attack images (resized to 256, centre-cropped to 224) and write them with a manifest."""
    from advpurify.attacks import AttackConfig
    from advpurify.evaluation.attack_folder import (
        JPEG_WARNING,
        attack_folder,
        check_attack_inputs,
    )
    from advpurify.evaluation.labels import is_pseudo_source

    config = AttackConfig(attack, eps, steps, step_size, random_start).resolved()
    checks.seed("--seed", seed)
    format = check_attack_inputs(input, output, format, target)
    check_writable_folder(output)
    if format == "jpg":
        _err(f"warning: {JPEG_WARNING}")
    _check_labels(labels)
    loaded = _load(classifier, "torch", device, weights)
    summary = attack_folder(
        input,
        output,
        loaded,
        config,
        fmt=format,
        labels_csv=labels,
        target=target,
        batch_size=batch_size,
        seed=seed,
        log=_err,
    )
    metric = (
        "agreement with clean prediction"
        if is_pseudo_source(summary["label_source"])
        else "accuracy"
    )
    print(
        f"{_images(summary['n'])} attacked ({config.describe()}), {metric}: clean top-1 "
        f"{summary['clean']['top1']:.1%}, adversarial top-1 {summary['adversarial']['top1']:.1%}"
        + _target_reached(summary)
        + f"; written to {output} (manifest.jsonl)"
    )
    if summary["failed"]:
        _err(f"{summary['failed']} files could not be read (see manifest.jsonl)")
        raise typer.Exit(PARTIAL)


def eval_command(
    directory: Path = typer.Argument(..., help="An image or a folder of images (recursive)."),
    classifier: str = typer.Option("googlenet", "--classifier", "-c", help=CLASSIFIER_HELP),
    weights: str | None = typer.Option(None, help="Local weights file for the classifier."),
    labels: Path | None = typer.Option(None, help="CSV: path,class index or WordNet id."),
    reference: Path | None = typer.Option(
        None,
        help="Folder of the original images: without labels, measure agreement with "
        "the classifier's predictions on them.",
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write the summary here."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Write one row per image here."),
    backend: str = typer.Option("auto", help="Classifier backend (auto: ORT on CPU)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(32, min=1),
) -> None:
    """Top-1/3/5 accuracy of a classifier on a folder of images."""
    from advpurify.evaluation.accuracy import (
        check_eval_inputs,
        check_report_files,
        evaluate_folder,
    )
    from advpurify.evaluation.labels import is_pseudo_source

    check_report_files(directory, {"--json": json_path, "--csv": csv_path})
    for path, option in ((json_path, "--json"), (csv_path, "--csv")):
        if path is not None:
            check_writable_file(path, f"{option} file")
    _check_labels(labels)
    left_out: list[Path] = []
    check_eval_inputs(directory, labels, reference, left_out)
    linked = [path for path in left_out if path.is_dir()]
    if linked:  # not measured: say so, or the figures quietly cover a subset
        example = display_name(linked[0].relative_to(directory))
        folders = "folder" if len(linked) == 1 else "folders"
        _err(f"note: {len(linked)} {folders} reached through a symbolic link not entered "
             f"(e.g. {example})")  # fmt: skip
    loaded = _load(classifier, backend, device, weights)
    result = evaluate_folder(directory, loaded, labels, batch_size, reference=reference)
    for failure in result.failures:
        _err(f"skipped {failure.path}: {failure.reason}")
    if json_path:
        result.write_json(json_path)
    if csv_path:
        result.write_csv(csv_path)
    m = result.metrics
    # Labels that are (or came from) the clean predictions measure agreement, not accuracy.
    metric = (
        "agreement with clean prediction" if is_pseudo_source(result.label_source) else "accuracy"
    )
    print(
        f"{_images(result.n)}, {loaded.name}, {metric} (labels: {result.label_source}): "
        f"top-1 {m['top1']:.1%}, top-3 {m['top3']:.1%}, top-5 {m['top5']:.1%}"
    )
    if result.failures:
        raise typer.Exit(PARTIAL)


def experiment_command(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="Folder of images (recursive)."),
    output: Path = typer.Option(..., "--output", "-o", help="Report folder (reused on rerun)."),
    classifier: str = typer.Option("googlenet", "--classifier", "-c", help=CLASSIFIER_HELP),
    weights: str | None = typer.Option(None, help="Local weights file for the classifier."),
    attack: str = typer.Option("fgsm", help="fgsm, ifgsm or pgd."),
    eps: float = typer.Option(16.0, help="In 1/255 (0 < eps <= 255)."),
    steps: int | None = typer.Option(None, help="Iterations (ifgsm/pgd)."),
    step_size: float | None = typer.Option(None, help="Step size in 1/255 (ifgsm/pgd)."),
    methods: str = typer.Option("rescale", help="Comma-separated purification methods."),
    param: list[str] = typer.Option(
        [], "--param", "-p", help="method.name=value, e.g. jpeg.quality=50 (repeatable)."
    ),
    adaptive: bool = typer.Option(False, help="Also attack each method with PGD + BPDA/EOT."),
    adaptive_n: int = typer.Option(20, help="Images in the adaptive subset (seeded)."),
    adaptive_steps: int = typer.Option(10, help="PGD iterations of the adaptive attack."),
    eot: int = typer.Option(4, help="EOT draws per step for stochastic methods."),
    labels: Path | None = typer.Option(None, help="CSV: path,class index or WordNet id."),
    limit: int | None = typer.Option(None, help="Use only the first N images."),
    grid: int = typer.Option(4, help="Images in the example figure."),
    backend: str = typer.Option("auto", help="Classifier backend for the accuracy numbers."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(16, min=1),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, help="Discard results made with other settings."),
) -> None:
    """Clean, adversarial, and each method on both: the whole results table in one command."""
    from advpurify.attacks import AttackConfig
    from advpurify.cli.settings import parse_method_params
    from advpurify.evaluation.experiment import (
        ExperimentConfig,
        check_experiment_folders,
        parse_methods,
        run_experiment,
    )
    from advpurify.evaluation.labels import is_pseudo_source
    from advpurify.evaluation.report import markdown_table

    method_list = parse_methods(methods)
    checks.not_empty("--methods", method_list, methods)
    checks.seed("--seed", seed)
    checks.at_least("--grid", grid, 0)
    checks.at_least("--adaptive-n", adaptive_n, 1)
    checks.at_least("--adaptive-steps", adaptive_steps, 1)
    if adaptive:
        checks.at_least("--eot", eot, 1)
    else:
        unused = given(ctx, "adaptive_n", "adaptive_steps", "eot")
        if unused:
            raise AdvpurifyError(f"{unused[0]} goes with --adaptive: this run would not use it")
    if limit is not None:
        checks.at_least("--limit", limit, 1)
    check_experiment_folders(data, output)  # before the probe below writes into the output
    check_writable_folder(output, "report folder")
    config = ExperimentConfig(
        data=data,
        out=output,
        classifier=classifier,
        weights=weights,
        attack=AttackConfig(attack, eps, steps, step_size),
        methods=method_list,
        params=parse_method_params(param, method_list),
        adaptive=adaptive,
        adaptive_n=adaptive_n,
        adaptive_steps=adaptive_steps,
        eot=eot,
        labels_csv=labels,
        device=device,
        backend=backend,
        batch_size=batch_size,
        seed=seed,
        limit=limit,
        grid_images=grid,
        overwrite=overwrite,
    )
    config.attack.resolved()  # fail on a bad attack or eps before loading anything
    _check_labels(labels)
    try:
        result = run_experiment(config, log=_err)
    except KeyboardInterrupt:
        _err("interrupted: the images made so far are kept; rerun the same command to resume")
        raise typer.Exit(130) from None
    report = result.report
    if is_pseudo_source(report["label_source"]):
        print("No labels: numbers are agreement with the clean prediction, not accuracy.")
    print(markdown_table(report))
    print(
        f"report: {output / 'report.md'} ({output / 'report.json'}, figures in "
        f"{output / 'figures'})"
    )
    if report["failed"]:
        names = ", ".join(display_name(f["path"]) for f in report["failed"][:5])
        more = ", ..." if len(report["failed"]) > 5 else ""
        _err(f"{len(report['failed'])} files could not be read (see report.json): {names}{more}")
        raise typer.Exit(PARTIAL)


def register(app: typer.Typer) -> None:
    app.command("attack")(attack_command)
    app.command("eval")(eval_command)
    app.command("experiment")(experiment_command)
