"""LoRA update geometry: effective rank, overlap with W's top-r subspace, subspace drift."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from retroloop.geometry import (
    GeometryTracker,
    effective_rank,
    lora_modules,
    low_rank_svd,
    plot_geometry,
    subspace_overlap,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_peft(r: int, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    lora = LoraConfig(r=r, lora_alpha=32, target_modules=["q_proj", "down_proj"], lora_dropout=0.0)
    return get_peft_model(LlamaForCausalLM(config), lora)


def set_lora_B(model, fn) -> None:
    with torch.no_grad():
        for _, (_, B, _, _) in lora_modules(model).items():
            B.copy_(fn(B))


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert 1.0 < effective_rank(torch.tensor([3.0, 1.0])) < 2.0
    assert math.isnan(effective_rank(torch.zeros(3)))


def test_low_rank_svd_matches_the_dense_svd():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(20, 3, generator=g), torch.randn(3, 12, generator=g)
    U, S = low_rank_svd(B, A, 2.5)
    U_ref, S_ref, _ = torch.linalg.svd((2.5 * B @ A).double())
    torch.testing.assert_close(S, S_ref[:3])
    assert subspace_overlap(U, U_ref[:, :3]) == pytest.approx(1.0)


def test_subspace_overlap_bounds():
    eye = torch.eye(6, dtype=torch.float64)
    assert subspace_overlap(eye[:, :2], eye[:, :2]) == pytest.approx(1.0)
    assert subspace_overlap(eye[:, :2], eye[:, 2:4]) == pytest.approx(0.0)
    assert subspace_overlap(eye[:, :2], eye[:, 1:3]) == pytest.approx(0.5)


def test_fresh_lora_has_no_update_then_rank_overlap_and_drift():
    model = tiny_peft(r=4)
    tracker = GeometryTracker(model)
    first = tracker.snapshot(0)
    assert set(first["module"]) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
    }
    assert first["effective_rank"].is_nan().all() and (first["delta_norm"] == 0).all()

    set_lora_B(model, lambda B: torch.randn_like(B))
    second = tracker.snapshot(1)
    assert ((second["effective_rank"] >= 1.0) & (second["effective_rank"] <= 4.0)).all()
    assert ((second["overlap_top_r"] >= 0.0) & (second["overlap_top_r"] <= 1.0)).all()
    assert second["drift"].is_nan().all()  # nothing to compare with before

    set_lora_B(model, lambda B: 3.0 * B)  # same column space: the subspace has not moved
    assert tracker.snapshot(2)["drift"].abs().max() < 1e-9
    set_lora_B(model, lambda B: torch.randn_like(B))
    assert (tracker.snapshot(3)["drift"] > 1e-3).all()
    assert tracker.frame()["step"].to_list() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_update_inside_Ws_top_subspace_has_overlap_one():
    model = tiny_peft(r=2)
    with torch.no_grad():
        for W, B, _, _ in lora_modules(model).values():
            U, _, _ = torch.linalg.svd(W.double(), full_matrices=False)
            B.copy_(
                (U[:, :2] @ torch.tensor([[1.0, 0.2], [0.0, 0.5]], dtype=torch.float64)).float()
            )
    overlap = GeometryTracker(model).snapshot(0)["overlap_top_r"]
    assert overlap.to_list() == pytest.approx([1.0, 1.0], abs=1e-5)


def test_rank_one_lora_has_effective_rank_one():
    model = tiny_peft(r=1)
    set_lora_B(model, lambda B: torch.randn_like(B))
    frame = GeometryTracker(model).snapshot(5)
    assert frame["effective_rank"].to_list() == pytest.approx([1.0, 1.0])
    assert (frame["numerical_rank"] == 1).all()


def test_since_start_measures_only_this_runs_update(tmp_path):
    model = tiny_peft(r=2)
    set_lora_B(model, lambda B: torch.randn_like(B))  # an earlier run's update (e.g. distill)
    tracker = GeometryTracker(model, since_start=True)
    assert tracker.snapshot(0)["effective_rank"].is_nan().all()  # nothing changed yet
    set_lora_B(model, lambda B: B + 0.1 * torch.randn_like(B))
    frame = tracker.snapshot(1)
    assert (frame["delta_norm"] > 0).all() and (frame["effective_rank"] >= 1.0).all()
    plot_geometry(tracker.frame(), tmp_path / "geometry.png")
    assert (tmp_path / "geometry.png").stat().st_size > 0
