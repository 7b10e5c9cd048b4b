"""The run: set up Accelerate, fit with early stopping and checkpoints, test the best model, write the run folder."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stda_hf import SPLITS
from stda_hf.core.config import changed_settings, config_to_dict, describe_changes, dump_config, read_settings
from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import exclusive, write_json, write_text
from stda_hf.core.processes import world_info
from stda_hf.core.utils import check_seed, progress_disabled, seed_everything
from stda_hf.data.images import check_side
from stda_hf.models.vgg import (
    MODEL_DIR,
    MODEL_NAMES,
    Preprocessing,
    build_model,
    default_preprocessing,
    describe_weights,
    layer_list,
    save_model,
)
from stda_hf.training.config import RUN_CONTROL, TrainConfig, check_config, check_report_to
from stda_hf.training.data import (
    ImageLabelSet,
    Phase,
    Splits,
    build_phases,
    build_transforms,
    load_splits,
    make_loader,
)
from stda_hf.training.resume import checkpoint_to_resume, drop_step_checkpoints, read_progress, step_saver
from stda_hf.training.state import (
    LOCK_PREFIX,
    JsonlTracker,
    RunState,
    check_deletable,
    checkpoint_dir,
    clear_run_dir,
    is_train_run_dir,
    mark_run_dir,
    prune_checkpoints,
    read_run_state,
    recover_checkpoints,
    save_checkpoint,
)
from stda_hf.training.step import (
    EpochProgress,
    EvalContext,
    EvalHook,
    batch_limit,
    compute_metrics,
    evaluate,
    learning_rate,
    phase_of,
    predict,
    subgroup_metrics,
    total_epochs,
    train_one_epoch,
    with_step_budget,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """The outcome of :func:`run_training`."""

    run_dir: Path
    status: str  # "finished", "stopped" (--stop-after-epoch) or "early-stopped"
    epochs: int  # epochs completed
    best_epoch: int
    validation: dict[str, float]  # validation metrics of the best epoch
    test: dict[str, float] | None  # test metrics of the final (best) model; None without a test split
    is_main_process: bool = True


@dataclass
class _Run:
    """Everything one run holds while training (internal)."""

    cfg: TrainConfig
    run_dir: Path
    accelerator: Any
    tracker: JsonlTracker
    splits: Splits
    preprocessing: Preprocessing
    eval_transform: Callable
    model: nn.Module
    optimizer: torch.optim.Optimizer
    phases: dict[str, Phase]
    loaders: dict[str, Any]
    loss_fns: dict[str, nn.Module]
    metric: Any
    on_evaluate: EvalHook | None
    state: RunState = field(default_factory=RunState)
    resume_progress: EpochProgress | None = None  # the epoch a step checkpoint interrupted, to continue


def run_training(cfg: TrainConfig, on_evaluate: EvalHook | None = None) -> TrainResult:
    """Train, validate each epoch, checkpoint, stop early, then test the best model and write the run folder.

    Parameters
    ----------
    cfg : TrainConfig
        Settings (see ``train.py --help``).
    on_evaluate : callable, optional
        Called with an :class:`EvalContext` after each validation and after the test evaluation; the numbers
        it returns are logged. Default: explain ``cfg.explain_images`` fixed images with
        ``cfg.explain_method`` (:func:`stda_hf.attribution.hook.explain_hook`), or nothing when that is 0.

    Returns
    -------
    TrainResult
        Status, epochs, best epoch and metrics.

    Raises
    ------
    StdaError
        Bad settings or dataset, a run folder in the way, a non-finite loss.
    """
    check_config(cfg)
    check_seed("--seed", cfg.seed)
    why = "each image of a batch becomes float32 feature maps of 64 x size x size"
    check_side("--image-size", cfg.image_size, 16, 4096, "training images", why, bytes_per_pixel=256)
    if on_evaluate is None and cfg.explain_images:
        from stda_hf.attribution.hook import explain_hook

        on_evaluate = explain_hook(cfg.explain_images, cfg.explain_method)
    rank = world_info()[0]
    busy = (
        f"another train is writing to {cfg.output_dir} (rank {rank}); wait for it to finish or choose another "
        "--output-dir"
    )
    with exclusive(cfg.output_dir, f"{LOCK_PREFIX}{rank}.lock", busy):
        return _train(cfg, on_evaluate)


def _train(cfg: TrainConfig, on_evaluate: EvalHook | None) -> TrainResult:
    """:func:`run_training` while holding the run folder's lock."""
    run = _setup(cfg, on_evaluate)
    status = _fit(run)
    if status == "stopped":
        run.accelerator.end_training()
        return _result(run, status, None)
    test = _finish(run)
    run.accelerator.end_training()
    return _result(run, status, test)


