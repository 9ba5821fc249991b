"""Educational value: a teacher LLM rates a sample, fastText learns the ratings, every
document is scored. Three stages, as FineWeb-Edu and Phi-3 built their web filter:

- `edu_annotate` (annotate.py, a GlobalStage): the teacher rates a stratified sample 0-5
  with FineWeb-Edu's additive rubric; ratings are stored by document id and asked again only when
  they failed.
- `edu_train` (train.py, an ArtifactStage): fastText trained on those ratings, imported
  label files and proxy labels; `model.bin` and `metrics.json` with held-out and
  cross-validated metrics beside a document-length baseline.
- `edu_score` (score.py): the expected rating of every document, phase flags from
  thresholds.

metrics.py holds what they share (the sampling key, expected scores, the metrics);
labels.py edu_train's label sources (format labels, proxy text, groups for the held-out
split, decontamination); combiner.py the calibrated fastText + length combiner. In a
recipe the three chain through "@stage" references:

    edu_annotate: {sample_size: 500}
    edu_train: {annotations: "@edu_annotate"}
    edu_score: {model: "@edu_train/model.bin"}
"""
