"""The one record schema of Primer, defined once.

Every column that any stage reads or writes is declared here with its Arrow type. A table
in flight carries a subset of these columns (readers start with `READ_COLUMNS`, each stage
adds its own), always in schema order, so two stages never disagree on what `lang_score`
is. There is no free-form metadata bag: a new signal is a new typed column here.

    >>> from pipeline.schema import FIELDS, schema_for
    >>> schema_for(["id", "text"])
    id: string
    text: large_string
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

_TS = pa.timestamp("us", tz="UTC")

_FIELDS: list[pa.Field] = [
    # --- identity and provenance (readers) ------------------------------------------------
    pa.field("id", pa.string(), nullable=False),  # deterministic; input id kept when present
    pa.field("text", pa.large_string()),  # main text; null for HTML not yet extracted
    pa.field("html", pa.large_binary()),  # raw payload (WARC response, .html file)
    pa.field("url", pa.string()),
    pa.field("title", pa.string()),
    pa.field("fetch_time", _TS),
    pa.field("content_type", pa.string()),  # MIME type from the HTTP header, lower-cased
    pa.field("source_path", pa.string()),  # file the record was read from
    pa.field("drop_reason", pa.string()),  # null when kept; "<stage>:<reason>" otherwise
    pa.field("error", pa.string()),  # "<Exception>: <message>" of a `<stage>:error` row
    # --- extract ---------------------------------------------------------------------------
    pa.field("n_chars", pa.int64()),
    # --- langid ----------------------------------------------------------------------------
    pa.field("lang", pa.string()),  # ISO 639 code from lid.176 (e.g. "en")
    pa.field("lang_score", pa.float32()),
    # --- quality (Gopher quality, Gopher repetition, C4, FineWeb) --------------------------
    pa.field("q_n_words", pa.int32()),
    pa.field("q_mean_word_len", pa.float32()),
    pa.field("q_symbol_word_ratio", pa.float32()),
    pa.field("q_frac_lines_bullet", pa.float32()),
    pa.field("q_frac_lines_ellipsis", pa.float32()),
    pa.field("q_frac_words_alpha", pa.float32()),
    pa.field("q_n_stop_words", pa.int32()),
    pa.field("q_dup_line_frac", pa.float32()),
    pa.field("q_dup_para_frac", pa.float32()),
    pa.field("q_dup_line_char_frac", pa.float32()),
    pa.field("q_dup_para_char_frac", pa.float32()),
    pa.field("q_top_2gram_frac", pa.float32()),
    pa.field("q_top_3gram_frac", pa.float32()),
    pa.field("q_top_4gram_frac", pa.float32()),
    pa.field("q_dup_5gram_frac", pa.float32()),
    pa.field("q_dup_6gram_frac", pa.float32()),
    pa.field("q_dup_7gram_frac", pa.float32()),
    pa.field("q_dup_8gram_frac", pa.float32()),
    pa.field("q_dup_9gram_frac", pa.float32()),
    pa.field("q_dup_10gram_frac", pa.float32()),
    pa.field("q_c4_n_sentences", pa.int32()),
    pa.field("q_c4_has_lorem", pa.bool_()),
    pa.field("q_c4_has_curly", pa.bool_()),
    pa.field("q_fw_line_punct_frac", pa.float32()),
    pa.field("q_fw_short_line_frac", pa.float32()),
    pa.field("q_fw_dup_line_char_frac", pa.float32()),
    pa.field("q_fw_newline_word_ratio", pa.float32()),
    # --- dedup -----------------------------------------------------------------------------
    pa.field("text_hash", pa.uint64()),  # hash of normalised text (exact dedup key)
    pa.field("dup_cluster", pa.string()),  # id of the kept document of its cluster
    pa.field("dup_cluster_size", pa.int32()),
    # --- teacher-LLM lineage (edu_annotate; the synthetic path reuses these) ---------------
    pa.field("teacher_model", pa.string()),  # the model that answered, as the server names it
    pa.field("teacher_backend", pa.string()),  # local | openai | vllm
    pa.field("template_id", pa.string()),  # prompt template id (configs/prompts/<id>_v<N>.j2)
    pa.field("template_version", pa.int32()),
    pa.field("teacher_answer", pa.large_string()),  # raw answer, kept for failed rows too
    pa.field("teacher_error", pa.string()),  # "<kind>: <message>"; null on success
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    # --- educational value (edu_annotate, edu_score) ---------------------------------------
    pa.field("edu_label", pa.int8()),  # the teacher's 0-5 rating of a sampled document
    pa.field("edu_score", pa.float32()),  # classifier: expected rating over class probabilities
    pa.field("edu_int", pa.int8()),  # round(edu_score), clipped to 0-5
    pa.field("edu_phase1", pa.bool_()),  # edu_score >= edu_score.phase1_min_score
    pa.field("edu_phase2", pa.bool_()),  # edu_score >= edu_score.phase2_min_score
    # --- synthetic data (seeds, generate) ----------------------------------------------------
    pa.field("seed_id", pa.string()),  # deterministic id of the seed (topic x audience x style)
    pa.field("seed_text", pa.large_string()),  # the topic or summary the prompt was built from
    pa.field("seed_source", pa.string()),  # "taxonomy:<file>" or "web:<document id>"
    pa.field("audience", pa.string()),
    pa.field("style", pa.string()),
    pa.field("persona", pa.string()),
    pa.field("prompt", pa.large_string()),  # the rendered user prompt sent to the teacher
    pa.field("temperature", pa.float32()),
    pa.field("top_p", pa.float32()),
    pa.field("max_tokens", pa.int32()),
    pa.field("sample_seed", pa.int64()),  # the per-request sampling seed
    pa.field("finish_reason", pa.string()),
    # --- decontaminate ---------------------------------------------------------------------
    pa.field("contam_benchmarks", pa.string()),  # comma-separated benchmarks hit; null if clean
    pa.field("contam_items", pa.large_string()),  # JSON list of "benchmark/split:item" hit
    pa.field("contam_ngrams", pa.int32()),  # n-grams shared with benchmark items
]

FIELDS: dict[str, pa.Field] = {f.name: f for f in _FIELDS}
ORDER: dict[str, int] = {f.name: i for i, f in enumerate(_FIELDS)}

# What every reader emits, in this order.
READ_COLUMNS: tuple[str, ...] = (
    "id",
    "text",
    "html",
    "url",
    "title",
    "fetch_time",
    "content_type",
    "source_path",
    "drop_reason",
)
READ_SCHEMA: pa.Schema = pa.schema([FIELDS[c] for c in READ_COLUMNS])


def field(name: str) -> pa.Field:
    """The declared field for `name`; a clear error for a column nobody declared."""
    try:
        return FIELDS[name]
    except KeyError:
        raise KeyError(
            f"column {name!r} is not in the Primer schema (pipeline/schema.py); "
            "declare it there before a stage writes it"
        ) from None


def schema_for(columns: Iterable[str]) -> pa.Schema:
    """The schema of a table holding `columns`, in canonical order."""
    return pa.schema(sorted((field(c) for c in set(columns)), key=lambda f: ORDER[f.name]))


def conform(table: pa.Table) -> pa.Table:
    """Cast `table` to the canonical types and column order of the schema.

    Stages may build columns with whatever type is convenient (int64 counts, float64
    ratios); this is the one place where they become the declared types.
    """
    target = schema_for(table.column_names)
    if table.schema.equals(target, check_metadata=False):
        return table
    return table.select(target.names).cast(target)


def empty(columns: Iterable[str] = READ_COLUMNS) -> pa.Table:
    return schema_for(columns).empty_table()
