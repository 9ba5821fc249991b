"""How well an edu_train model ranks web documents it never saw, against document length.

What: scores two independent sets with the model (fastText's expected rating, and the
combiner's score when combiner.json is beside it, exactly as `edu_score` computes them) and
prints ROC AUC for each beside document length and beside the rank average of fastText and
length:
- WebOrganizer pages (weborganizer.jsonl.gz in the `--data` folder; evaluation only,
  never shipped) whose web domain is in edu_train's held-out groups (`--seed`,
  `--test-fraction` as in the model's training; every page when the model never saw
  WebOrganizer, `--all-domains`), positive = an educational format (rating >= 3 in
  WEBORGANIZER_FORMATS: Academic Writing, Knowledge Article, Tutorial, Documentation,
  Nonfiction Writing); beside it, `*_not_junk`: AUC for rating >= 1 (every format but
  Spam / Ads, Product Page, Content Listing, ...: what edu_score's phase-1 threshold is
  for) and `*_spearman`: rank correlation with the 0-5 format rating;
- the 200 HPLT v2 English excerpts with human labels (hplt_en.jsonl.gz, batch 0), positive =
  natural, correct-language, non-adult text (`unnatural` 0, `porn` 0, `lang_correct` 1).
  30 negatives only: `*_ci95` is a bootstrap 95% interval of the AUC (about +-0.07), so
  differences of a few hundredths between models are within noise there.
It also times `edu_score` (setup excluded) on the WebOrganizer pages, one thread, and
prints docs/s per core beside fastText's raw `predict` on the same lines.

Why: edu_train's own held-out split mixes label sources; these two sets are web documents
judged by someone other than the training labels (a format classifier's annotators, HPLT's
human annotators), the closest to "a crawl it never saw" available offline.

    .venv/bin/python -m benchmarks.edu_quality runs/edu_full/edu_train --data FOLDER   # trained with formats
    .venv/bin/python -m benchmarks.edu_quality runs/edu_classifier/edu_train --data FOLDER --all-domains

FOLDER (default: $PRIMER_EDU_DATA) holds weborganizer.jsonl.gz (id, text, url, format) and
hplt_en.jsonl.gz (HPLT v2 excerpts with `labels`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DATA = Path(os.environ.get("PRIMER_EDU_DATA", "."))


def _rows(name: str) -> list[dict]:
    with gzip.open(DATA / name, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _rank01(x: np.ndarray) -> np.ndarray:
    from filters.edu.metrics import _rank

    return _rank(x) / max(1, len(x) - 1)


def _auc_ci95(score: np.ndarray, positive: np.ndarray, n: int = 1000) -> list[float]:
    """Bootstrap 95% interval of the ROC AUC (documents resampled, fixed seed)."""
    from filters.edu.metrics import roc_auc

    rng = np.random.default_rng(0)
    aucs = []
    for _ in range(n):
        i = rng.integers(0, len(score), len(score))
        a = roc_auc(score[i], positive[i])
        if a is not None:
            aucs.append(a)
    return [round(float(q), 4) for q in np.quantile(aucs, [0.025, 0.975])]


def evaluate_sets(model_dir: Path, seed: int, test_fraction: float, all_domains: bool) -> dict:
    from filters.edu.labels import WEBORGANIZER_FORMATS, url_hosts
    from filters.edu.metrics import roc_auc, spearman
    from filters.edu.score import EduScoreStage
    from filters.edu.train import _group_keys

    wo = _rows("weborganizer.jsonl.gz")
    table = pa.table({"id": [r["id"] for r in wo], "url": [r["url"] for r in wo],
                      "text": pa.array([r["text"] for r in wo], pa.large_string())})  # fmt: skip
    rating = np.array([WEBORGANIZER_FORMATS.get(r["format"], -1) for r in wo])
    keep = rating >= 0
    if not all_domains:
        groups = pc.binary_join_element_wise("host:", url_hosts(table["url"]), "")
        keep &= (_group_keys(groups, seed) / 2.0**64) < test_fraction
    wo_table, wo_rating = table.filter(pa.array(keep)), rating[keep]
    wo_pos = wo_rating >= 3

    hplt = [r for r in _rows("hplt_en.jsonl.gz") if r.get("labels")]
    hp_table = pa.table({"id": [r["id"] for r in hplt],
                         "text": pa.array([r["text"] for r in hplt], pa.large_string())})  # fmt: skip
    hp_pos = np.array([r["labels"]["unnatural"] == 0 and r["labels"]["porn"] == 0
                       and r["labels"]["lang_correct"] == 1 for r in hplt])  # fmt: skip

    model = str(model_dir / "model.bin")
    out: dict = {}
    for name, t, pos in (("weborganizer", wo_table, wo_pos), ("hplt_human", hp_table, hp_pos)):
        ft = EduScoreStage(model=model, use_combiner=False, drop_below_phase1=False)(t)
        length = pc.utf8_length(t["text"]).to_numpy(zero_copy_only=False).astype(np.float64)
        scores = {"fasttext": ft["edu_score"].to_numpy().astype(np.float64), "length": length}
        if (model_dir / "combiner.json").is_file():
            comb = EduScoreStage(model=model, drop_below_phase1=False)(t)["edu_score"].to_numpy()
            scores["combiner"] = comb.astype(np.float64)
        res: dict = {"n": len(t), "positives": int(pos.sum())}
        for key, score in scores.items():
            res[key] = roc_auc(score, pos)
        res["rank_average_fasttext_length"] = roc_auc(
            _rank01(scores["fasttext"]) + _rank01(length), pos
        )
        for key, score in scores.items():
            if name == "weborganizer":
                res[f"{key}_not_junk"] = roc_auc(score, wo_rating >= 1)
                res[f"{key}_spearman"] = spearman(score, wo_rating)
            else:
                res[f"{key}_ci95"] = _auc_ci95(score, pos)
        out[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}
    out["weborganizer"]["domains"] = (
        "all" if all_domains else f"held-out (seed {seed}, {test_fraction})"
    )
    return out


def throughput(model_dir: Path, n: int = 5_000) -> dict:
    """docs/s on one core: edu_score (fused fastText, with and without the combiner) and
    fastText's own predict on the same lines."""
    from filters.edu.score import EduScoreStage
    from filters.fasttext_scorer import fasttext_lines, load_fasttext

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    wo = _rows("weborganizer.jsonl.gz")[:n]
    table = pa.table({"id": [r["id"] for r in wo],
                      "text": pa.array([r["text"] for r in wo], pa.large_string())})  # fmt: skip
    out = {}
    for name, use in (("edu_score", False), ("edu_score+combiner", True)):
        stage = EduScoreStage(model=str(model_dir / "model.bin"), use_combiner=use,
                              drop_below_phase1=False)  # fmt: skip
        stage(table.slice(0, 10))  # setup and numba compile outside the clock
        t0 = time.perf_counter()
        for lo in range(0, len(table), 1000):
            stage(table.slice(lo, 1000))
        out[name] = round(len(table) / (time.perf_counter() - t0), 1)
    meta = json.loads((model_dir / "metrics.json").read_text())["preprocess"]
    model = load_fasttext(model_dir / "model.bin")
    lines = fasttext_lines(table["text"], meta["lowercase"], meta["max_chars"])
    t0 = time.perf_counter()
    for line in lines:
        model.predict(line, k=-1)
    out["fasttext_predict"] = round(len(lines) / (time.perf_counter() - t0), 1)
    out["edu_score_vs_predict"] = round(out["edu_score"] / out["fasttext_predict"], 2)
    out["edu_score+combiner_vs_predict"] = round(
        out["edu_score+combiner"] / out["fasttext_predict"], 2
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "model_dir", type=Path, help="an edu_train output folder (model.bin, metrics.json)"
    )
    ap.add_argument(
        "--seed", type=int, default=None, help="edu_train's seed (default: from metrics.json)"
    )
    ap.add_argument("--test-fraction", type=float, default=None)
    ap.add_argument("--all-domains", action="store_true", help="the model never saw WebOrganizer")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--data", type=Path, help="the evaluation files' folder ($PRIMER_EDU_DATA)")
    args = ap.parse_args()
    if args.data is not None:
        globals()["DATA"] = args.data  # _rows reads the module's DATA
    if not (DATA / "weborganizer.jsonl.gz").is_file():
        ap.error(f"{DATA}: no weborganizer.jsonl.gz; pass --data FOLDER or set PRIMER_EDU_DATA")
    m = json.loads((args.model_dir / "metrics.json").read_text())
    seed = m["hyperparameters"]["seed"] if args.seed is None else args.seed
    frac = m["data"]["test_fraction"] if args.test_fraction is None else args.test_fraction
    res = evaluate_sets(args.model_dir, seed, frac, args.all_domains)
    if not args.no_speed:
        res["docs_per_s_per_core"] = throughput(args.model_dir)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
