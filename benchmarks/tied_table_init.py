"""How the factors of a tied table serve both its uses, on pretrained weights: the head (W x, its error
whitened by the inputs' covariance) and the embedding lookup (W[ids], its error over the rows the
texts read). No pretrained language model is offline, so the table is all-MiniLM-L6-v2's word
embeddings (30522 x 384) and the head's inputs its final hidden states (what an MLM head tied to
them would read, less its transform). Calibration on Rotten Tomatoes train texts, errors on
validation texts; every factorization is tunecomp's `decompose`, truncated at the rank that keeps
`kept` of the table's parameters:

- head error ||(W - B A) X|| / ||W X|| over the validation tokens' hidden states;
- lookup error ||W[ids] - (B A)[ids]|| / ||W[ids]|| over the validation tokens;
- sentence cosine: MiniLM's mean-pooled sentence embedding with B A as its word embeddings against
  the original's (what the lookup's error does to the model that reads it), mean over texts.

    .venv/bin/python benchmarks/tied_table_init.py            # -> benchmarks/results/tied_table_init.{md,json}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tunecomp_fx.config import CompressionConfig
from tunecomp_fx.data import load_minilm_classifier, load_rotten_tomatoes, tokenize
from tunecomp_fx.passes.decompose_weights import decompose, lookup_row_weights
from tunecomp_fx.passes.initialize_students import activation_error, lookup_error

# (label, init, rows weighted by the lookups' reads): the first is what a tied head got before, the second what it gets now
FORMS = (
    ("whitened (the head's inputs)", "whitened", False),
    ("whitened, rows weighted by the lookups' reads (tunecomp)", "whitened", True),
    ("plain SVD", "svd", False),
    ("plain SVD, rows weighted by the lookups' reads", "svd", True),
)


def hidden_states_and_ids(bert: torch.nn.Module, tokenizer: object, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unpadded token's final hidden state (float64) and id."""
    states, ids = [], []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            batch = tokenize(tokenizer, texts[start : start + 64])
            mask = batch["attention_mask"].bool()
            states.append(bert(**batch).last_hidden_state[mask].double())
            ids.append(batch["input_ids"][mask])
    return torch.cat(states), torch.cat(ids)


def sentence_cosine(bert: torch.nn.Module, tokenizer: object, texts: list[str], table: torch.Tensor) -> float:
    """Mean cosine between the mean-pooled sentence embeddings with `table` as the word embeddings and with the original."""
    embeddings = bert.embeddings.word_embeddings.weight
    original = embeddings.detach().clone()
    cosines = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            batch = tokenize(tokenizer, texts[start : start + 64])
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = []
            for weights in (original, table.float()):
                embeddings.copy_(weights)
                pooled.append((bert(**batch).last_hidden_state * mask).sum(1) / mask.sum(1))
            cosines.append(F.cosine_similarity(*pooled))
        embeddings.copy_(original)
    return torch.cat(cosines).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration-texts", type=int, default=3000)
    parser.add_argument("--validation-texts", type=int, default=1000)
    parser.add_argument("--kept", type=float, nargs="+", default=[0.6, 0.3], help="fractions of the table's parameters kept")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_minilm_classifier()
    bert = model.bert
    splits = load_rotten_tomatoes()
    validation = list(splits.validation.texts[: args.validation_texts])
    states, ids = hidden_states_and_ids(bert, tokenizer, list(splits.train.texts[: args.calibration_texts]))
    held_out_states, held_out_ids = hidden_states_and_ids(bert, tokenizer, validation)
    table = bert.embeddings.word_embeddings.weight.detach()
    rows, width = table.shape
    covariance = states.T @ states / len(states)
    held_out_covariance = held_out_states.T @ held_out_states / len(held_out_states)
    counts = torch.bincount(ids, minlength=rows)
    held_out_counts = torch.bincount(held_out_ids, minlength=rows)
    results = []
    for kept in args.kept:
        rank = int(kept * rows * width / (rows + width))
        for label, init, weighted in FORMS:
            factors = decompose(table, covariance, init, CompressionConfig().damping, lookup_row_weights(counts) if weighted else None)
            approximation = factors.up[:, :rank].double() @ factors.down[:rank].double()
            head = activation_error(table, approximation, held_out_covariance)  # the report's init errors, on held-out texts
            lookup = lookup_error(table, approximation, held_out_counts)
            cosine = sentence_cosine(bert, tokenizer, validation, approximation)
            results.append({"kept": kept, "rank": rank, "form": label, "head_error": head, "lookup_error": lookup, "sentence_cosine": cosine})
            print(f"kept {kept} rank {rank} | {label:58s} head {head:.3f} lookup {lookup:.3f} cosine {cosine:.4f}", flush=True)
    lines = [
        f"`python benchmarks/tied_table_init.py` ({len(ids)} calibration tokens from {args.calibration_texts} train texts, "
        f"{int((counts > 0).sum())} of {rows} rows read; errors over {len(held_out_ids)} tokens of {len(validation)} validation texts)",
        "",
        "| kept | rank | factors | head error | lookup error | sentence cosine |",
        "|---|---|---|---|---|---|",
        *(f"| {r['kept']} | {r['rank']} | {r['form']} | {r['head_error']:.3f} | {r['lookup_error']:.3f} | {r['sentence_cosine']:.4f} |" for r in results),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tied_table_init.json").write_text(json.dumps(results, indent=2))
    (args.out / "tied_table_init.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
