"""The training loop every trainer shares: `Trainer` runs a script's epochs of items through its loss.

A trainer script supplies only what is its own (an epoch's items, and how a batch of them becomes a
loss, or how GRPO makes one); `Trainer` does the rest the same way for all: batching (sharded over
processes under torchrun, see `finetune.distributed`), AdamW over float32 trainable parameters, bf16
autocast on CUDA, warm-up + cosine schedule, gradient accumulation (the step's gradient is the mean
over every unit of its window, a final partial step), clipping, periodic evaluation with best/final
checkpoints and resumable state (what they hold: `finetune.run_files`), JSON-lines logs, and a
Ctrl-C or SIGTERM that saves before exiting (`finetune.interrupts`).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from tqdm import tqdm

from datasets import DetectionSplit
from finetune import distributed, run_files
from finetune.checkpoint import load_trained_weights, rng_state
from finetune.config import TrainConfig, flags_dict
from finetune.evaluation import evaluate_split, format_metrics_table, save_pictures
from finetune.interrupts import NonFiniteLoss, Terminated, sigterm_interrupts
from finetune.plot import plot_log
from finetune.preparation import Splits, check_prompts_fit, seed_everything
from finetune.report import report_columns, save_result_pictures, selection_score, validation_line
from finetune.runlog import RunLog
from moondream2.errors import DiskFull, UserInputError


def lr_multiplier(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to 1, then cosine decay to `floor`. Step 0 already trains (at 1/warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


LossFn = Callable[[Any], tuple[torch.Tensor, float, dict]]


class Trainer:
    """Optimisation and bookkeeping around a script's epoch of items and its loss function.

    `make_items(epoch)` gives the epoch's items in training order (the same list on every process);
    `loss_fn(batch) -> (mean loss, weight, logs)` gives a batch's mean loss over `weight` units
    (actions, rollouts), so a window of batches on any number of processes is weighted exactly as
    one big batch.

    The contract of a step, and the points a subclass may change (GRPO does, `finetune.grpo`):
    - `optimizer_step(window)`: one step over this rank's batches of a window of
      `grad_accum_steps` global batches; it advances `state.step` by one and returns the step's
      train-log entries. The default is `accumulate` then `apply_gradients` then the schedule.
    - `accumulate(batches)`: backward of `loss_fn` on every batch, gradients the weighted mean over
      all ranks; returns the mean loss and logs. Every rank must call it as often as the others.
    - `apply_gradients()`: clip, optimizer step, clear; returns the gradient norm before clipping.
    - `score(metrics)`: model selection, higher is better; `progress_keys`: what the bar shows.
    Everything else (the loop, evaluation, checkpoints, resume, the report) is the same for all.
    """

    progress_keys: tuple[str, ...] = ("loss", "lr")  # the train-log entries the progress bar shows

    def __init__(self, config: TrainConfig, name: str, model, data: Splits, make_items: Callable[[int], list],
                 loss_fn: LossFn, eval_encode: Callable | None = None, eval_task: str = "detect"):
        self.config, self.name, self.model, self.data = config, name, model, data
        self.make_items = make_items
        self.eval_encode, self.eval_task = eval_encode, eval_task
        check_prompts_fit(model, [data.train, data.val, data.test], config.max_objects)
        self.process = distributed.process()
        self.loss_module = distributed.wrap(model, loss_fn, shard=config.fsdp)
        if config.fsdp and not self.process.distributed:
            self.print_main("--fsdp=True shards over the processes of a torchrun launch; with one process it does nothing")
        self.output_dir = Path(config.output_dir)
        self.best_pattern, self.final_name = run_files.checkpoint_names(config, name)
        self.resume_path = self.output_dir / f"resume_{name}.pt"
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.global_batch = config.batch_size * self.process.world_size
        batches_per_epoch = math.ceil(len(make_items(0)) / self.global_batch)
        total = math.ceil(batches_per_epoch / config.grad_accum_steps) * config.epochs
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        schedule = config.schedule_steps or self.total_steps
        warmup = max(1, round(config.warmup_ratio * schedule))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 1.0 if config.constant_lr else lr_multiplier(s, schedule, warmup)
        )
        self.state = run_files.TrainState()
        self.base_pictures: list[Image.Image] = []  # the starting model's test pictures (evaluate_base_on_test)
        self.reporting = False  # set once the final state is saved and the report swaps in the best weights
        # Every random stream as it was before the step in progress (None between steps): Ctrl-C
        # mid-step saves this one, so the resumed step redraws the same dropout masks and samples.
        self.rng_before_step: dict | None = None
        self.stopped_early_with: dict | None = None  # validation metrics of the step --early_stopping_patience stopped at
        if config.early_stopping_patience and data.val is None:
            self.print_main("--early_stopping_patience needs a validation split to compare; without one every step runs")
        self.log = RunLog(self.output_dir, name, flags_dict(config),
                          config.wandb or config.wandb_project is not None, config.wandb_project,
                          enabled=self.process.is_main, run_name=config.run_name)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if model.device.type == "cuda" else contextlib.nullcontext()
        )

    # -- evaluation and checkpoints --
    def evaluate(self, split: DetectionSplit | None, desc: str, n_pictures: int = 0):
        if split is None:
            return None
        cfg = self.config
        with distributed.gathered(self.loss_module):
            return evaluate_split(self.model, split, cfg.eval_batch_size, cfg.max_objects, cfg.eval_limit,
                                  n_pictures=n_pictures, encode=self.eval_encode, desc=desc, task=self.eval_task,
                                  progress=self.process.is_main)

    def save_checkpoint(self, path: Path, metrics: dict | None) -> None:
        run_files.save_checkpoint(self.model, path, self.config, self.name, self.state, metrics)

    def validate_and_checkpoint(self) -> dict | None:
        """Every rank evaluates its shard and gets the same metrics; rank 0 writes the best checkpoint
        (gathered from every rank under FSDP). The first --num_pictures validation images are drawn
        each time, into pictures_TRAINER/step_STEP/, so a user can flip through how predictions change."""
        main = self.process.is_main
        n_pictures = self.config.num_pictures if main else 0
        result = self.evaluate(self.data.val, desc=f"val@{self.state.step}", n_pictures=n_pictures)
        if result is None:
            return None
        metrics = result.metrics
        self.log.write({"event": "eval", "split": "val", "step": self.state.step, **metrics})
        if result.pictures:
            names = [r["image"] for r in result.predictions[: len(result.pictures)]]
            saved = save_pictures(result.pictures, names, self.output_dir / f"pictures_{self.name}" / f"step_{self.state.step}")
            self.log.images("val_pictures", saved[:-1], self.state.step)  # without the contact sheet
        if self.state.baseline is None:
            self.state.baseline = metrics
        score = self.score(metrics)
        if self.state.step > 0 and score > self.state.best_metric:
            old = self.state.best_path
            path = self.output_dir / self.best_pattern.format(step=self.state.step)
            self.save_checkpoint(path, metrics)
            if main and old and old != str(path) and Path(old).exists():
                Path(old).unlink()
            self.state.best_metric, self.state.best_step, self.state.best_path = score, self.state.step, str(path)
            self.state.best_metrics = metrics
            self.state.evals_without_improvement = 0
        elif self.state.step == 0:
            self.state.best_metric = score
        else:
            self.state.evals_without_improvement += 1
        self.print_main(validation_line(self.state.step, metrics, self.state))
        return metrics

    def score(self, metrics: dict) -> float:
        """Model selection (higher is better): F1, see `selection_score`."""
        return selection_score(metrics)

    def print_main(self, message: str) -> None:
        """Print once, from the main process, without breaking the progress bar."""
        if self.process.is_main:
            tqdm.write(message)

    def save_resume(self) -> None:
        run_files.save_resume(self.resume_path, self.model, self.optimizer, self.scheduler, self.state, self.config,
                              self.rng_before_step)

    def load_resume(self, path: str) -> None:
        """Continue a run, on any number of processes: the position is counted in items, not batches."""
        self.state = run_files.load_resume(path, self.model, self.optimizer, self.scheduler)
        if self.process.distributed:  # rank 0's saved stream, made distinct per rank
            seed_everything(self.config.seed + 1000 * self.state.step + self.process.rank)
        self.print_main(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch})")

    # -- the loop --
    def fit(self) -> dict:
        """Train and report. Ctrl-C or SIGTERM anywhere, or a file that breaks mid-run, saves resumable
        state first; a diverged loss stops without saving, so the last good checkpoint stays the latest."""
        try:
            with sigterm_interrupts():
                return self._fit()
        except KeyboardInterrupt as stop:
            if self._unsaved_progress():
                self.save_resume()
                self.print_main(f"interrupted: saved {self.resume_path}; continue with --resume={self.resume_path}")
            else:
                self.print_main("interrupted: nothing new to save")
            self.log.close()
            raise SystemExit(143 if isinstance(stop, Terminated) else 130) from None
        except NonFiniteLoss:
            self.log.write({"event": "diverged", "step": self.state.step})
            self.log.close()
            raise
        except UserInputError as err:
            # Under torchrun the other processes are inside a collective: saving would hang them.
            # A full disk would fail the save too, and the last resume file is still there.
            if isinstance(err, DiskFull) or not self._unsaved_progress() or self.process.distributed:
                raise
            self.save_resume()
            self.log.close()
            raise UserInputError(f"{err}; progress saved: continue with --resume={self.resume_path}") from None

    def _fit(self) -> dict:
        cfg = self.config
        if cfg.resume:
            self.load_resume(cfg.resume)
        else:
            seed_everything(cfg.seed + self.process.rank)
            if cfg.baseline_eval:
                self.validate_and_checkpoint()
                self.evaluate_base_on_test()
        with tqdm(total=self.total_steps, initial=self.state.step, desc=self.name, dynamic_ncols=True,
                  disable=not self.process.is_main) as bar:
            self._loop(bar)
        return self.finish()

    def _unsaved_progress(self) -> bool:
        """Whether a resume file would keep something: a step was taken and the model still holds the
        run's own weights (the final report swaps in the best checkpoint's, after saving the state)."""
        return self.state.step > 0 and not self.reporting

    def _loop(self, bar) -> None:
        """Windows of `grad_accum_steps` global batches; this rank trains on its slice of each."""
        cfg = self.config
        span = self.global_batch * cfg.grad_accum_steps
        self.model.train()
        while self.state.epoch < cfg.epochs and self.state.step < self.total_steps:
            items = self.make_items(self.state.epoch)
            while self.state.items_in_epoch < len(items) and self.state.step < self.total_steps:
                start = self.state.items_in_epoch
                window = items[start : start + span]
                batches = [distributed.shard(window[i : i + self.global_batch], cfg.batch_size)
                           for i in range(0, len(window), self.global_batch)]
                self.rng_before_step = rng_state()
                logs = self.optimizer_step(batches)
                self.state.items_in_epoch = start + len(window)
                self.rng_before_step = None
                bar.update(1)
                bar.set_postfix({k: f"{logs[k]:.2e}" if k == "lr" else f"{logs[k]:.4f}"
                                 for k in self.progress_keys if k in logs})
                self.log.write({"event": "train", "step": self.state.step, "epoch": self.state.epoch, **logs})
                if self.state.step % cfg.eval_interval == 0 and self.state.step < self.total_steps:
                    metrics = self.validate_and_checkpoint()
                    self.save_resume()
                    self.model.train()
                    if self._patience_ran_out():
                        self.stopped_early_with = metrics  # the final validation, already done at this step
                        return
            if self.state.items_in_epoch >= len(items):
                self.state.epoch += 1
                self.state.items_in_epoch = 0

    def _patience_ran_out(self) -> bool:
        """--early_stopping_patience evaluations in a row did not beat the best score: stop training."""
        patience, waited = self.config.early_stopping_patience, self.state.evals_without_improvement
        if patience is None or waited < patience:
            return False
        self.print_main(f"early stopping at step {self.state.step}: {waited} evaluations without a better validation score "
                 f"(--early_stopping_patience={patience})")
        self.log.write({"event": "early_stop", "step": self.state.step, "patience": patience})
        return True

    def optimizer_step(self, window: list) -> dict:
        """One optimizer step over this rank's batches of a window (the last window may be shorter).

        Extension point: a trainer with another notion of a step (GRPO: sample, then several
        updates) overrides this and builds it from `accumulate` and `apply_gradients`.
        """
        totals = self.accumulate([batch or None for batch in window])  # as many passes on every rank
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm = self.apply_gradients()
        self.scheduler.step()
        self.state.step += 1
        return {**totals, "lr": lr, "grad_norm": grad_norm}

    def accumulate(self, batches: list) -> dict[str, float]:
        """Backward of every batch, then gradients = mean over all units of the window on all ranks.

        Each batch's mean loss is backpropagated times its weight (a sum over its units); gradients
        are averaged over ranks (DDP: once, at the last backward, `no_sync` before it) and the sum is
        divided by the total weight. A `None` batch (this rank's share of a short last batch) is a
        zero loss that still joins the collectives.
        Returns the window's mean loss (all ranks) and this rank's weighted mean logs.
        """
        local_weight, local_loss, logs = 0.0, 0.0, {}
        for i, batch in enumerate(batches or [None]):
            last = i == max(len(batches), 1) - 1
            with (contextlib.nullcontext() if last else distributed.no_sync(self.loss_module)), self.autocast:
                loss, weight, parts = self.loss_module(batch)
            (loss * weight).backward()  # the dummy batch has weight 0 and zero gradients
            local_weight += weight
            local_loss += float(loss.detach()) * weight
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v * weight
        total_weight, total_loss = distributed.all_reduce_sum([local_weight, local_loss], self.model.device)
        scale = self.process.world_size / total_weight if total_weight > 0 else 0.0  # DDP averaged over ranks
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)
        mean_logs = {k: v / local_weight for k, v in logs.items()} if local_weight > 0 else {}
        mean_loss = total_loss / total_weight if total_weight > 0 else 0.0
        self._check_finite("loss", mean_loss)
        return {"loss": mean_loss, **mean_logs}

    def apply_gradients(self) -> float:
        """Clip, step the optimizer, clear the gradients; returns the norm before clipping."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self._check_finite("gradient norm", float(grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def evaluate_base_on_test(self) -> None:
        """Test metrics and pictures of the starting model, so the final report shows base against
        fine-tuned on the same held-out images (pictures side by side; not kept across a resume)."""
        n_pictures = self.config.num_pictures if self.process.is_main else 0
        base = self.evaluate(self.data.test, desc="test (base)", n_pictures=n_pictures)
        if base is not None:
            self.state.extra["base_test"] = base.metrics
            self.base_pictures = base.pictures

    def _check_finite(self, what: str, value: float) -> None:
        """Stop before a non-finite value reaches the weights: one such step turns every weight into NaN."""
        if math.isfinite(value):
            return
        kept = [str(p) for p in (self.state.best_path, self.resume_path) if p and Path(p).is_file()]
        raise NonFiniteLoss(
            f"training diverged: the {what} became {value} at step {self.state.step + 1}; these weights were not "
            f"saved (last good: {', '.join(kept) or 'none'}); lower --lr={self.config.lr} or --max_grad_norm")

    def finish(self) -> dict:
        """Final checkpoint, final validation, test metrics with the best weights, pictures, summary."""
        final_path = self.output_dir / self.final_name
        if self.stopped_early_with is not None:
            final_val = self.stopped_early_with
        else:
            final_val = self.validate_and_checkpoint() if self.state.step > 0 else self.state.baseline
        self.save_checkpoint(final_path, final_val)
        self.save_resume()  # its barrier also means the best checkpoint is on disk for every rank
        self.reporting = True
        if self.state.best_path:
            load_trained_weights(self.model, self.state.best_path)
        n_pictures = self.config.num_pictures if self.process.is_main else 0
        test = self.evaluate(self.data.test, desc="test", n_pictures=n_pictures)
        columns = report_columns(self.state, final_val, test)
        if test is not None:
            self.log.write({"event": "eval", "split": "test", "step": self.state.step, **test.metrics})
            if self.process.is_main:
                save_result_pictures(test, self.base_pictures, self.output_dir / f"pictures_{self.name}")
        if self.state.best_path is None:
            self.print_main("validation never improved on the baseline: no best checkpoint; the final one is saved")
        self.print_main(format_metrics_table(columns))
        self.print_main(f"final weights: {final_path}" + (f"\nbest weights: {self.state.best_path}" if self.state.best_path else ""))
        summary = {"final_path": str(final_path), "best_path": self.state.best_path, "metrics": columns}
        self.log.write({"event": "summary", "best_step": self.state.best_step, **summary})
        if self.process.is_main:
            curves = plot_log(self.log.path, self.output_dir / f"curves_{self.name}.png")
            self.log.images("curves", [curves], self.state.step)
            self.print_main(f"curves: {curves}")
        self.log.close()
        return summary
