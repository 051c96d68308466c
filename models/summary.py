"""``python -m models.summary``: the Markdown table of registered variants, parameters counted by code.

Every model is built on the meta device, so no weights are allocated.
"""

from __future__ import annotations

import torch

from .spikformer import VARIANTS, Spikformer, create


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta(name: str, **kwargs) -> Spikformer:
    with torch.device("meta"):
        return create(name, **kwargs)


def summary_rows() -> list[dict]:
    rows = []
    for name, (_, paper) in VARIANTS.items():
        model = build_meta(name)
        h, w = model.grid_size()
        rows.append(
            {
                "variant": name,
                "depth": model.depth,
                "width": model.embed_dim,
                "heads": model.num_heads,
                "stem": model.stem_type.upper(),
                "params_m": count_params(model) / 1e6,
                "paper_m": paper,
                "T": model.T,
                "img_size": model.img_size,
                "tokens": h * w,
            }
        )
    return rows


def markdown_table() -> str:
    lines = [
        "| variant | depth | width | heads | stem | params (M) | paper params (M) | default T | tokens (img px) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in summary_rows():
        paper = "-" if r["paper_m"] is None else f"{r['paper_m']:.2f}"
        lines.append(
            f"| `{r['variant']}` | {r['depth']} | {r['width']} | {r['heads']} | {r['stem']} | "
            f"{r['params_m']:.3f} | {paper} | {r['T']} | {r['tokens']} ({r['img_size']}) |"
        )
    return "\n".join(lines)


def main() -> None:
    print(markdown_table())


if __name__ == "__main__":
    main()
