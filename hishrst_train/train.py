"""Training and batched prediction of the HisHRST head over precomputed encoder features.

The recipe follows the paper: Adam (lr 1e-3), a linear warm-up then cosine decay of the learning rate,
mean-squared error on log-normalised expression, seeded for reproducibility — with the changes that make
the model beat the baselines on sections it never saw (``benchmarks/BASELINES.md``): targets standardised
per gene while training (the head starts at, and is shrunk towards, each gene's training mean) and
decoupled weight decay (:class:`TrainConfig`). A training step sees a
batch of neighbour groups (from :func:`hishrst_runtime.core.grouping.group_points`), padded and masked.

Checkpoints are ``model.safetensors`` (weights only) + ``config.json``; nothing is pickled.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from hishrst_runtime.core.errors import EnvironmentProblem
from hishrst_runtime.core.grouping import pad_groups, safe_index, scatter_groups
from hishrst_runtime.core.files import atomic_write
from hishrst_train.model import HisHRST, HisHRSTConfig
from hishrst_train.runconfig import RunConfig, RunConfigError

__all__ = ["BestEpoch", "DeviceError", "resolve_device", "TrainConfig", "train_model", "predict", "save_checkpoint", "load_checkpoint", "load_run", "seed_everything"]


class DeviceError(EnvironmentProblem):
    """``--device cuda`` on a machine where torch sees no CUDA GPU (or an unknown device name)."""


def resolve_device(device: str = "auto") -> str:
    """``"cpu"`` or ``"cuda"`` for ``device`` in ``auto`` | ``cpu`` | ``cuda`` (``auto``: cuda when
    ``torch.cuda.is_available()``); ``cuda`` without a usable GPU is a :class:`DeviceError`."""
    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"--device {device!r}: choose auto, cpu or cuda")
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise DeviceError("--device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False; torch "
                          f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto, "
                          "or install a CUDA build of torch")
    return "cuda" if device == "cuda" or (device == "auto" and available) else "cpu"


@dataclass
class TrainConfig:
    """Optimisation settings (saved in the run's ``config.json``)."""

    epochs: int = 100
    lr: float = 1e-3
    warmup_frac: float = 0.1
    batch_groups: int = 1
    #: Decoupled weight decay (AdamW; 0 is plain Adam). With standardised targets it shrinks the head
    #: towards predicting each gene's training mean.
    weight_decay: float = 0.0
    seed: int = 0
    #: Early stopping: stop when the validation MSE has not improved for this many epochs (and keep
    #: the best epoch's weights). Only used when validation groups are given.
    patience: int = 10
    #: ``standardise``: the head predicts each gene's z-score over the training spots (output × std + mean,
    #: folded into the last layer after training, so the loss — MSE on log-expression — and the saved
    #: architecture are unchanged); ``centre``: the residual from the training mean; ``none``: raw targets.
    target_scaling: str = "standardise"
    #: ``mean``: the head's last linear layer starts at zero weights, and its output at each gene's training
    #: mean (so training starts from the training-mean baseline, not from random per-gene offsets);
    #: ``default``: PyTorch's initialisation.
    init_output: str = "mean"
    #: ``dimension``: standardise every feature dimension; ``global``: centre, then one scale for all
    #: dimensions (:meth:`HisHRST.set_feature_stats`).
    feature_norm: str = "dimension"


TARGET_SCALINGS = ("standardise", "centre", "none")
INIT_OUTPUTS = ("mean", "default")
FEATURE_NORMS = ("dimension", "global")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(groups: list[np.ndarray], batch_groups: int, rng: np.random.Generator | None):
    order = np.arange(len(groups)) if rng is None else rng.permutation(len(groups))
    for i in range(0, len(order), batch_groups):
        yield pad_groups([groups[j] for j in order[i : i + batch_groups]])


def _gather(arr: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    return arr[torch.from_numpy(safe_index(index))]


def _check_inputs(features: np.ndarray, positions: np.ndarray, targets: np.ndarray, tc: TrainConfig) -> None:
    if len(features) != len(positions) or len(features) != len(targets):
        raise ValueError(
            f"features, positions and targets must have one row per spot; got {len(features)}, {len(positions)}, {len(targets)}"
        )
    if tc.epochs < 1:
        raise ValueError(f"epochs must be ≥ 1, got {tc.epochs}")
    if tc.target_scaling not in TARGET_SCALINGS:
        raise ValueError(f"target_scaling must be one of {', '.join(TARGET_SCALINGS)}, got {tc.target_scaling!r}")
    if tc.init_output not in INIT_OUTPUTS:
        raise ValueError(f"init_output must be one of {', '.join(INIT_OUTPUTS)}, got {tc.init_output!r}")
    if tc.feature_norm not in FEATURE_NORMS:
        raise ValueError(f"feature_norm must be one of {', '.join(FEATURE_NORMS)}, got {tc.feature_norm!r}")


def _new_model(config: HisHRSTConfig, features: np.ndarray, targets: np.ndarray, rows: np.ndarray,
               tc: TrainConfig, device: str) -> HisHRST:
    """A fresh model on ``device`` with input statistics and the training-time output scaling of ``rows``."""
    model = HisHRST(config)
    model.set_feature_stats(torch.from_numpy(np.asarray(features[rows], dtype=np.float32)),
                            per_dimension=tc.feature_norm == "dimension")
    y = np.asarray(targets[rows], dtype=np.float64)
    if tc.init_output == "mean":
        last = model.gene_head[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.from_numpy(y.mean(0) if tc.target_scaling == "none" else np.zeros(y.shape[1])))
    model = model.to(device)
    if tc.target_scaling != "none":
        scale = y.std(0).clip(1e-3) if tc.target_scaling == "standardise" else np.ones(y.shape[1])
        model.output_affine = (torch.tensor(scale, dtype=torch.float32, device=device),
                               torch.tensor(y.mean(0), dtype=torch.float32, device=device))
    return model


def _optimiser(model: HisHRST, tc: TrainConfig, steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (Adam when ``weight_decay`` is 0) with a linear warm-up, then cosine decay over all epochs."""
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    total = max(1, steps_per_epoch * tc.epochs)
    warmup = max(1, int(total * tc.warmup_frac))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def _epoch(model: HisHRST, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], groups: list[np.ndarray],
           opt: torch.optim.Optimizer, sched: Any, tc: TrainConfig, rng: np.random.Generator, device: str) -> float:
    """One pass over the training groups; the mean loss (masked MSE) of its steps."""
    f, p, y = data
    losses = []
    for index, mask in _batches(groups, tc.batch_groups, rng):
        m = torch.from_numpy(mask).to(device)
        out = model(_gather(f, index).to(device), _gather(p, index).to(device), m)
        err = ((out - _gather(y, index).to(device)) ** 2).mean(-1)  # [B, N]
        loss = (err * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def train_model(
    features: np.ndarray,
    positions: np.ndarray,
    targets: np.ndarray,
    *,
    groups: list[np.ndarray],
    model_config: HisHRSTConfig,
    train_config: TrainConfig | None = None,
    val_groups: list[np.ndarray] | None = None,
    history_out: dict[str, list[float]] | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> tuple[HisHRST, list[float]]:
    """Fit a :class:`HisHRST` on ``features [N, D]``, ``positions [N, 2]`` and ``targets [N, G]``.

    ``groups`` partitions the training spots (indices into the arrays) into neighbour groups. With
    ``val_groups`` (validation spots, disjoint from the training spots), the validation MSE is measured
    after every epoch, training stops after ``patience`` epochs without improvement, and the best
    epoch's weights are returned. Returns the model (eval mode, on CPU) and the mean training loss of
    each epoch run; ``history_out`` (if given) also receives ``val_mse`` and ``best_epoch``.
    """
    tc = train_config or TrainConfig()
    _check_inputs(features, positions, targets, tc)
    seed_everything(tc.seed)
    rng = np.random.default_rng(tc.seed)
    train_rows = np.unique(np.concatenate(groups)) if groups else np.arange(len(features))
    model = _new_model(model_config, features, targets, train_rows, tc, device)
    opt, sched = _optimiser(model, tc, math.ceil(len(groups) / tc.batch_groups))
    data = tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (features, positions, targets))
    history: list[float] = []
    val_hist: list[float] = []
    best = BestEpoch(tc.patience)
    model.train()
    bar = tqdm(range(tc.epochs), desc="training", unit="epoch", disable=not progress)
    for epoch in bar:
        history.append(_epoch(model, data, groups, opt, sched, tc, rng, device))  # type: ignore[arg-type]
        if not val_groups:
            bar.set_postfix(mse=f"{history[-1]:.4f}")
            continue
        val_hist.append(_val_mse(model, *data, val_groups, device))
        bar.set_postfix(mse=f"{history[-1]:.4f}", val=f"{val_hist[-1]:.4f}")
        if best.update(model, val_hist[-1], epoch):
            break
    best.finish(model, history, val_hist, history_out)
    return model.eval().cpu(), history


class BestEpoch:
    """Early stopping on a validation loss: keeps the best epoch's weights; :meth:`update` says when
    ``patience`` epochs have passed without improvement; :meth:`finish` restores the best weights, folds the
    training-time output scaling and fills ``history_out`` (``train_mse``, ``val_mse``, ``best_epoch``)."""

    def __init__(self, patience: int) -> None:
        self.patience = int(patience)
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def update(self, model: torch.nn.Module, loss: float, epoch: int) -> bool:
        if self.best is None or loss < self.best[0]:
            self.best = (loss, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
        return epoch - self.best[1] >= self.patience

    def finish(self, model: Any, history: list[float], val_hist: list[float],
               history_out: dict[str, list[float]] | None) -> None:
        if self.best is not None:
            model.load_state_dict(self.best[2])
        model.fold_output_affine()
        if history_out is not None:
            best_epoch = [self.best[1] + 1] if self.best else [len(history)]
            history_out.update(train_mse=history, val_mse=val_hist, best_epoch=best_epoch)


@torch.no_grad()
def _val_mse(model: HisHRST, f: torch.Tensor, p: torch.Tensor, y: torch.Tensor, groups: list[np.ndarray], device: str) -> float:
    model.eval()
    total, count = 0.0, 0.0
    for index, mask in _batches(groups, 32, None):
        m = torch.from_numpy(mask).to(device)
        out = model(_gather(f, index).to(device), _gather(p, index).to(device), m)
        err = ((out - _gather(y, index).to(device)) ** 2).mean(-1)
        total += float((err * m).sum())
        count += float(m.sum())
    model.train()
    return total / max(count, 1.0)


@torch.inference_mode()
def predict(
    model: HisHRST,
    features: np.ndarray,
    positions: np.ndarray,
    *,
    groups: list[np.ndarray],
    batch_groups: int = 32,
) -> np.ndarray:
    """Predict ``[N, G]`` expression; every spot is predicted within its neighbour group."""
    model.eval()
    f = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    p = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.float32))
    out = np.zeros((len(features), model.config.n_genes), dtype=np.float32)
    for index, mask in _batches(groups, batch_groups, None):
        pred = model(_gather(f, index), _gather(p, index), torch.from_numpy(mask)).numpy()
        scatter_groups(out, index, pred)
    return out


def save_checkpoint(run_dir: str | Path, model: HisHRST, config: RunConfig | dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (a :class:`RunConfig` embedding the model config) into
    ``run_dir``, each atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict() if isinstance(config, RunConfig) else dict(config)
    cfg["model"] = model.config.to_dict()
    run_config = RunConfig.from_dict(cfg, source=str(run_dir / "config.json"))
    weights = save({k: v.contiguous() for k, v in model.state_dict().items()})
    atomic_write(run_dir / "model.safetensors", weights, fsync=True)
    run_config.to_json(run_dir / "config.json")
    return run_dir


def load_run(run_dir: str | Path) -> tuple[HisHRST, RunConfig]:
    """Load a run written by :func:`save_checkpoint` (weights via safetensors, never pickle); older
    ``config.json`` layouts are upgraded. Errors (:class:`RunConfigError`, a ``ValueError``) name the file."""
    run_dir = Path(run_dir)
    cfg_path, w_path = run_dir / "config.json", run_dir / "model.safetensors"
    for path in (cfg_path, w_path):
        if not path.is_file():
            raise RunConfigError(f"{path}: missing; {run_dir} is not a finished `hishrst fit` run directory")
    config = RunConfig.from_json(cfg_path)
    model = _model_for(config)
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise RunConfigError(f"{w_path}: not a readable safetensors file ({e}); re-run `hishrst fit`") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RunConfigError(f"{w_path}: weights do not match {cfg_path} ({' '.join(str(e).split())}); re-run `hishrst fit`") from e
    return model.eval(), config


def _model_for(config: RunConfig) -> Any:
    """An untrained model of the run's head kind (``spot``: :class:`HisHRST`; ``subspot``: the sub-spot head)."""
    if config.head_kind == "subspot":
        from hishrst_train.subspot import SubspotConfig, SubspotHead

        return SubspotHead(SubspotConfig.from_dict(config.model))
    return HisHRST(HisHRSTConfig.from_dict(config.model))


def load_checkpoint(run_dir: str | Path) -> tuple[HisHRST, dict[str, Any]]:
    """:func:`load_run` with the config as a plain dict (the current ``config.json`` layout)."""
    model, config = load_run(run_dir)
    return model, config.to_dict()