def _setup(cfg: TrainConfig, on_evaluate: EvalHook | None) -> _Run:
    from stda_hf.metrics import load_metric

    run_dir = Path(cfg.output_dir)
    if logging.getLogger("accelerate").level == logging.NOTSET:
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint lines drown ours
    tracker = JsonlTracker(run_dir / "log.jsonl")
    accelerator = _accelerator(cfg, run_dir, tracker)
    cfg = _resolved(cfg, accelerator)
    _check_world(accelerator)
    resume_from = _prepare_run_dir(cfg, run_dir, accelerator)
    with accelerator.main_process_first():
        splits = _load_splits(cfg)
    _report_skipped(splits, run_dir, accelerator)
    pre = dataclasses.replace(default_preprocessing(cfg.model, cfg.image_size), resize=cfg.resize)
    if cfg.model not in MODEL_NAMES and cfg.resize != "squash":
        logger.warning(
            "--resize %s: the model folder records it (stda label and stda explain follow it), but %s keeps its "
            "own transformers image processor, which resizes to height x width (squash) when loaded with "
            "AutoImageProcessor; use --resize squash for a model others load that way",
            cfg.resize,
            cfg.model,
        )
    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.weights, seed=cfg.seed, **_model_options(cfg))
    run = _assemble(cfg, run_dir, accelerator, tracker, splits, pre, model, load_metric(), on_evaluate)
    run.cfg = with_step_budget(run.cfg, len(run.loaders["train"]))  # --max-train-steps: the epochs it needs
    _start(run, resume_from)
    return run


def _load_splits(cfg: TrainConfig) -> Splits:
    """:func:`load_splits`, with a dataset ``datasets`` cannot build (Parquet that no longer matches the card, an
    empty shard) as one line."""
    import datasets
    from datasets.exceptions import DatasetsError

    if progress_disabled():
        datasets.disable_progress_bars()
    quiet = logging.getLogger("datasets.packaged_modules")  # logs, in many lines, the failure reported below
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return load_splits(cfg)
    except DatasetsError as err:
        cause = err.__cause__ or err
        why = (str(cause).strip().splitlines() or [""])[0][:200]
        raise StdaError(
            f"cannot build the dataset {cfg.dataset!r} ({type(cause).__name__}: {why}); a folder written by "
            "`stda package` whose files were changed since (its Parquet no longer matches its README card, or "
            "a shard is empty) must be packaged again"
        ) from err
    finally:
        quiet.setLevel(level)


