"""Geometry of the LoRA update during on-policy distillation (DESIGN.md §5, "Geometry of OPD").

OPD updates are reported to concentrate early in a narrow subspace ("subspace locking").
For every LoRA-adapted linear layer with frozen weight W ∈ R^{O×I} and factors
A ∈ R^{r×I}, B ∈ R^{O×r}, the cumulative update is ΔW = s·B·A with s = α/r (PEFT's
`scaling`, α/√r under rsLoRA). Per module and snapshot we report:

- `effective_rank`: exp(H(p)), p_i = σ_i / Σ_j σ_j over the singular values of ΔW
  (Roy & Vetterli 2007). 1 = a single direction, r = the update spreads evenly over r.
- `overlap_top_r`: ‖U_Wᵀ U_ΔW‖_F² / k, U_W the top-r left singular vectors of W,
  U_ΔW the k ≤ r left singular vectors of ΔW with non-negligible singular value.
  1 = ΔW writes only into W's dominant output directions; a random subspace gives ≈ r/O
  (reported as `overlap_random`).
- `drift`: 1 − ‖U_prevᵀ U_ΔW‖_F² / max(k_prev, k): how far ΔW's top subspace moved since the
  previous snapshot (0 = locked, 1 = orthogonal). NaN at the first snapshot.

ΔW is never formed: with B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ,
so its SVD comes from an r×r matrix. W's SVD is computed once per module and cached (W is
frozen). A zero update (fresh LoRA, B = 0) gives NaN rank/overlap rather than noise.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import polars as pl
import torch
from torch import Tensor

log = logging.getLogger(__name__)

_REL_TOL = 1e-6  # singular values below this fraction of the largest count as zero


def lora_modules(model: torch.nn.Module) -> dict[str, tuple[Tensor, Tensor, Tensor, float]]:
    """{module name: (W_O_I, B_O_r, A_r_I, scaling)} for the active adapter of every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            clean = name.removeprefix("base_model.model.")
            key = clean if len(module.active_adapters) == 1 else f"{clean}[{adapter}]"
            out[key] = (
                module.get_base_layer().weight,
                module.lora_B[adapter].weight,
                module.lora_A[adapter].weight,
                float(module.scaling[adapter]),
            )
    return out


