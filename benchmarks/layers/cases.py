"""The issue's shape grid for the three layer ops, and each case's float32 inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LAYERS = ("elt", "lce", "ce")
LAYER_TITLES = {
    "elt": "embed_linear_tanh",
    "lce": "linear_cross_entropy",
    "ce": "cross_entropy",
}
MEASUREMENT_LABELS = {"forward": "forward (under no_grad)", "fwd_bwd": "forward + backward"}

ELT_SHAPES = {  # name: (T, E, H, V)
    "lecture": (3, 10, 200, 27),
    "wide": (8, 64, 1024, 27),
    "Brown-a": (4, 30, 100, 16383),
    "Brown-b": (4, 60, 50, 16383),
    "AP News": (5, 100, 60, 17964),
}
ELT_BATCHES = (32, 4096, 65536)
LCE_SHAPES = {  # name: (H, V)
    "lecture": (200, 27),
    "wide": (1024, 27),
    "Brown": (100, 16383),
    "32k vocab": (512, 32000),
    "GPT-2 vocab": (1024, 50257),
}
LCE_BATCHES = (32, 4096)
LCE_SEQ = ("sequence [8, 512, 512]", (8, 512), 512, 32000)  # name, leading dims, H, V
CE_VOCABS = (27, 16383, 32000, 50257)
CE_BATCHES = (32, 4096)
MEMORY_MIN_V = 16_000  # LCE peak memory is measured at V >= this

# --smoke (tests): tiny shapes, a couple of rounds
SMOKE = {
    "elt_shapes": {"tiny": (3, 4, 16, 27)}, "elt_batches": (8,),
    "lce_shapes": {"tiny": (16, 27), "tiny-wide-V": (16, 300)}, "lce_batches": (8,),
    "lce_seq": ("sequence [2, 4, 16]", (2, 4), 16, 100),
    "ce_vocabs": (27, 300), "ce_batches": (8,), "memory_min_v": 300,  # memory: tiny-wide-V only
}


@dataclass
class Case:
    layer: str  # elt | lce | ce
    shape: str  # the shape's name in the grid
    B: int  # rows (for a [B, T, H] input: B*T)
    dims: dict  # elt: T, E, H, V; lce: H, V (and lead: the leading dims of a 3-D input); ce: V
    measurements: tuple = ("fwd_bwd",)

    @property
    def V(self) -> int:
        return self.dims["V"]

    @property
    def key(self) -> str:
        return f"{self.layer}/{self.shape}/B={self.B}"

    def label(self) -> str:
        d = self.dims
        if self.layer == "elt":
            return f"{self.shape} (T={d['T']},E={d['E']},H={d['H']},V={d['V']:,})"
        if self.layer == "lce":
            return f"{self.shape} (H={d['H']},V={d['V']:,})"
        return f"V={d['V']:,}"


def grid(layers, quick: bool = False, smoke: bool = False) -> list[Case]:
    g = SMOKE if smoke else None
    elt_shapes = g["elt_shapes"] if g else ELT_SHAPES
    elt_b = g["elt_batches"] if g else tuple(b for b in ELT_BATCHES if not (quick and b > 4096))
    lce_shapes = g["lce_shapes"] if g else LCE_SHAPES
    lce_b = g["lce_batches"] if g else LCE_BATCHES
    seq = g["lce_seq"] if g else LCE_SEQ
    ce_v = g["ce_vocabs"] if g else CE_VOCABS
    ce_b = g["ce_batches"] if g else CE_BATCHES
    cases = []
    if "elt" in layers:
        for B in elt_b:
            for name, (T, E, Hd, V) in elt_shapes.items():
                cases.append(Case("elt", name, B, {"T": T, "E": E, "H": Hd, "V": V}))
    if "lce" in layers:
        for B in lce_b:
            for name, (Hd, V) in lce_shapes.items():
                cases.append(Case("lce", name, B, {"H": Hd, "V": V}))
        name, lead, Hd, V = seq
        cases.append(Case("lce", name, math.prod(lead), {"H": Hd, "V": V, "lead": list(lead)}))
    if "ce" in layers:
        for B in ce_b:
            for V in ce_v:
                cases.append(Case("ce", f"V={V}", B, {"V": V}, ("forward", "fwd_bwd")))
    return cases


def _uniform(shape, bound, g):
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def make_inputs(case: Case, seed: int = 1234, rows: int | None = None) -> dict:
    """float32 inputs of one case (``nn.Linear``-like initialization), with ``args`` (what every
    arm is called with), ``leaves`` (the tensors the backward differentiates, requires_grad) and
    ``grad_out`` (the upstream gradient; None for a scalar loss). ``rows``: fewer rows (the
    memory probe's warm-up), from the same generator."""
    g = torch.Generator().manual_seed(seed)
    d = case.dims
    B = rows or case.B
    if case.layer == "elt":
        T, E, Hd, V = d["T"], d["E"], d["H"], d["V"]
        idx = torch.randint(0, V, (B, T), generator=g)
        table = torch.randn(V, E, generator=g)
        W = _uniform((Hd, T * E), (T * E) ** -0.5, g)
        b = _uniform((Hd,), (T * E) ** -0.5, g)
        grad_out = torch.randn(B, Hd, generator=g)
        leaves = [t.requires_grad_() for t in (table, W, b)]
        return {"args": (idx, *leaves), "leaves": leaves, "leaf_names": ("table", "W", "b"), "grad_out": grad_out}
    if case.layer == "lce":
        Hd, V = d["H"], d["V"]
        lead = tuple(d["lead"]) if d.get("lead") else (B,)
        if rows:
            lead = (rows,) if len(lead) == 1 else (1, rows)
        h = torch.tanh(torch.randn(*lead, Hd, generator=g))  # hidden states, as a tanh layer makes them
        W = _uniform((V, Hd), Hd ** -0.5, g)
        b = _uniform((V,), Hd ** -0.5, g)
        y = torch.randint(0, V, lead, generator=g)
        leaves = [t.requires_grad_() for t in (h, W, b)]
        return {"args": (*leaves, y), "leaves": leaves, "leaf_names": ("h", "W", "b"), "grad_out": None}
    V = d["V"]
    logits = (2 * torch.randn(B, V, generator=g)).requires_grad_()
    y = torch.randint(0, V, (B,), generator=g)
    return {"args": (logits, y), "leaves": [logits], "leaf_names": ("logits",), "grad_out": None}