def _accelerator(cfg: TrainConfig, run_dir: Path, tracker: JsonlTracker):
    """The run's Accelerator: settings given to train.py win; unset ones are left to ``accelerate launch``
    (its flags and ``accelerate config`` reach Accelerate as ``ACCELERATE_*`` environment variables)."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    log_with: list[Any] = [tracker]
    if cfg.with_tracking:
        log_with += check_report_to(cfg.report_to)
    accumulation = {}
    if (
        cfg.grad_accum is not None
    ):  # a plugin, because Accelerate lets the environment override the plain number
        accumulation["gradient_accumulation_plugin"] = GradientAccumulationPlugin(num_steps=cfg.grad_accum)
    return Accelerator(
        cpu=_cpu_only_launch(),
        mixed_precision=cfg.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")
        ),
        **accumulation,
    )


def _resolved(cfg: TrainConfig, accelerator) -> TrainConfig:
    """``cfg`` with the precision and accumulation Accelerate applies (what ``config.yaml`` records)."""
    return dataclasses.replace(
        cfg,
        mixed_precision=str(accelerator.mixed_precision),
        grad_accum=int(accelerator.gradient_accumulation_steps),
    )


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _cpu_only_launch() -> bool:
    """True for several processes on a machine without accelerator (torchrun on CPUs): train with gloo.

    Accelerate treats several CPU processes as one distributed run only when asked (``cpu=True``); without it
    torchrun would start independent copies of the same run, all writing the same folder.
    """
    has_accelerator = getattr(torch, "accelerator", None)
    busy = has_accelerator.is_available() if has_accelerator is not None else torch.cuda.is_available()
    return _world_size() > 1 and not busy


def _check_world(accelerator) -> None:
    if accelerator.num_processes != _world_size():
        raise StdaError(
            f"launched as {_world_size()} processes but Accelerate runs {accelerator.num_processes}; launch with "
            "`torchrun --nproc_per_node N train.py` (CPUs) or `accelerate launch --multi_gpu` (GPUs)"
        )


def _model_options(cfg: TrainConfig) -> dict[str, Any]:
    if cfg.model == "vgg8":
        return {
            "widths": cfg.vgg8_widths,
            "hidden": cfg.vgg8_hidden,
            "batch_norm": cfg.batch_norm,
            "dropout": cfg.dropout,
        }
    return {"dropout": cfg.dropout} if cfg.model in MODEL_NAMES else {}


def _assemble(cfg, run_dir, accelerator, tracker, splits, pre, model, metric, on_evaluate) -> _Run:
    eval_transform = build_transforms(cfg, pre, train=False)
    phases = build_phases(splits, cfg, build_transforms(cfg, pre, train=True))
    optimizer = _make_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    loaders = {
        name: accelerator.prepare(make_loader(p.dataset, cfg, p.sampler)) for name, p in phases.items()
    }
    for split in SPLITS[1:]:
        if getattr(splits, split) is not None:
            data = ImageLabelSet(getattr(splits, split), eval_transform, split)
            loaders[split] = accelerator.prepare(make_loader(data, cfg))
    loss_fns = {
        name: nn.CrossEntropyLoss(weight=p.weights.to(accelerator.device) if p.weights is not None else None)
        for name, p in phases.items()
    }
    return _Run(
        cfg, run_dir, accelerator, tracker, splits, pre, eval_transform, model, optimizer, phases, loaders,
        loss_fns, metric, on_evaluate,
    )  # fmt: skip


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _start(run: _Run, resume_from: Path | None) -> None:
    """Restore the last checkpoint, or start fresh; then open the trackers."""
    acc = run.accelerator
    if resume_from is not None:
        acc.load_state(str(resume_from))  # model, optimizer, RNG states of every process
        run.state = read_run_state(resume_from)
        run.resume_progress = read_progress(resume_from, acc.process_index)
        if acc.is_main_process:
            run.tracker.truncate_after(run.state.epoch)
        logger.info("resumed %s after epoch %d", run.run_dir, run.state.epoch)
    else:
        seed_everything(run.cfg.seed + acc.process_index)  # augmentation differs between processes
        if acc.is_main_process:
            _write_data_record(run)
    acc.wait_for_everyone()
    acc.init_trackers("stda", config=_flat_config(run.cfg))


def _prepare_run_dir(cfg: TrainConfig, run_dir: Path, accelerator) -> Path | None:
    """Check the run folder against --resume/--overwrite and write config.yaml; return the checkpoint to resume."""
    resume_from = None
    fresh = _check_run_dir(cfg, run_dir)  # on every process, before anything changes, so all refuse alike
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if fresh and is_train_run_dir(run_dir):
            clear_run_dir(run_dir)  # --overwrite, or a run of ours that never finished an epoch
        if _is_empty(run_dir):
            mark_run_dir(run_dir)  # made by this train: a later --overwrite may delete it
        recover_checkpoints(run_dir)
        dump_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    if cfg.resume and not fresh:
        resume_from = checkpoint_to_resume(cfg, run_dir, accelerator)
        if resume_from is None:
            logger.warning("--resume: no checkpoint in %s yet; starting from the beginning", run_dir)
    return resume_from


def _is_empty(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing but train's lock files (or does not exist)."""
    if not run_dir.is_dir():
        return True
    return all(p.name.startswith(LOCK_PREFIX) and p.name.endswith(".lock") for p in run_dir.iterdir())


