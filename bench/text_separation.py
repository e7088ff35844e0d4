"""How far the shapes model's frozen text encoders separate the words each GenEval task turns on.

RL trains a LoRA on the transformer only; the text encoders are frozen. The transformer can act on
a word only as far as the encoders' output changes with it. For prompt pairs that differ in one
word of one kind (the opposite relation: "left of" / "right of"; any other relation; a count; the
colours of two objects swapped; a colour; a class), this prints the
relative change of the encoded sequence ``|h(a) - h(b)| / |h(a)|`` (both CLIP encoders' last hidden
states, concatenated as the SD3 pipeline does) and the cosine of the changed token's states, as
mean ± SE over the world's prompt pairs of that kind.

    python bench/text_separation.py [--model fpo_diffusion/assets/shapes_sd3] [--pairs 60]
"""
from __future__ import annotations

import argparse
import json
import math
import random

import _common as C  # noqa: F401  (the repository root on sys.path, offline hub)
import torch


def pairs(kind: str, n: int, rng: random.Random) -> list[tuple[str, str]]:
    from fpo_diffusion.shapes.scenes import COUNTS, RELATIONS, color_attr, colors, counting, position
    from fpo_diffusion.shapes.world import COLORS, SHAPES

    out = []
    for _ in range(n):
        a, b = rng.sample(SHAPES, 2)
        if kind == "opposite relation":  # left of / right of, above / below: what position prompts turn on
            r1 = rng.choice(RELATIONS)
            r2 = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[r1]
            out.append((position(a, r1, b)["prompt"], position(a, r2, b)["prompt"]))
        elif kind == "relation":
            r1, r2 = rng.sample(RELATIONS, 2)
            out.append((position(a, r1, b)["prompt"], position(a, r2, b)["prompt"]))
        elif kind == "count":
            c1, c2 = rng.sample(COUNTS, 2)
            out.append((counting(a, c1)["prompt"], counting(a, c2)["prompt"]))
        elif kind == "colour":
            k1, k2 = rng.sample(COLORS, 2)
            out.append((colors(a, k1)["prompt"], colors(a, k2)["prompt"]))
        elif kind == "colour binding":
            k1, k2 = rng.sample(COLORS, 2)
            out.append((color_attr(a, k1, b, k2)["prompt"], color_attr(a, k2, b, k1)["prompt"]))
        else:  # class
            out.append((colors(a, "red")["prompt"], colors(b, "red")["prompt"]))
    return out


@torch.no_grad()
def separation(model: str, kinds: list[str], n: int, seed: int = 0) -> dict:
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(f"{model}/tokenizer")
    encoders = [CLIPTextModelWithProjection.from_pretrained(f"{model}/{d}").eval()
                for d in ("text_encoder", "text_encoder_2")]
    rng = random.Random(seed)
    out = {}
    for kind in kinds:
        rel, cos = [], []
        for a, b in pairs(kind, n, rng):
            ids = tok([a, b], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            h = torch.cat([e(ids).last_hidden_state for e in encoders], -1)
            rel.append(float((h[0] - h[1]).norm() / h[0].norm()))
            changed = (ids[0] != ids[1]).nonzero().flatten()
            cos.append(float(torch.nn.functional.cosine_similarity(h[0, changed], h[1, changed], dim=-1).mean()))
        m = lambda v: sum(v) / len(v)  # noqa: E731
        se = lambda v: math.sqrt(sum((x - m(v)) ** 2 for x in v) / (len(v) - 1) / len(v))  # noqa: E731
        out[kind] = {"rel_change": m(rel), "rel_change_se": se(rel), "token_cos": m(cos), "token_cos_se": se(cos)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(C.ROOT / "fpo_diffusion" / "assets" / "shapes_sd3"))
    ap.add_argument("--pairs", type=int, default=60, help="prompt pairs per kind (>= 2)")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    if args.pairs < 2:
        ap.error("--pairs must be >= 2")
    C.set_threads(1)
    res = separation(args.model, ["opposite relation", "relation", "count", "colour binding", "colour",
                                      "class"], args.pairs)
    print("| prompts differ in | relative change of the encoding | cosine of the changed token |")
    print("|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v['rel_change']:.3f} ± {v['rel_change_se']:.3f} | {v['token_cos']:.3f} ± {v['token_cos_se']:.3f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
