"""Fine-tuning the pretrained gpt and bert for classification and sequence labelling.

The course notes (section 8): GPT gets a new linear layer on the last position's final hidden
state, trained on L = L2 + λ·L1 (task loss plus the language-model loss); BERT classifies from
the first token's ([CLS]) final hidden state and labels sequences from every token's.

    data.py     JSONL examples -> checked examples, label maps, padded batches
    cws.py      Chinese word segmentation: words <-> B/M/E/S tags, SIGHAN scoring, max matching
    metrics.py  accuracy, macro-F1, tag accuracy, span F1 (as summable counts)
    heads.py    TaskModel (a pretrained gpt/bert + its head), its checkpoint save/load
    predict.py  Predictor: classify(texts) and tag(tokens | raw text) on a loaded checkpoint
    config.py   FinetuneConfig (every knob of `nlm finetune`)

The Ray Train + DeepSpeed loop is nlm.cluster.finetune.loop; this package is plain torch.
"""