def _started(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` got anywhere: a checkpoint (complete or not) or a final model."""
    checkpoints = run_dir / "checkpoints"
    return (checkpoints.is_dir() and any(checkpoints.iterdir())) or (run_dir / MODEL_DIR).exists()


def _check_run_dir(cfg: TrainConfig, run_dir: Path) -> bool:
    """Refuse a run folder the settings may not use; True when the run starts afresh over what is there.

    A folder train made (it holds the marker) whose run never reached a checkpoint (a mistyped --dataset, say)
    is started afresh without --overwrite: nothing in it is worth keeping.
    """
    if _is_empty(run_dir):
        return True
    ours = is_train_run_dir(run_dir)
    if not (ours or (run_dir / "config.yaml").is_file() or (run_dir / "checkpoints").is_dir()):
        raise StdaError(
            f"--output-dir {run_dir} is not empty and holds no train.py run; choose another folder"
        )
    if cfg.overwrite:
        check_deletable(run_dir)
        return True
    if ours and not _started(run_dir):
        return True
    if not cfg.resume:
        raise StdaError(
            f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to start it again, "
            "or choose another --output-dir"
        )
    _check_same_settings(cfg, run_dir / "config.yaml")
    return False


def _check_same_settings(cfg: TrainConfig, saved_file: Path) -> None:
    saved = read_settings(saved_file)
    if saved is None:
        return
    now = config_to_dict(cfg)
    saved = {"resize": "squash", **saved}  # runs saved before the choice existed squashed their images
    differ = sorted(changed_settings(saved, now, ignore=RUN_CONTROL, missing_is_change=False))
    if differ:
        pairs = describe_changes(saved, now, differ)
        raise StdaError(
            f"--resume with other settings than the run in {saved_file.parent} ({pairs}); a resumed run must use "
            f"the same settings (only {list(RUN_CONTROL)} may change). Use a new --output-dir for new settings"
        )


def _report_skipped(splits: Splits, run_dir: Path, accelerator) -> None:
    if len(splits.skipped) and accelerator.is_main_process:
        splits.skipped.save(run_dir / "skipped.json")
        logger.warning("%s; see %s", splits.skipped.summary(), run_dir / "skipped.json")


def _write_data_record(run: _Run) -> None:
    """``data.json`` (dataset, split sizes) and ``train_ids.txt`` (every image id trained on, for teacher checks)."""
    cfg, splits = run.cfg, run.splits
    trained_on = (["train"] if cfg.synthetic != "only" else []) + (
        ["synthetic"] if splits.synthetic is not None else []
    )
    ids = sorted(i for name in trained_on for i in _ids(getattr(splits, name)))
    write_text(run.run_dir / "train_ids.txt", "".join(f"{i}\n" for i in ids))
    write_json(
        run.run_dir / "data.json",
        {
            "dataset": cfg.dataset,
            "dataset_config": cfg.dataset_config,
            "revision": splits.revision or cfg.revision,
            "splits": splits.sizes(),
            "trained_on_splits": trained_on,
            "evaluated_on_splits": [s for s in SPLITS[1:] if getattr(splits, s) is not None],
            "trained_on_ids": len(ids),
            "skipped_images": len(splits.skipped),
        },
    )


def _ids(ds) -> list[str]:
    return [str(i) for i in ds["isic_id"]] if ds is not None and "isic_id" in ds.column_names else []


def _flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """Settings as scalars (TensorBoard's hparams take no lists or None)."""
    return {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config_to_dict(cfg).items()
    }


def _fit(run: _Run) -> str:
    """The epoch loop; returns "finished", "early-stopped" or "stopped"."""
    cfg, state = run.cfg, run.state
    if state.stopped_early:
        return "early-stopped"
    for epoch in range(state.epoch + 1, total_epochs(cfg) + 1):
        _run_epoch(run, epoch)
        if state.stopped_early:
            logger.info("early stopping after epoch %d (best: epoch %d)", epoch, state.best_epoch)
            return "early-stopped"
        if epoch == cfg.stop_after_epoch:
            logger.info("stopping after epoch %d as asked (--stop-after-epoch); --resume continues", epoch)
            return "stopped"
    return "finished"


def _run_epoch(run: _Run, epoch: int) -> None:
    cfg, acc = run.cfg, run.accelerator
    phase = phase_of(cfg, epoch)
    loader = run.loaders[phase]
    loader.set_epoch(epoch)
    saver = None
    if cfg.checkpointing_steps != "epoch":
        every = int(cfg.checkpointing_steps)
        saver = step_saver(acc, run.run_dir, every, epoch, len(loader), cfg.grad_accum or 1, run.state)
    start, run.resume_progress = run.resume_progress, None
    stats = train_one_epoch(
        run.model, loader, run.optimizer, run.loss_fns[phase], acc, learning_rate(cfg, epoch), epoch,
        batch_limit(cfg, epoch, len(loader)), start, saver,
    )  # fmt: skip
    val = evaluate(run.model, run.loaders["validation"], acc, run.metric)
    extra = _hook(run, epoch, "validation", run.splits.validation, val)
    improved = run.state.update(val, cfg, epoch)
    record = {
        "phase": phase,
        "lr": learning_rate(cfg, epoch),
        **_prefix("train", stats),
        **_prefix("validation", val),
    }
    acc.log({**record, **_prefix("validation", extra)}, step=epoch)
    metrics_file = run.run_dir / "metrics" / f"validation-epoch_{epoch:04d}.json"
    _save_metrics(acc, metrics_file, {**val, **extra}, epoch, "validation")
    if improved:
        save_checkpoint(acc, checkpoint_dir(run.run_dir, "best"), run.state)
    save_checkpoint(acc, checkpoint_dir(run.run_dir, epoch), run.state)
    if acc.is_main_process:
        prune_checkpoints(run.run_dir, cfg.keep_checkpoints)
        drop_step_checkpoints(run.run_dir)
    _log_epoch(epoch, phase, stats, val, cfg.monitor, improved)


def _hook(run: _Run, epoch: int, split: str, dataset, metrics: dict[str, float]) -> dict[str, float]:
    if run.on_evaluate is None:
        return {}
    model = run.accelerator.unwrap_model(run.model)
    ctx = EvalContext(
        model,
        run.accelerator,
        epoch,
        split,
        dataset,
        run.preprocessing,
        run.eval_transform,
        metrics,
        run.run_dir,
    )
    return dict(run.on_evaluate(ctx) or {})


def _prefix(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in values.items()}


def _log_epoch(epoch, phase, stats, val, monitor, improved) -> None:
    logger.info(
        "epoch %d (%s): train loss %.4f, %.0f img/s | validation %s %.4f, balanced acc %.4f%s",
        epoch,
        phase,
        stats["loss"],
        stats["images_per_second"],
        monitor,
        val[monitor],
        val["balanced_accuracy"],
        " (best so far)" if improved else "",
    )


def _save_metrics(accelerator, path: Path, metrics: dict[str, float], epoch: int, split: str) -> None:
    """``evaluate.save`` the metrics with their context, written beside ``path`` and moved over it atomically."""
    import evaluate

    if not accelerator.is_main_process:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    record = {**metrics, "epoch": epoch, "split": split}
    try:
        with _stderr_silenced():  # evaluate.save asks git for the commit; outside a repository git complains
            evaluate.save(str(tmp), **record)
    except FileNotFoundError:  # no git installed: same record, without the commit and interpreter fields
        write_json(tmp, record)
    os.replace(tmp, path)


@contextlib.contextmanager
def _stderr_silenced():
    """Send file descriptor 2 (child processes included) to /dev/null for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _finish(run: _Run) -> dict[str, float] | None:
    """Restore the best checkpoint, test it, and write the final model, plots, metrics and model card."""
    from stda_hf.training import model_card

    acc, state = run.accelerator, run.state
    best = checkpoint_dir(run.run_dir, "best")
    if best.is_dir():
        acc.load_state(str(best))
    else:
        logger.warning("no validation improvement was ever recorded; the final model is the last epoch's")
    test, logits, labels, subgroups = None, None, None, None
    if "test" in run.loaders:
        logits, labels = predict(run.model, run.loaders["test"], acc)
        test = compute_metrics(logits, labels, run.metric)
        test.update(_hook(run, state.best_epoch, "test", run.splits.test, test))
        _save_metrics(acc, run.run_dir / "metrics" / "test.json", test, state.best_epoch, "test")
        subgroups = _save_subgroups(run, logits, labels)
        acc.log({**_prefix("test", test), **_flat_subgroups(subgroups)}, step=state.epoch)
    if acc.is_main_process:
        model_dir = run.run_dir / MODEL_DIR
        save_model(acc.unwrap_model(run.model), model_dir, run.preprocessing)
        model_card.write_run_card(model_dir, _card_facts(run, test, subgroups), logits, labels)
        if run.cfg.push_to_hub:
            push_run(model_dir, run.cfg.hub_model_id, run.cfg.hub_private)
    acc.wait_for_everyone()
    return test


def _save_subgroups(run: _Run, logits: torch.Tensor, labels: torch.Tensor) -> dict | None:
    """Test metrics per subgroup (skin type, age, sex, site: what the dataset has) in
    ``metrics/test_subgroups.json`` and the log; None when the test split has no subgroup column."""
    found = subgroup_metrics(run.splits.test, logits, labels, run.metric)
    if not found:
        return None
    if run.accelerator.is_main_process:
        write_json(run.run_dir / "metrics" / "test_subgroups.json", {"epoch": run.state.best_epoch, **found})
    for column, groups in found.items():
        logger.info(
            "test by %s: %s",
            column,
            ", ".join(f"{v} (n={int(m['n'])}): AUC {m['roc_auc']:.3f}" for v, m in groups.items()),
        )
    return found


def _flat_subgroups(subgroups: dict | None) -> dict[str, float]:
    """``test/<column>=<value>/<metric>`` numbers for the trackers."""
    found = subgroups or {}
    return {
        f"test/{c}={v}/{k}": x for c, groups in found.items() for v, m in groups.items() for k, x in m.items()
    }


def _card_facts(run: _Run, test: dict[str, float] | None, subgroups=None):
    from stda_hf.training.model_card import RunFacts, base_model, dataset_card_facts

    cfg, unwrapped = run.cfg, run.accelerator.unwrap_model(run.model)
    card = dataset_card_facts(cfg.dataset, run.splits.revision or cfg.revision)
    return RunFacts(
        config=config_to_dict(cfg),
        layers=layer_list(unwrapped),
        parameters=sum(p.numel() for p in unwrapped.parameters()),
        weights=describe_weights(cfg.model, cfg.weights, cfg.seed),
        split_sizes=run.splits.sizes(),
        best_epoch=run.state.best_epoch,
        epochs=run.state.epoch,
        stopped_early=run.state.stopped_early,
        validation=run.state.best_metrics,
        test=test,
        preprocessing=run.preprocessing,
        dataset_license=card.get("license"),
        dataset_id=card.get("hub_id"),
        dataset_license_name=card.get("license_name"),
        dataset_license_link=card.get("license_link"),
        base_model=base_model(cfg.model, cfg.weights),
        subgroups=subgroups,
        dataset_revision=run.splits.revision,
    )


def _result(run: _Run, status: str, test: dict[str, float] | None) -> TrainResult:
    state = run.state
    status = "early-stopped" if state.stopped_early and status != "stopped" else status
    return TrainResult(
        run.run_dir,
        status,
        state.epoch,
        state.best_epoch,
        state.best_metrics,
        test,
        run.accelerator.is_main_process,
    )


def push_run(model_dir: Path, repo_id: str, private: bool = False) -> str:
    """Upload a run's ``model/`` folder (weights, config, card, plots) to the Hub model repo ``repo_id``.

    The token comes from ``HF_TOKEN`` or ``hf auth login`` and is never printed; transient failures are retried
    (:func:`stda_hf.core.hub.upload_folder`, as ``stda push`` does). Checkpoints stay local.

    Raises
    ------
    StdaError
        No token, no permission, or the Hub unreachable.
    """
    from stda_hf.core.hub import Upload, upload_folder

    upload = Upload(
        repo_id,
        repo_type="model",
        private=private,
        commit_message="Upload model trained with stda-hf train.py",
    )
    url = upload_folder(model_dir, upload)
    logger.info("pushed %s to %s", model_dir, repo_id)
    return url
