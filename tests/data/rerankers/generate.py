"""Generates the two small cross-encoders (rerankers) the rerank tests score with, converts them
with llama.cpp's own converter, and writes the scores their own Hugging Face forward pass gives
for a few hundred query/document pairs in several scripts: the oracle embedd's scores are
checked against (`tests/test_rerank.py`).

No published reranker's weights are reachable where the suite runs, so the models have random
weights but the published shapes:

- `bert-reranker.gguf`: `BertForSequenceClassification` with one label and two token types,
  as cross-encoder/ms-marco-MiniLM-L-6-v2 is, with a lower-casing WordPiece vocabulary trained
  here (Hugging Face `tokenizers`);
- `xlmr-reranker.gguf`: `XLMRobertaForSequenceClassification` with one label, as
  BAAI/bge-reranker-base and bge-reranker-v2-m3 are, with a SentencePiece Unigram vocabulary
  trained here (`nmt_nfkc` normalisation, XLM-RoBERTa's), in fairseq's id layout.

Both are tiny (hidden size 32, two layers) and written as float32 GGUFs so that the weights are
the checkpoint's exactly; every parameter, biases and layer norms included, is drawn at a
scale that makes the scores differ from pair to pair.

Two things llama.cpp does differently from the checkpoint, for BERT cross-encoders only, and
what this script does about them (docs/rerank.md says the same to users):

- llama.cpp's converter drops BERT's pooler (`pooler.dense`), which
  `BertForSequenceClassification` applies (with tanh) before its classifier; llama.cpp's
  rank head applies a `cls` dense layer with tanh exactly there when the file has one. This
  script has the converter keep the pooler (written as `cls`), so the BERT file computes the
  checkpoint's head; `pooler_gap` in the output is the largest difference between the scores
  and those of the head a stock conversion computes (the classifier over [CLS], no pooler).
- llama.cpp reads every token as segment A (token type 0): its BERT graph adds row 0 of the
  token-type embeddings to every token. `scores` for the BERT model are therefore the forward
  pass with token type 0 throughout; `scores_segment_b` are the checkpoint's with the
  tokenizer's token types (the document as segment B), for the documented gap.

Run it in a separate environment that has torch, transformers, sentencepiece, protobuf, faker
and numpy (never the daemon's), with llama.cpp's source tree (the one llama-cpp-python
vendors: `pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps`, then
`vendor/llama.cpp` in the unpacked sdist):

    python tests/data/rerankers/generate.py --llama-cpp /path/to/vendor/llama.cpp

It writes `bert-reranker.gguf`, `xlmr-reranker.gguf` and `reference.json` next to itself.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE.parent
# Faker locales the pairs are written in, with the script each exercises.
LOCALES = ("ru_RU", "zh_CN", "ja_JP", "ar_EG", "hi_IN", "el_GR", "ko_KR", "th_TH", "he_IL")
PAIRS_PER_LOCALE = 30
ENGLISH_PAIRS = 60
SEED = 27
# Model shape: small enough that both files stay under a megabyte each.
HIDDEN = 32
LAYERS = 2
HEADS = 2
INTERMEDIATE = 64
MAX_POSITIONS = 512
VOCAB = 4000
# Standard deviation of the random weights: large enough that scores vary between pairs.
WEIGHT_SCALE = 0.25
HEAD_SCALE = 0.5

# Runs llama.cpp's converter with two adjustments, both needed only because the vocabularies
# are trained here: its table of known pre-tokenizers (keyed by a hash of the vocabulary's
# ids for a probe text) cannot know a new vocabulary, and BERT's pre-tokenizer is WordPiece's
# whatever the table says; and BERT's pooler is kept (written as the `cls` tensor).
_CONVERT = r"""
import sys
sys.path.insert(0, sys.argv[1])
sys.argv = [sys.argv[0], *sys.argv[2:]]
import convert_hf_to_gguf as convert
from conversion import base, bert

original_pre = base.TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tokenizer):
    try:
        return original_pre(self, tokenizer)
    except NotImplementedError:
        return "default"

