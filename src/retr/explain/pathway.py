"""Which past behaviors a recommendation relied on: routes, keep probabilities and attention.

:func:`explain_history` runs the served model once with ``output_attentions=True`` on exactly
the window the recommendation uses, and returns per layer the route R^l (RETR: which behaviors
are on the pathway), the keep probabilities alpha, the probability each token's route was
drawn with in training (``sample_prob``: alpha under the paper's sampling, sigma(omega x
logit alpha) under the "weighted" one), omega, the rule the eval-mode route applied
(``rule``), and the head-averaged attention over the real tokens. Models without a router
give attention alone; models without attention (GRU4Rec, pop) give no layers.

``relied_on`` ranks the behaviors by what the top recommendation relied on, with the method
that measured best in the deletion test (:mod:`retr.explain.deletion`, RESULTS.md "Pathways":
removing the behaviors a faithful method ranks highest hurts the target most): the magnitude
of gradient x input of that recommendation's score, except for a router distilled from
attention (``router_target = "attention"``, ours), whose last-query attention measured better.
The signed gradient x input ranks a behavior that pushes the target down last, although
deleting it changes the prediction as much: on converged models its top-ranked behaviors
mattered no more than random ones. ``by`` picks another method; the JSON names the one used.

:func:`draw_pathway` turns that into a PNG per layer, like the paper's figures: on top, bars
of the drawn-with probability coloured by the route actually taken (red: on the pathway; grey:
dropped by this layer; pale: dropped by an earlier layer, since routes are hierarchical), alpha
as dots, and the 1/2 line when the rule is a threshold on that bar; the attention map below.
A token is red exactly when the route keeps it, whatever alpha says. Drawing uses
matplotlib's object API (Agg canvas, no pyplot), so it never changes the caller's backend and
is safe from server threads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import torch

from retr.errors import ConfigError, RetrError
from retr.explain.deletion import gradient_x_input
from retr.explain.titles import shorten
from retr.models.pathway import PathwayRouter, inference_rule_text
from retr.serving.recommender import EmptyHistoryError, Recommender

MASK_TOKEN = "[mask]"
RELIED_ON = ("auto", "gradient_abs", "gradient", "attention", "route")
WHY = {  # the deletion test, k = 3 (RESULTS.md "Deletion test on real data"; planted log:
    # benchmarks/results/routes-current/pathways.md), 3 seeds each
    "gradient_abs": "|gradient x input| of the top recommendation's score: in the deletion "
                    "test, removing the 3 behaviors it ranks highest cut HR@10 most of the "
                    "explanations for the paper's router, on the planted-pathway log (0.640 -> "
                    "0.315; signed gradient x input 0.499, last-query attention 0.585, alpha "
                    "0.638) and on ml-1m trained to convergence (0.243 -> 0.183; signed 0.240, "
                    "attention 0.187; after only 5 epochs on ml-1m the signed one cut more, "
                    "0.096 -> 0.064 against 0.075). Removing the 3 newest behaviors cut it "
                    "more still (0.155; 0.138)",
    "gradient": "gradient x input of the top recommendation's score, signed: a behavior that "
                "pushes the target down ranks last (chosen by the caller)",
    "attention": "the last query's attention at the last layer: for a router distilled from "
                 "attention it cut HR@10 most of the explanations in the deletion test on the "
                 "planted-pathway log (0.589 -> 0.257; |gradient x input| 0.319, alpha 0.274); "
                 "removing the 3 newest behaviors cut it more (0.187)",
    "route": "the keep probability alpha of the last layer (chosen by the caller)",
}
ON_COLOUR = "tab:red"
OFF_COLOUR = "darkgray"
EARLIER_COLOUR = "gainsboro"  # dropped by an earlier layer (hierarchical routes)


def _rounded(values: torch.Tensor, digits: int = 6) -> list[Any]:
    return [round(float(v), digits) for v in values.tolist()] if values.ndim == 1 else \
        [_rounded(row, digits) for row in values]


@torch.no_grad()
def explain_history(recommender: Recommender, history: object, k: int = 10,
                    exclude_seen: bool = True, titles: dict[str, str] | None = None,
                    unknown: str | None = None, by: str = "auto") -> dict[str, Any]:
    """The explanation JSON of one history: items, per-layer route/keep_prob/attention, top-k,
    and ``relied_on``: the behaviors ranked by the method ``by`` ("auto": the one that measured
    best for this model).

    ``tokens`` label the rows and columns of every per-layer list: the used history items,
    plus the ``[mask]`` slot a cloze model (BERT4Rec) predicts from.
    """
    if by not in RELIED_ON:
        raise ConfigError(f"explanation method must be one of {', '.join(RELIED_ON)}; got {by!r}")
    model = recommender.model
    enc = recommender.encode(history, unknown)
    if not len(enc.ids):
        raise EmptyHistoryError("history has no known item; there is nothing to explain")
    seqs = recommender.padded([enc])  # [1, N]
    cloze = model.objective == "cloze" and hasattr(model, "mask_id")
    if cloze:
        # the same input as BERT4Rec's user_representation: slide by one, predict at [mask]
        mask_col = torch.full_like(seqs[:, :1], int(cast(Any, model).mask_id))  # [1, 1]
        seqs = torch.cat([seqs[:, 1:], mask_col], dim=1)  # [1, N]
    out = model(seqs, output_attentions=True)
    items = recommender.external(enc.used)
    titles = titles or {}
    labels = [shorten(titles.get(i, i)) for i in items]
    tokens = items + ([MASK_TOKEN] if cloze else [])
    n = len(tokens)
    n_layers = max(len(out.attentions or []), len(out.routes or []))
    routers = [m for m in model.modules() if isinstance(m, PathwayRouter)]
    rule = inference_rule_text(routers[0].options) if routers else None
    layers = []
    for layer in range(n_layers):
        entry: dict[str, Any] = {"layer": layer + 1, "route": None, "keep_prob": None,
                                 "sample_prob": None, "omega": None, "rule": None,
                                 "pathway": None, "attention": None}
        if out.routes is not None:
            route = out.routes[layer][0, -n:]  # [n] R^l
            entry["route"] = [int(round(float(r))) for r in route.tolist()]
            entry["pathway"] = [t for t, r in zip(tokens, entry["route"], strict=True) if r]
            entry["rule"] = rule
        if out.keep_probs is not None:
            entry["keep_prob"] = _rounded(out.keep_probs[layer][0, -n:])  # [n] alpha
        if out.sample_probs is not None:
            entry["sample_prob"] = _rounded(out.sample_probs[layer][0, -n:])  # [n] drawn with
        if out.omegas is not None and layer < len(out.omegas):
            entry["omega"] = _rounded(out.omegas[layer][0, -n:])  # [n] ω
        if out.attentions is not None:
            att = out.attentions[layer][0].mean(dim=0)[-n:, -n:]  # [n, n] heads averaged
            entry["attention"] = _rounded(att)
        layers.append(entry)
    rec = recommender.recommend(history, k=k, exclude_seen=exclude_seen, unknown=unknown)
    relied = relied_on(recommender, seqs, out, rec.items[:1], routers, len(items), by)
    return {
        "model": recommender.model_name,
        "dataset": recommender.dataset_name,
        "items": items,
        "labels": labels + ([MASK_TOKEN] if cloze else []),
        "tokens": tokens,
        "truncated": enc.truncated,
        "skipped": enc.skipped,
        "has_router": out.routes is not None,
        "layers": layers,
        "recommendations": [{"item": i, "score": s, "label": shorten(titles.get(i, i))}
                            for i, s in zip(rec.items, rec.scores, strict=True)],
        "relied_on": relied,
    }


def relied_on(recommender: Recommender, seqs: torch.Tensor, out: Any, top: list[str],
              routers: list[PathwayRouter], n: int, by: str) -> dict[str, Any] | None:
    """The ``n`` history behaviors (the window's last n, [mask] excluded), most relied on
    first, by method ``by``; None when there is no recommendation or the method has nothing
    to read (attention or route of a model without them)."""
    model = recommender.model
    if by == "auto":
        distilled = any(r.options.router_target == "attention" for r in routers)
        by = "attention" if distilled and out.attentions else "gradient_abs"
    cloze = model.objective == "cloze" and hasattr(model, "mask_id")
    stop = seqs.shape[1] - (1 if cloze else 0)  # the history's columns end here
    if by in ("gradient", "gradient_abs"):
        if not top or not hasattr(model, "item_embedding"):
            return None
        target = torch.as_tensor(recommender.encode(top).ids[:1], device=seqs.device)  # [1]
        score = gradient_x_input(model, seqs, target)[0]  # [N]
        if by == "gradient_abs":
            score = score.abs()
    elif by == "attention":
        if not out.attentions:
            return None
        score = out.attentions[-1][0, :, -1].mean(dim=0)  # [N] the last query's weights
    else:
        if not out.keep_probs:
            return None
        score = out.keep_probs[-1][0]  # [N] alpha of the last layer
    score = score[stop - n:stop].float()  # [n] the history's behaviors
    order = torch.argsort(-score, stable=True).tolist()
    items = recommender.external(seqs[0, stop - n:stop][order].tolist())
    return {"method": by, "why": WHY[by], "target": top[0] if top else None,
            "items": items, "scores": [round(float(score[i]), 6) for i in order]}


def _tick_step(n: int, max_labels: int = 40) -> int:
    return max(1, math.ceil(n / max_labels))


def draw_pathway(explanation: dict[str, Any], path: str | Path, dpi: int = 120) -> Path:
    """Write the explanation as a PNG: per layer, keep probabilities and the attention map."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend, thread-safe
    except ImportError:
        raise RetrError("drawing the pathway needs matplotlib: pip install matplotlib") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = explanation["labels"]
    layers = explanation["layers"]
    n = len(labels)
    step = _tick_step(n)
    ticks = list(range(0, n, step))
    title = f"{explanation['model']}: behavior pathway"
    if not layers:
        fig = Figure(figsize=(7, 3))
        ax = fig.subplots()
        ax.axis("off")
        recs = ", ".join(r["label"] for r in explanation["recommendations"][:5])
        ax.text(0.0, 0.6, f"{explanation['model']} returns no attention or routes.",
                fontsize=11)
        ax.text(0.0, 0.3, f"top recommendations: {recs}", fontsize=9, wrap=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        return path
    side = min(12.0, max(4.0, 0.18 * n + 2.0))
    has_keep = any(layer["keep_prob"] is not None for layer in layers)
    ratios = [1, 5] if has_keep else [0.001, 5]
    fig = Figure(figsize=(side * len(layers), side * 1.25), layout="constrained")
    axes = fig.subplots(2, len(layers), gridspec_kw={"height_ratios": ratios}, squeeze=False,
                        sharex="col")
    image = None
    before = [True] * n  # on the route of the previous layer
    for col, layer in enumerate(layers):
        top, heat = axes[0, col], axes[1, col]
        route = layer["route"]
        on = [bool(r) for r in route] if route is not None else [True] * n
        if layer["keep_prob"] is not None:
            colours = [ON_COLOUR if keep else OFF_COLOUR if prev else EARLIER_COLOUR
                       for keep, prev in zip(on, before, strict=True)]
            drawn = layer.get("sample_prob") or layer["keep_prob"]
            top.bar(range(n), drawn, color=colours, width=0.85)
            top.plot(range(n), layer["keep_prob"], "k.", markersize=4, label="alpha")
            rule = layer.get("rule") or ""
            if ">= 1/2" in rule:  # a threshold on the bar: red exactly when the bar reaches it
                top.axhline(0.5, color="black", linewidth=0.6, linestyle="--")
            top.set_ylim(0, 1)
            top.set_ylabel("drawn-with prob.")
            top.tick_params(labelbottom=False)
            top.set_title(f"layer {layer['layer']}: {sum(on)}/{n} on the pathway (red)\n"
                          f"{rule}", fontsize=8)
            before = on
        else:
            top.axis("off")
        if layer["attention"] is not None:
            image = heat.imshow(layer["attention"], cmap="Blues", vmin=0.0, aspect="auto",
                                interpolation="nearest")
            if not has_keep:
                heat.set_title(f"layer {layer['layer']}: attention (mean over heads)")
        heat.set_xlim(-0.5, n - 0.5)
        heat.set_xticks(ticks)
        heat.set_xticklabels([labels[i] for i in ticks], rotation=90, fontsize=7)
        heat.set_yticks(ticks)
        heat.set_yticklabels([labels[i] for i in ticks], fontsize=7)
        if route is not None:
            for tick_labels in (heat.get_xticklabels(), heat.get_yticklabels()):
                for i, label in zip(ticks, tick_labels, strict=True):
                    label.set_color(ON_COLOUR if on[i] else "gray")
        heat.set_xlabel("key (past behavior)")
        heat.set_ylabel("query (position)")
    if image is not None:
        fig.colorbar(image, ax=axes[1, :].tolist(), shrink=0.8, label="attention")
    fig.suptitle(title)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
