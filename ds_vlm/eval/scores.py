"""Caption metrics of generated answers against references, from well-kept libraries: exact match, BLEU and
chrF (sacrebleu, corpus-level as its docs define them, 0-100), ROUGE-L (rouge-score's F-measure, 0-1, with
its stemmer). Exact match suits short answers (the demo's captions); long descriptions (the Pokemon
captions) need the others: exact match is 0 there whatever the model learns.
"""

from __future__ import annotations


def sample_scores(answer: str, reference: str) -> dict:
    """One answer's scores (sentence-level BLEU and chrF, ROUGE-L F), for sorting a report."""
    import sacrebleu

    return {"exact_match": float(answer == reference),
            "bleu": sacrebleu.sentence_bleu(answer, [reference]).score,
            "chrf": sacrebleu.sentence_chrf(answer, [reference]).score,
            "rouge_l": _rouge().score(reference, answer)["rougeL"].fmeasure}


def corpus_scores(answers: list[str], references: list[str]) -> dict:
    """exact_match (share), bleu and chrf (sacrebleu's corpus scores), rouge_l (mean F over the answers)."""
    import sacrebleu

    if not answers:
        return {}
    scorer = _rouge()
    return {"exact_match": sum(a == r for a, r in zip(answers, references)) / len(answers),
            "bleu": sacrebleu.corpus_bleu(answers, [references]).score,
            "chrf": sacrebleu.corpus_chrf(answers, [references]).score,
            "rouge_l": sum(scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references)) / len(answers)}


_SCORER = []


def _rouge():
    if not _SCORER:
        from rouge_score import rouge_scorer

        _SCORER.append(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True))
    return _SCORER[0]