base.TextModel.get_vocab_base_pre = get_vocab_base_pre

original_filter = bert.BertModel.filter_tensors.__func__

def filter_tensors(cls, item):
    name, gen = item
    if KEEP_POOLER and name.removeprefix("bert.").startswith("pooler.dense."):
        return (name.removeprefix("bert.").replace("pooler.dense", "classifier.dense"), gen)
    return original_filter(cls, item)

KEEP_POOLER = __import__("os").environ.get("KEEP_BERT_POOLER") == "1"
bert.BertModel.filter_tensors = classmethod(filter_tensors)
convert.main()
"""


def texts() -> tuple[list[str], list[tuple[str, str, str]]]:
    """A training corpus for the vocabularies, and the (script, query, document) pairs."""
    import faker

    rng = random.Random(SEED)
    corpus: list[str] = []
    pairs: list[tuple[str, str, str]] = []
    docs = json.loads((DATA / "stdlib_docs.json").read_text())
    queries = [q for q in docs["queries"] if len(q) < 160]
    chunks = [c for c in docs["chunks"] if 100 < len(c) < 700]
    corpus += queries[:300] + chunks[:300]
    for i in range(ENGLISH_PAIRS):
        query = rng.choice(queries)
        # Half the documents contain the query's words: scores of related and unrelated pairs.
        doc = f"{query} {rng.choice(chunks)}" if i % 2 else rng.choice(chunks)
        pairs.append(("latin", query, doc))
    for locale in LOCALES:
        fake = faker.Faker(locale)
        fake.seed_instance(SEED)
        corpus += [fake.paragraph(nb_sentences=4) for _ in range(250)]
        for i in range(PAIRS_PER_LOCALE):
            query = fake.sentence(nb_words=6)
            doc = fake.paragraph(nb_sentences=rng.randint(2, 6))
            if i % 2:
                doc = f"{doc} {query}"
            pairs.append((locale, query, doc))
    return corpus, pairs


def _randomize(model: Any, torch: Any) -> None:
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * WEIGHT_SCALE
            if "LayerNorm" in name and name.endswith("weight"):
                param.copy_(1.0 + noise * 0.4)
            elif "classifier" in name or "pooler" in name:
                # A wider head: scores spread over a few units, as real rerankers' logits do.
                param.copy_(noise * HEAD_SCALE)
            else:
                param.copy_(noise)


def bert_checkpoint(directory: Path, corpus: list[str]) -> None:
    import tokenizers
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    wordpiece = tokenizers.BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(
        corpus,
        vocab_size=VOCAB,
        limit_alphabet=3000,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, do_lower_case=True)
    tokenizer.save_pretrained(directory)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POSITIONS,
        type_vocab_size=2,
        num_labels=1,
        architectures=["BertForSequenceClassification"],
    )
    model = BertForSequenceClassification(config).eval()
    _randomize(model, torch)
    model.save_pretrained(directory, safe_serialization=True)


def xlmr_checkpoint(directory: Path, corpus: list[str]) -> None:
    import sentencepiece as spm
    import torch
    from transformers import (
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
        XLMRobertaTokenizer,
    )

    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(t.split("\n")) for t in corpus]),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=VOCAB,
        normalization_rule_name="nmt_nfkc",
        num_threads=1,
        minloglevel=2,
        hard_vocab_limit=False,
        character_coverage=0.9995,
    )
    (directory / "sentencepiece.bpe.model").write_bytes(buffer.getvalue())
    # Read from the directory: Hugging Face builds XLM-R's fairseq id layout around the model.
    (directory / "tokenizer_config.json").write_text('{"tokenizer_class": "XLMRobertaTokenizer"}')
    fast = XLMRobertaTokenizer.from_pretrained(directory)
    fast.save_pretrained(directory)
    # The pipeline XLM-RoBERTa's published tokenizer.json has (bge-m3, bge-reranker-v2-m3):
    # the precompiled map, runs of spaces collapsed, then Metaspace over the whole text, so
    # whitespace ending a text stays one last word-start piece. (transformers builds a
    # whitespace-splitting pre-tokenizer from a bare SentencePiece model, which drops it.)
    path = directory / "tokenizer.json"
    spec = json.loads(path.read_text())
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            spec["normalizer"],
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
        ],
    }
    spec["pre_tokenizer"] = {
        "type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True
    }  # fmt: skip
    path.write_text(json.dumps(spec, ensure_ascii=False))
    config = XLMRobertaConfig(
        vocab_size=len(fast),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        # XLM-RoBERTa's positions start after the padding id (fairseq's layout).
        max_position_embeddings=MAX_POSITIONS + 2,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=1,
        architectures=["XLMRobertaForSequenceClassification"],
    )
    model = XLMRobertaForSequenceClassification(config).eval()
    _randomize(model, torch)
    model.save_pretrained(directory, safe_serialization=True)


def convert(llama_cpp: Path, checkpoint: Path, out: Path, *, keep_pooler: bool) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(_CONVERT)
    env = {**__import__("os").environ, "KEEP_BERT_POOLER": "1" if keep_pooler else "0"}
    subprocess.run(
        [sys.executable, script.name, str(llama_cpp), str(checkpoint), "--outtype", "f32",
         "--outfile", str(out)],
        check=True,
        env=env,
    )  # fmt: skip


def _encode(checkpoint: Path, query: str, doc: str, *, segment_a: bool) -> dict[str, Any]:
    """The pair as the checkpoint's tokenizer.json encodes it (Hugging Face `tokenizers`, the
    library sentence-transformers' CrossEncoder runs it through), as model inputs."""
    import tokenizers
    import torch

    encoding = tokenizers.Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(query, doc)
    assert len(encoding.ids) <= MAX_POSITIONS, "a pair longer than the model"
    types = [0] * len(encoding.ids) if segment_a else encoding.type_ids
    return {
        "input_ids": torch.tensor([encoding.ids]),
        "token_type_ids": torch.tensor([types]),
    }