def low_rank_svd(B_O_r: Tensor, A_r_I: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """Left singular vectors `U_O_r` and singular values `S_r` (descending) of s·B·A, in float64
    (any inner size r ≤ min(O, I))."""
    Q_B, R_B = torch.linalg.qr(B_O_r.detach().double())  # O×r, r×r
    Q_A, R_A = torch.linalg.qr(A_r_I.detach().double().T)  # I×r, r×r
    U_m, S, _ = torch.linalg.svd(scaling * R_B @ R_A.T)
    return Q_B @ U_m, S


def effective_rank(S: Tensor) -> float:
    """exp of the Shannon entropy of σ / Σσ (Roy & Vetterli 2007); NaN for a zero matrix."""
    total = float(S.sum())
    if total <= 0.0:
        return math.nan
    p = S[S > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def subspace_overlap(U1_O_a: Tensor, U2_O_b: Tensor) -> float:
    """‖U1ᵀ U2‖_F² / min(a, b) ∈ [0, 1] for orthonormal columns: 1 when one span contains the other."""
    k = min(U1_O_a.shape[1], U2_O_b.shape[1])
    if k == 0:
        return math.nan
    return float((U1_O_a.T.double() @ U2_O_b.double()).pow(2).sum()) / k


class GeometryTracker:
    """Snapshots of every LoRA module's ΔW; `snapshot(step)` appends one row per module.

    `since_start=True` measures the update made since the tracker was created,
    ΔW = s·(B·A − B₀·A₀) = s·[B | −B₀]·[A ; A₀] (rank ≤ 2r, same QR route): the update of
    *this* run when it continues an adapter trained before (OPD after distill). With a fresh
    LoRA (B₀ = 0) both views coincide.
    """

    def __init__(self, model: torch.nn.Module, *, since_start: bool = False) -> None:
        self.model = model
        self._w_top: dict[str, Tensor] = {}  # module -> top-r left singular vectors of W (frozen)
        self._prev: dict[
            str, Tensor
        ] = {}  # module -> ΔW's left singular vectors at the last snapshot
        self._start: dict[str, tuple[Tensor, Tensor]] = {}
        if since_start:
            for name, (_, B_O_r, A_r_I, _) in lora_modules(model).items():
                self._start[name] = (B_O_r.detach().clone(), A_r_I.detach().clone())
        self.rows: list[dict] = []

    @torch.no_grad()
    def snapshot(self, step: int) -> pl.DataFrame:
        rows = []
        for name, (W_O_I, B_O_r, A_r_I, scaling) in lora_modules(self.model).items():
            r = A_r_I.shape[0]
            if name not in self._w_top:
                U_W, _, _ = torch.linalg.svd(W_O_I.detach().double(), full_matrices=False)
                self._w_top[name] = U_W[:, :r].clone()
            if name in self._start:
                B0_O_r, A0_r_I = self._start[name]
                B_O_r, A_r_I = torch.cat([B_O_r, -B0_O_r], 1), torch.cat([A_r_I, A0_r_I], 0)
            U_d, S = low_rank_svd(B_O_r, A_r_I, scaling)
            norm = float(S.pow(2).sum().sqrt())
            if norm <= _REL_TOL * scaling * float(B_O_r.norm() * A_r_I.norm()):
                norm = 0.0  # rounding noise of B·A − B₀·A₀ = 0, not an update
            k = min(r, int((S > _REL_TOL * S.max()).sum())) if norm > 0 else 0
            S = S if norm > 0 else torch.zeros_like(S)
            U_k = U_d[:, :k]
            prev = self._prev.get(name)
            drift = math.nan
            if prev is not None and k > 0 and prev.shape[1] > 0:
                drift = 1.0 - float((prev.T @ U_k).pow(2).sum()) / max(prev.shape[1], k)
            self._prev[name] = U_k
            rows.append(
                {
                    "step": step,
                    "module": name,
                    "effective_rank": effective_rank(S),
                    "overlap_top_r": subspace_overlap(self._w_top[name], U_k) if k else math.nan,
                    "drift": drift,
                    "delta_norm": norm,
                    "numerical_rank": k,
                    "overlap_random": r / W_O_I.shape[0],
                }
            )
        self.rows.extend(rows)
        return pl.DataFrame(rows, schema=_SCHEMA)

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.rows, schema=_SCHEMA)


_SCHEMA = {
    "step": pl.Int64,
    "module": pl.Utf8,
    "effective_rank": pl.Float64,
    "overlap_top_r": pl.Float64,
    "drift": pl.Float64,
    "delta_norm": pl.Float64,
    "numerical_rank": pl.Int64,
    "overlap_random": pl.Float64,
}


def plot_geometry(frame: pl.DataFrame, path: Path) -> None:
    """Effective rank, overlap with W's top-r subspace and drift vs step, one line per module
    type (q_proj, down_proj, …: the mean over layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if frame.height:
        by_type = frame.with_columns(pl.col("module").str.split(".").list.last().alias("type"))
        means = by_type.group_by("type", "step").agg(
            pl.col("effective_rank", "overlap_top_r", "drift").fill_nan(None).mean()
        )
        for kind, part in sorted(means.partition_by("type", as_dict=True).items()):
            part = part.sort("step")
            for ax, col in zip(axes, ("effective_rank", "overlap_top_r", "drift"), strict=True):
                ax.plot(part["step"], part[col], marker=".", label=kind[0])
    titles = ("effective rank of ΔW", "overlap with W top-r (left)", "drift of ΔW top-r")
    ylabels = (
        "effective rank (exp entropy of σ)",
        "overlap (0 to 1)",
        "1 − overlap with last snapshot",
    )
    for ax, title, ylabel in zip(axes, titles, ylabels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("OPD step")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