def scores(checkpoint: Path, pairs: list[tuple[str, str, str]], *, segment_a: bool) -> list[float]:
    """The checkpoint's own forward pass over its tokenizer's pair encoding: its logits."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        return [
            float(model(**_encode(checkpoint, q, d, segment_a=segment_a)).logits[0, 0])
            for _, q, d in pairs
        ]


def without_pooler(checkpoint: Path, pairs: list[tuple[str, str, str]]) -> list[float]:
    """What a file from the stock converter computes: the classifier over the [CLS] hidden
    state, without the pooler (token type 0 throughout, as llama.cpp reads every token)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    out = []
    with torch.no_grad():
        for _, query, doc in pairs:
            inputs = _encode(checkpoint, query, doc, segment_a=True)
            hidden = model.bert(**inputs).last_hidden_state[:, 0]
            out.append(float(model.classifier(hidden)[0, 0]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", type=Path, required=True)
    parser.add_argument("--keep", type=Path, help="keep the checkpoints in this directory")
    args = parser.parse_args()
    corpus, pairs = texts()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        bert_checkpoint(work / "bert", corpus)
        xlmr_checkpoint(work / "xlmr", corpus)
        convert(args.llama_cpp, work / "bert", HERE / "bert-reranker.gguf", keep_pooler=True)
        convert(args.llama_cpp, work / "xlmr", HERE / "xlmr-reranker.gguf", keep_pooler=False)
        reference: dict[str, Any] = {
            "pairs": [{"script": s, "query": q, "document": d} for s, q, d in pairs],
            "bert-reranker": {
                "scores": scores(work / "bert", pairs, segment_a=True),
                "scores_segment_b": scores(work / "bert", pairs, segment_a=False),
            },
            "xlmr-reranker": {"scores": scores(work / "xlmr", pairs, segment_a=False)},
        }
        stock = without_pooler(work / "bert", pairs)
        reference["bert-reranker"]["pooler_gap"] = max(
            abs(a - b) for a, b in zip(stock, reference["bert-reranker"]["scores"], strict=True)
        )
    (HERE / "reference.json").write_text(json.dumps(reference, ensure_ascii=False, indent=0))


if __name__ == "__main__":
    main()
